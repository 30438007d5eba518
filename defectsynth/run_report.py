"""OUT/report.md of `defectsynth run`: what ran, the per-stage times (from the stage markers and
run_log.jsonl), each stage's results and pictures, the evaluation tables (from eval.paper) and plain
words on what the numbers mean. Read-only over the run folder; defectsynth/run.py calls
`write_report` after the last stage.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from defectsynth.device import resolve_device
from defectsynth.provenance import provenance
from eval.paper import PaperConfig

if TYPE_CHECKING:
    from defectsynth.run import RunConfig, Stage

DEMO_BANNER = (
    "> **This is the embedded demo, not the paper's experiment.** Procedural {size} px images ({n_def} defective, "
    "{n_free} defect-free), and instead of Stable Diffusion a tiny model of SD's architecture (about 2.7M "
    "parameters) trained here from scratch in minutes on the CPU; every stage runs a few hundred steps instead "
    "of thousands. The numbers below show that the pipeline runs end to end and what each stage produced. "
    "They say nothing about what the method achieves with SD 1.5 on real data; the `paper*` columns quote "
    "the paper's numbers on its own data for the shape of the results only.")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _last(folder: Path, pattern: str) -> Path | None:
    found = sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []
    return found[-1] if found else None


def _figure(src: Path | None, figures: Path, name: str) -> str | None:
    """Copy `src` into OUT/figures/ under `name`; the report links the copy (relative path)."""
    if src is None or not Path(src).is_file():
        return None
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, figures / name)
    return f"figures/{name}"


def _figure_lines(figures: Path, entries: list[tuple[str, Path | None, str]]) -> list[str]:
    """Markdown for (name, source picture, caption) entries whose picture exists, each copied into
    OUT/figures/ under its name (a picture already drawn there is linked as it is)."""
    lines = []
    for name, src, caption in entries:
        in_place = src is not None and Path(src).parent == figures and Path(src).is_file()
        link = f"figures/{name}" if in_place else _figure(src, figures, name)
        if link:
            lines.append(f"\n![{caption}]({link})  \n*{caption}*")
    return lines


def _stage_times(out: Path, markers: dict[str, Path]) -> list[list[str]]:
    """Rows of the per-stage table from the markers and run_log.jsonl (every attempt counted)."""
    log = _read_jsonl(out / "run_log.jsonl")
    rows = []
    total_wall = total_cpu = 0.0
    for name, path in markers.items():
        marker = _read_json(path)
        if marker is None:
            continue
        attempts = [r for r in log if r.get("stage") == name and r.get("event") in ("ran", "stopped", "failed")]
        all_seconds = sum(r.get("seconds", 0.0) for r in attempts)
        total_wall += marker["seconds"]
        total_cpu += marker["cpu_seconds"]
        rows.append([name, f"{marker['seconds']:.1f}", f"{marker['cpu_seconds']:.1f}", f"{marker['peak_rss_mb']:.0f}",
                     str(marker.get("threads", "")), f"{marker.get('load_average', float('nan')):.1f}",
                     f"{len(attempts)} ({all_seconds:.0f} s)" if len(attempts) > 1 else "1"])
    rows.append(["**total**", f"**{total_wall:.1f}**", f"**{total_cpu:.1f}**", "", "", "", ""])
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _concept_curves(concept_dir: Path, path: Path) -> Path | None:
    from train.plot import Curve, plot_curves
    records = [r for r in _read_jsonl(concept_dir / "metrics.jsonl") if "loss" in r]
    if not records:
        return None
    curves = [Curve("concept loss", [r["step"] for r in records], [r["loss"] for r in records])]
    if "prior_loss" in records[0]:
        curves.append(Curve("instance / prior loss (prior)", [r["step"] for r in records],
                            [r["prior_loss"] for r in records]))
    return plot_curves(curves, path)


def _class_image_grid(concept_dir: Path, path: Path, count: int = 16) -> Path | None:
    from data.images import read_image, image_to_tensor
    from train.monitor import save_image_grid
    files = sorted((concept_dir / "class_images").glob("*.png"))[:count]
    if not files:
        return None
    return save_image_grid(torch.stack([image_to_tensor(read_image(f)) for f in files]), path)


def protocol_section(cfg: RunConfig, out: Path, conf: dict[str, Any]) -> str:
    """## Protocol: the split sizes and which data each generator saw (from OUT/splits.json and the
    wired stage configs), and the extra generators' reduced demo steps."""
    listing = _read_json(out / "splits.json") or {}
    info = listing.get("info", {})
    sizes = info.get("sizes", {})
    lines = [f"The annotated set `{info.get('source')}` was split once, before anything trained "
             f"(paper sections 4 and 5.1; by image, seed {info.get('seed')}, stratified by class; fractions "
             f"{info.get('fractions')}, the equal val/test halves following the paper's section 5.1, the train share ours)"
             + (f"; the test set is yours: `{info.get('test_source')}`" if cfg.test else "") + ":",
             "", _table(["split", "images", "classes (ids)", "used by"], [
                 ["train", str(sizes.get("train")), str(info.get("classes", {}).get("train")),
                  "concept, condition, the synthesis mask bank, every Mask R-CNN training phase, FID's real set"],
                 ["val", str(sizes.get("val")), str(info.get("classes", {}).get("val")),
                  "the controls' validation drivers (adherence) only"],
                 ["test", str(sizes.get("test")), str(info.get("classes", {}).get("test")),
                  "every Mask R-CNN metric, nothing else"],
                 ["train_small", str(sizes.get("train_small")), str(info.get("classes", {}).get("train_small")),
                  f"the {cfg.small_fraction:.0%} generator and no-concept control, Table 2's real rows"]]),
             "", "File lists: `splits.json`; COCO subsets: `splits/`."]
    extra = [name for name in ("concept_small", "condition_small", "condition_inpaint", "condition_no_concept")
             if name in conf]
    if extra:
        rows = [[name, str(conf[name].steps), f"`{conf[name].data}`", getattr(conf[name], "condition", "—")]
                for name in extra]
        lines += ["", "The extra generators (Tables 2-4):", "", _table(["stage", "steps", "training data", "hint"], rows)]
        if cfg.demo:
            lines.append(f"\nDemo budget (ours): the extra generators train {cfg.concept_small.steps} concept steps "
                         f"(the main concept: {conf['concept'].steps}) and {cfg.condition_extra.steps} control steps "
                         f"(the main control: {conf['condition'].steps}), validating only at the end, to fit the "
                         f"15-minute CPU budget; they are weaker than the main generator for that reason alone, "
                         f"so Tables 2-4 compare generators of unequal training, not only of unequal data.")
    return "## Protocol: splits and generators\n\n" + "\n".join(lines)


def table_notes(tables: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Plain words on what Tables 1-4 can and cannot say, from their numbers and provenance."""
    notes = []
    test = (tables.get("1") or tables.get("2") or {}).get("provenance", {}).get("test_set") or {}
    if test.get("images") is not None:
        notes.append(f"Every Mask R-CNN number is measured on the {test['images']} test images only, which no "
                     f"generator, mask bank or Mask R-CNN training phase saw"
                     + ("; with so few images one more or one fewer detected defect moves a mAP by a large step."
                        if test["images"] < 50 else "."))
    small = ((tables.get("2") or {}).get("provenance", {}).get("real_training_set") or {}).get("images")
    if small is not None:
        notes.append(f"Table 2 is the small-data regime end to end: its synthetic rows come from a generator "
                     f"trained on the same {small} real images its real rows train on (paper section 4), not "
                     f"from Table 1's generator.")
    rows3 = [r for r in (tables.get("3") or {}).get("rows", []) if "mean_l2" in r.get("entry", {})]
    if len(rows3) == 2:
        ours, base = rows3[0]["entry"], rows3[1]["entry"]
        gap = ours["mean_l2"] - base["mean_l2"]
        more = "as diverse as" if abs(gap) < 0.01 else ("more diverse than" if gap > 0 else "less diverse than")
        notes.append(f"Table 3: for the same pairs and seeds, our samples are {more} the inpainting baseline's "
                     f"by L2 ({ours['mean_l2']:.2f} vs {base['mean_l2']:.2f}; MI {ours['mean_mi']:.3f} vs "
                     f"{base['mean_mi']:.3f}, lower = more diverse), from one draw of m x k samples each. The paper "
                     f"reports ours as the more diverse; the baseline's hint shows the whole defect-free image, ours "
                     f"only its topology.")
    rows4 = [r for r in (tables.get("4") or {}).get("rows", []) if "value" in r.get("entry", {})]
    if len(rows4) == 3:
        with_c, without, ref = (r["entry"]["value"] for r in rows4)
        notes.append(f"Table 4 ({rows4[0]['entry']['label']}, lower = closer to the real training images): "
                     f"{with_c:.2f} with the concept phase vs {without:.2f} without, at "
                     f"{cfg.small_fraction:.0%} of the data; {ref:.2f} for the main generator. "
                     + ("The concept phase gave the lower distance, the direction the paper reports (Table 4)" if with_c < without else
                        "The concept phase did not give the lower distance (in the paper it did)")
                     + (f"; but the gap is {abs(with_c - without) / max(without, 1e-9):.0%}, from one seed and one "
                        f"set of samples each, too small to count as evidence either way."
                        if abs(with_c - without) < 0.1 * max(without, 1e-9) else "."))
    return notes


def write_run_json(out: Path, cfg: RunConfig, evaluation: dict[str, Any], folder: dict[str, Path]) -> None:
    """OUT/report.json: the splits and every table with its per-row provenance (from eval.paper)."""
    from data.files import write_json_atomic
    from eval.report import json_ready
    write_json_atomic(out / "report.json", json_ready({
        "splits": (_read_json(out / "splits.json") or {}).get("info"), "tables_requested": list(cfg.tables),
        "tables": evaluation.get("tables", {}), "evaluation": str(folder["evaluate"] / "report.json")}), indent=1)


def write_report(cfg: RunConfig, stages: list[Stage], out: Path, threads: int, seconds: float,
                 markers: dict[str, Path]) -> Path:
    """OUT/report.md: what ran, per-stage times, each stage's results and pictures, the evaluation
    tables (from eval.paper) and plain words on what the numbers mean."""
    figures = out / "figures"
    folder = {s.name: s.folder for s in stages}
    conf = {s.name: s.config for s in stages}  # the wired configs each stage ran with
    parts: list[str] = []
    title = "defectsynth demo run" if cfg.demo else "defectsynth run"
    parts.append(f"# {title}\n\nOutput folder `{out}`; config `run_config.json` (rerun: "
                 f"`defectsynth run --config {out / 'run_config.json'} --out NEW_FOLDER`).")
    if cfg.demo:
        parts.append(DEMO_BANNER.format(size=cfg.demo_data.size, n_def=cfg.demo_data.num_defective,
                                        n_free=cfg.demo_data.num_free))
    made_with = provenance(resolve_device(cfg.device))  # versions, commit (in a git checkout), device
    parts.append("Made with " + ", ".join(f"{key} `{value}`" for key, value in made_with.items()) + ".")
    notes: list[str] = []

    # Per-stage times.
    parts.append("## Stages: wall time, CPU time, peak memory\n\n" + _table(
        ["stage", "wall s", "CPU s", "peak RSS MB", "threads", "load avg", "attempts"], _stage_times(out, markers)) +
        f"\n\nWall time of this call (stages it skipped not counted): {seconds:.1f} s. CPU s counts all threads of the process; peak RSS is each "
        f"stage's own peak (Linux VmHWM, reset per stage); load avg is the machine's 1-minute load when the stage "
        f"ended (other jobs slow the stages down). Per-attempt log: `run_log.jsonl`.")

    parts.append(protocol_section(cfg, out, conf))

    # Prior.
    if "prior" in folder:
        prior = _read_json(folder["prior"] / "prior.json") or {}
        psnr = prior.get("psnr_db", {})
        flat = prior.get("psnr_flat_db", {})
        lines = [f"The tiny prior (train.prior) stands in for SD's general prior: VAE {prior.get('vae_steps')} steps, "
                 f"text-to-image UNet {prior.get('unet_steps')} steps on {prior.get('images')} generic surfaces "
                 f"(no defects), caption `{conf['prior'].caption}`."]
        for key, label in (("train", "training surfaces"), ("eval", "test-split defect images (never seen)")):
            if key in psnr:
                lines.append(f"- VAE reconstruction PSNR on {label}: **{psnr[key]:.2f} dB** (each image replaced by "
                             f"its mean colour scores {flat.get(key, float('nan')):.2f} dB)")
        ceiling = prior.get("vae_adherence")
        if ceiling:
            lines.append(f"- Condition adherence of the VAE's reconstructions of {ceiling['images']} test-split images: "
                         f"**{ceiling['reconstructions']:.3f}** (the originals: {ceiling['originals']:.3f}). Every "
                         f"generated image goes through this decoder, so this is the ceiling of the SADF adherence "
                         f"below (issue target for the demo: 0.8)")
        if psnr and flat and all(psnr[k] - flat.get(k, 0) < 3.0 for k in psnr):
            notes.append("The tiny VAE barely beats a flat mean-colour image (PSNR within 3 dB): it keeps the "
                         "shading and colour of a surface but little of its texture or thin defects, so every "
                         "generated image is blurrier than the data.")
        elif psnr and flat:
            gain = min(psnr[k] - flat.get(k, 0) for k in psnr)
            notes.append(f"The tiny VAE reconstructs at least {gain:.1f} dB better than a flat mean-colour image, "
                         f"i.e. it keeps the shading; its reconstructions (figures/prior_reconstructions.png) show "
                         f"what it blurs away (brushed streaks, 1-pixel cracks and scratches). Everything generated "
                         f"later goes through this decoder, so no image can be sharper than that.")
        lines += _figure_lines(figures, [
            ("prior_reconstructions.png", folder["prior"] / "reconstructions.png",
             "originals / reconstructions (surfaces, then defect images)"),
            ("prior_samples.png", _last(folder["prior"] / "samples", "*.png"), "prior samples of the caption (DDIM, CFG)"),
            ("prior_curves.png", folder["prior"] / "curves.png", "VAE and UNet training loss")])
        parts.append("## The prior\n\n" + "\n".join(lines))

    # Concept.
    concept_dir = folder["concept"]
    concept_metrics = [r for r in _read_jsonl(concept_dir / "metrics.jsonl") if "loss" in r]
    cc = conf["concept"]
    lines = [f"DreamBooth with prior preservation (train.concept) from `{cc.ckpt}`: {cc.steps} steps, prompt "
             f"`{cc.prompt_template.format(cc.identifier)}`, {cc.num_class_images} class images of "
             f"`{cc.prompt_template.format(cc.class_noun)}` ({cc.class_sampler} {cc.class_steps} steps, guidance "
             f"{cc.class_guidance})."]
    if concept_metrics:
        first, last = concept_metrics[0], concept_metrics[-1]
        lines.append(f"- loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})")
    lines += _figure_lines(figures, [
        ("concept_loss.png", _concept_curves(concept_dir, figures / "concept_loss.png"),
         "concept loss (and its prior-preservation term)"),
        ("concept_class_images.png", _class_image_grid(concept_dir, figures / "concept_class_images.png"),
         "class images drawn by the base model"),
        ("concept_samples.png", _last(concept_dir / "samples", "*.png"),
         "samples of the instance prompt after the concept phase")])
    parts.append("## Learn the concept\n\n" + "\n".join(lines))

    # Condition.
    condition_dir = folder["condition"]
    validation = [r for r in _read_jsonl(condition_dir / "metrics.jsonl") if "adherence" in r]
    co = conf["condition"]
    lines = [f"The control copy (train.condition): {co.steps} steps, hint `{co.condition}`, prompts dropped "
             f"with p={co.drop_prompt_rate}."]
    if validation:
        first, last = validation[0], validation[-1]
        source = last.get("adherence_source")
        lines.append(f"- condition adherence (0..1, data/adherence.py: topology of the sample vs its driver and "
                     f"defect contrast inside the masks) {first['adherence']:.3f} at step {first['step']} -> "
                     f"**{last['adherence']:.3f}** at step {last['step']}"
                     + (f"; the source images themselves score {source:.3f}" if source is not None else ""))
        if last["adherence"] - first["adherence"] < 0.05:
            notes.append(f"The control barely changed the samples' adherence to their drivers "
                         f"({first['adherence']:.3f} -> {last['adherence']:.3f}): in {co.steps} steps "
                         f"it has not learned to follow the driver (ControlNet training converges suddenly, "
                         f"usually after thousands of steps), so the SADF masks annotate defects the images do "
                         f"not show.")
        elif last["adherence"] < 0.75 * (source if source is not None else 1.0):
            notes.append(f"The control learned to follow its drivers in part: adherence {first['adherence']:.3f} "
                         f"at step 0 -> {last['adherence']:.3f} after {co.steps} steps, against "
                         f"{source if source is not None else 1.0:.3f} for the real images. Some SADF masks "
                         f"therefore annotate defects the images show faintly or not at all (see the contact "
                         f"sheet), which is what a detector trained on them learns from.")
    lines += _figure_lines(figures, [
        ("condition_curves.png", condition_dir / "curves.png", "training loss and condition adherence"),
        ("condition_validation.png", _last(condition_dir / "validation", "*.png"),
         "validation: driver | sample, last round")])
    parts.append("## Learn the condition\n\n" + "\n".join(lines))

    # Synthesis.
    sadf_dir = folder["synthesize"]
    sadf, sy = _read_json(sadf_dir / "sadf.json") or {}, conf["synthesize"]
    info = sadf.get("info", {})
    lines = [f"The SADF dataset (sample.synthesize): `{sadf_dir / 'sadf.json'}`, COCO with RLE masks known by "
             f"construction: **{len(sadf.get('images', []))} images, {len(sadf.get('annotations', []))} instances** "
             f"({info.get('images_planned', '?')} planned = defect-free images x {sy.variants} augmentations x "
             f"{sy.samples_per_driver} samples; {info.get('dropped', 0)} dropped by the blank/non-finite guard; "
             f"{sy.sampler} {sy.steps} steps, guidance {sy.guidance})."]
    link = _figure(sadf_dir / "contact_sheet.png", figures, "sadf_contact_sheet.png")
    if link:
        lines.append(f"\n![driver | generated images]({link})  \n*each row: the driver (hint), then samples drawn "
                     f"from it; the painted masks are the samples' annotations*")
    parts.append("## Synthesize the SADF dataset\n\n" + "\n".join(lines))

    # Evaluation.
    eval_dir = folder["evaluate"]
    report = _read_json(eval_dir / "report.json") or {}
    body = (eval_dir / "report.md").read_text(encoding="utf-8") if (eval_dir / "report.md").is_file() else ""
    body = body.split("\n", 1)[1].strip() if body.startswith("# ") else body
    body = body.replace("\n## ", "\n### ")
    ev = conf["evaluate"]
    lines = [f"eval.paper: every Mask R-CNN metric on the held-out test split `{ev.test}` (never seen by a "
             f"generator or a Mask R-CNN training phase); Mask R-CNN "
             f"{ev.iterations} iteration(s) per training phase at {ev.min_size} px, "
             + ("from scratch" if not ev.init_weights else f"initialised from {ev.init_weights}") + "; "
             + ("FID with the Inception weights." if ev.feature_extractor == "inception" else
                f"no Inception weights given, so FID is **not run**; the distance column is "
                f"**FD-{ev.feature_extractor}** (see below), which is not FID.")]
    if cfg.demo:
        lines.append(f"\n> Demo evaluation: {report.get('tables', {}).get('1', {}).get('n_test_images', '?')} test "
                     f"images, a few CPU iterations. Read these tables as a check that the evaluation runs.")
    lines.append("\n" + body)
    maps = [e["entry"]["mean"].get("segm_map") for t in ("1", "2")
            for e in report.get("tables", {}).get(t, {}).get("rows", []) if "mean" in e.get("entry", {})]
    if maps and max(v for v in maps if v is not None) < 0.02:
        notes.append(f"Mask R-CNN learned almost nothing (every segm mAP below 0.02) in {ev.iterations} "
                     f"iteration(s) per phase: with this little training the tables cannot tell which training "
                     f"data is better. The real run trains {PaperConfig().iterations} iterations at "
                     f"{PaperConfig().min_size} px, and `--init-weights` starts from a pretrained detector.")
    if ev.feature_extractor == "pixels":
        notes.append("FD-pixels is the Frechet distance between Gaussians fitted to 8x8 area-downsampled RGB "
                     "images (192 numbers per image, eval/features.py): it compares colour and brightness layout, "
                     "not texture or defects, and is not comparable with FID. Give "
                     "`--inception-weights pt_inception-2015-12-05-6726825d.pth` for FID.")
    if ev.feature_extractor == "inception-random":
        notes.append("FD-inception-random uses the FID network with seeded random weights: a distance between "
                     "random convolutional features, not FID and not comparable with FID numbers.")
    notes += table_notes(report.get("tables", {}), cfg)
    parts.append("## Evaluation\n\n" + "\n".join(lines))
    write_run_json(out, cfg, report, folder)

    parts.append("## What the numbers mean\n\n" + "\n".join(f"- {n}" for n in notes))
    parts.append("## Files\n\n" + "\n".join(f"- `{s.folder.relative_to(out)}/`: {s.name}" for s in stages)
                 + "\n- `figures/`: the pictures above\n- `stages/`: completion markers with each stage's config "
                 "and times\n- `run_config.json`, `run_log.jsonl`")
    path = out / "report.md"
    from eval.report import write_text_atomic
    write_text_atomic(path, "\n\n".join(parts) + "\n")
    return path


# ------------------------------------------------------------------------------------------- CLI

