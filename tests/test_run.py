"""defectsynth run: the whole pipeline on a micro configuration (demo data at 64 px, a few steps per
stage), every stage's outputs, a valid final COCO file, resumption after a stop and after a crash
without redoing finished stages, the changed-config refusal, and the config file / flags."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import defectsynth.run as run
from data.coco import load_coco
from data.demo import DemoConfig
from defectsynth.runconfig import load_config_json
from eval.paper import PaperConfig
from sample.synthesize import SynthesizeConfig
from train.concept import ConceptConfig
from train.condition import ConditionConfig
from train.prior import PriorConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def micro_config(out: Path, **overrides) -> run.RunConfig:
    """The demo pipeline at 64 px with a handful of steps per stage (about a minute on 2 cores)."""
    base = dict(
        out=str(out), resolution=64, threads=1, prior_images=8,
        demo_data=DemoConfig(size=64, num_defective=10, num_free=3),
        prior=PriorConfig(vae_steps=2, unet_steps=2, vae_batch_size=2, vae_crop=32, unet_batch_size=4,
                          num_samples=2, sample_steps=2, progress=False),
        concept=ConceptConfig(steps=2, num_class_images=2, class_steps=2, class_batch_size=2, batch_size=1,
                              checkpoint_every=0, validate_every=0, num_validation_images=2, validation_sampler_steps=2,
                              progress=False),
        condition=ConditionConfig(steps=2, batch_size=2, checkpoint_every=0, validate_every=0, num_validation_images=2,
                                  validation_sampler_steps=2, progress=False),
        synthesize=SynthesizeConfig(variants=1, samples_per_driver=2, steps=2, batch=4, sheet_pairs=2,
                                    progress=False),
        evaluate=PaperConfig(iterations=1, batch_size=2, min_size=64, max_size=64, rois_per_image=16,
                             detections_per_image=10, checkpoint_every=1, conditions=2, per_condition=2,
                             diversity_size=64, kid_subsets=2, progress=False))
    base.update(overrides)
    return run.RunConfig(**base)


def marker_files(out: Path) -> dict[str, tuple[int, bytes]]:
    """Each marker's (inode, content): markers are written to a temporary name and renamed, so a
    rewrite shows as a new inode even with the same bytes (modification times can tie or be coarse)."""
    return {p.stem: (p.stat().st_ino, p.read_bytes()) for p in (out / run.MARKERS).glob("*.json")}


def check_outputs(out: Path) -> None:
    """Every stage's outputs, and a final COCO file that pycocotools loads with decodable masks."""
    for stage in run.STAGES:
        assert (out / run.MARKERS / f"{stage}.json").is_file(), stage
    for name in ("data/annotations.json", "data/free.json", "data/prior_surfaces/free.json",
                 "prior/prior.safetensors", "prior/prior.json", "concept/concept.safetensors",
                 "condition/control.safetensors", "condition/base.safetensors", "condition/curves.png",
                 "sadf/sadf.json", "sadf/contact_sheet.png", "eval/report.md", "eval/report.json",
                 "report.md", "run_config.json", "run_log.jsonl", "figures/sadf_contact_sheet.png"):
        assert (out / name).is_file(), name
    coco = COCO(str(out / "sadf" / "sadf.json"))
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == 3 * 1 * 2  # defect-free images x variants x samples per driver
    assert all((out / "sadf" / im["file_name"]).is_file() for im in images)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns, "the synthetic images carry the masks they were drawn from"
    for ann in anns:
        mask = coco.annToMask(ann)
        assert mask.shape == (64, 64) and mask.sum() == ann["area"] > 0
        assert np.array_equal(mask_utils.decode(ann["segmentation"]), mask)
    report = (out / "report.md").read_text(encoding="utf-8")
    for text in ("embedded demo", "Table 1", "FD-pixels", "What the numbers mean", "figures/sadf_contact_sheet.png"):
        assert text in report, text


def names_of(path: Path) -> set[str]:
    """Absolute image paths of a COCO json (as the stages resolve them)."""
    return {Path(im["file_name"]).name for im in load_coco(path, check_images=False, progress=False)["images"]}


def check_protocol(out: Path) -> None:
    """Issue 13's acceptance: the held-out test images reach no generator, no mask bank and no Mask
    R-CNN training phase; metrics are on test only; the 10% generator; provenance in the report."""
    splits = {name: names_of(out / "splits" / f"{name}.json") for name in ("train", "val", "test", "train_small")}
    listing = json.loads((out / "splits.json").read_text())
    every = names_of(out / "data" / "annotations.json")
    assert {Path(n).name for n in listing["test"]} == splits["test"] and splits["test"]
    assert splits["train"] | splits["val"] | splits["test"] == every
    assert not (splits["train"] & splits["test"]) and not (splits["val"] & splits["test"])
    assert not (splits["train"] & splits["val"])
    classes = {n: listing["info"]["classes"][n] for n in ("train", "val", "test", "train_small")}
    assert all(c == [1, 2, 3] for c in classes.values()), classes  # every class in every split
    # ceil(0.1 x |train|) images, here grown to one per class (test_data_coco checks the ceil on 40 images)
    assert math.ceil(0.1 * len(splits["train"])) <= len(splits["train_small"]) <= 3
    assert splits["train_small"] <= splits["train"]

    # The generators' training data, as each stage recorded it in its config.json.
    for stage, split in (("concept", "train"), ("condition", "train"), ("concept_small", "train_small"),
                         ("condition_small", "train_small"), ("condition_inpaint", "train"),
                         ("condition_no_concept", "train_small")):
        used = json.loads((out / stage / "config.json").read_text())["data"]
        assert names_of(Path(used)) == splits[split] and not names_of(Path(used)) & splits["test"], stage
    # The mask banks: every synthetic image's records name their mask sources.
    for folder, split in (("sadf", "train"), ("sadf_small", "train_small"), ("diversity/ours", "train"),
                          ("diversity/inpaint", "train"), ("sadf_no_concept", "train_small")):
        records = [json.loads(line) for f in sorted((out / folder / "records").glob("*.jsonl"))
                   for line in f.read_text().splitlines()]
        sources = {Path(s["file_name"]).name for r in records for s in r["mask_sources"]}
        assert records and sources and sources <= splits[split], folder
    # Every Mask R-CNN training phase: real phases on train (or the small subset), synthetic on SADF.
    annotated = load_coco(out / "data" / "annotations.json", check_images=False, progress=False)
    name_of = {im["id"]: Path(im["file_name"]).name for im in annotated["images"]}
    phases = sorted((out / "eval" / "maskrcnn").glob("table*/*/train.json"))
    assert len(phases) == 6
    for phase in phases:
        signature = json.loads(phase.read_text())["signature"]
        evaluation = json.loads((phase.parent / "eval.json").read_text())
        assert evaluation["n_test_images"] == len(splits["test"])  # metrics on the test split
        if phase.parent.name.startswith("real"):
            used = {name_of[i] for i in signature["image_ids"]}
            assert used == splits["train" if "table1" in str(phase) else "train_small"], phase
    # Table 1's synthetic rows come from the main control, Table 2's from the 10% control.
    report = json.loads((out / "report.json").read_text())
    for table, stage in (("1", "condition"), ("2", "condition_small")):
        digest = hashlib.sha256((out / stage / "control.safetensors").read_bytes()).hexdigest()
        for row in report["tables"][table]["rows"]:
            if row["training data"] != f"real ({'100%' if table == '1' else '10%'} real)":
                assert row["provenance"]["synthetic"]["generator"]["control_sha256"] == digest, (table, row)
    text = (out / "report.md").read_text()
    for t in "1234":
        section = text.split(f"### Table {t}:")[1].split("### Table")[0].split("\n## ")[0]
        assert "not run" not in section and "Where these numbers come from" in section and "splits/" in section, t


@pytest.mark.slow
def test_run_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = micro_config(out)

    # 1. Stop after the concept stage (as if the run had been killed between stages).
    first = run.main(dataclasses.replace(cfg, stop_after="concept"))
    assert first.ran == ["data", "split", "prior", "concept"] and first.stopped_after == "concept"
    assert first.report is None and not (out / "sadf").exists()
    finished = marker_files(out)

    # 2. A crash inside the synthesis stage: no marker for it, the finished stages stay finished.
    import sample.synthesize

    def crash(config):
        raise RuntimeError("simulated crash")
    monkeypatch.setattr(sample.synthesize, "main", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.main(cfg)
    monkeypatch.undo()
    assert not (out / run.MARKERS / "synthesize.json").exists()
    assert (out / run.MARKERS / "condition.json").is_file()

    # 3. The rerun finishes, redoing nothing that was finished.
    done = run.main(cfg)
    assert done.skipped == ["data", "split", "prior", "concept", "condition"]
    assert done.ran == list(run.STAGES[5:]) and done.report == out / "report.md"
    assert all(marker_files(out)[k] == t for k, t in finished.items())
    log = [json.loads(line) for line in (out / "run_log.jsonl").read_text().splitlines()]
    ran = [r["stage"] for r in log if r["event"] == "ran"]
    assert sorted(ran) == sorted(run.STAGES)  # every stage ran exactly once
    assert [r["stage"] for r in log if r["event"] == "failed"] == ["synthesize"]
    check_outputs(out)
    check_protocol(out)

    # 4. Nothing left to do; a changed finished stage is refused, naming the setting.
    again = run.main(cfg)
    assert again.ran == [] and again.skipped == list(run.STAGES)
    changed = dataclasses.replace(cfg, concept=dataclasses.replace(cfg.concept, steps=3))
    with pytest.raises(ValueError, match="concept.*steps"):
        run.main(changed)

    # 5. The saved config reproduces the run's config exactly.
    saved = load_config_json(run.RunConfig, out / "run_config.json")
    assert saved == run.resolve_run_config(cfg)

    # 6. The real mode's wiring: --ckpt (here the demo's prior file), --data and --free, no data or
    #    prior stage, resolution from the checkpoint (64 px, from its metadata).
    real_out = tmp_path / "real"
    real = dataclasses.replace(cfg, out=str(real_out), resolution=0, ckpt=str(out / "prior" / "prior.safetensors"),
                               data=str(out / "data" / "annotations.json"), free=str(out / "data" / "free"),
                               tables=("3",))
    result = run.main(real)
    assert result.ran == ["split", "concept", "condition", "synthesize", "condition_inpaint", "diversity_ours",
                          "diversity_inpaint", "evaluate"]
    sadf = json.loads((real_out / "sadf" / "sadf.json").read_text())
    assert len(sadf["images"]) == 3 * 2 and {im["height"] for im in sadf["images"]} == {64}
    assert "embedded demo" not in (real_out / "report.md").read_text()


def test_flags_config_file_and_modes(tmp_path):
    cfg, print_only = run.config_from_argv(["--out", str(tmp_path / "a"), "--seed", "3", "--print-config"])
    assert print_only and cfg.out == str(tmp_path / "a") and cfg.seed == 3 and cfg.demo
    resolved = run.resolve_run_config(cfg)
    assert resolved.concept == run.demo_stage_configs()["concept"] and resolved.resolution == 128
    path = tmp_path / "cfg.json"
    run.save_config_json(dataclasses.replace(resolved, seed=5, prior_images=7), path)
    loaded, _ = run.config_from_argv(["--config", str(path), "--out", str(tmp_path / "b")])
    assert loaded.seed == 5 and loaded.prior_images == 7 and loaded.out == str(tmp_path / "b")

    # The real mode takes the stage scripts' (the paper's) defaults and plans no data or prior stage.
    real = run.resolve_run_config(run.RunConfig(out=str(tmp_path / "r"), ckpt="sd.safetensors", data="d.json",
                                                free="free/"))
    assert real.concept == ConceptConfig() and real.condition == ConditionConfig() and real.resolution == 0
    stages = {s.name: s for s in run.plan(real)}
    assert list(stages) == [s for s in run.STAGES if s not in ("data", "prior")]
    assert stages["concept"].config.ckpt == "sd.safetensors" and stages["concept"].config.resume == "latest"
    assert stages["synthesize"].config.free == "free" and stages["evaluate"].config.feature_extractor == "inception"
    assert stages["split"].config.data == "d.json" and stages["split"].config.fractions == (0.8, 0.1, 0.1)
    train, small = str(tmp_path / "r" / "splits" / "train.json"), str(tmp_path / "r" / "splits" / "train_small.json")
    assert stages["concept"].config.data == stages["condition"].config.data == train
    assert stages["synthesize"].config.masks == train and stages["evaluate"].config.data == train
    assert stages["evaluate"].config.test == str(tmp_path / "r" / "splits" / "test.json")
    assert stages["concept_small"].config.data == stages["condition_small"].config.data == small
    assert stages["concept_small"].config.steps == real.concept.steps  # real mode: the main settings
    assert stages["condition_no_concept"].config.ckpt == "sd.safetensors"
    assert stages["condition_inpaint"].config.condition == "inpaint"
    assert stages["condition_inpaint"].config.ckpt == stages["condition"].config.ckpt
    # --tables picks the stages; --test replaces the test split.
    only = run.plan(run.resolve_run_config(dataclasses.replace(real, tables=("1",), test="t.json")))
    assert [s.name for s in only] == ["split", "concept", "condition", "synthesize", "evaluate"]
    assert only[0].config.test == "t.json" and only[-1].config.tables == ("1",)
    with pytest.raises(ValueError, match="--tables"):
        run.resolve_run_config(dataclasses.replace(real, tables=("5",)))
    with pytest.raises(ValueError, match="--split"):
        run.resolve_run_config(dataclasses.replace(real, split=(0.8, 0.2)))
    with pytest.raises(ValueError, match="--free"):
        run.resolve_run_config(run.RunConfig(ckpt="sd.safetensors", data="d.json"))

    # The demo plans every stage, wiring each stage's output into the next.
    demo = run.plan(run.resolve_run_config(run.RunConfig(out=str(tmp_path / "d"))))
    names = {s.name: s for s in demo}
    assert list(names) == list(run.STAGES)
    assert names["concept"].config.ckpt == str(tmp_path / "d" / "prior" / "prior.safetensors")
    assert names["condition"].config.ckpt == str(tmp_path / "d" / "concept" / "concept.safetensors")
    assert names["synthesize"].config.control == str(tmp_path / "d" / "condition" / "control.safetensors")
    assert names["prior"].config.caption == "an image of a metal surface"
    assert names["evaluate"].config.feature_extractor == "pixels"
    demo_cfg = run.resolve_run_config(run.RunConfig())
    assert names["concept_small"].config.steps == round(demo_cfg.concept.steps * run.DEMO_EXTRA_STEPS["concept"])
    assert names["concept_small"].config.class_dir == str(tmp_path / "d" / "concept" / "class_images")


def test_split_stage_with_your_own_test_set(tmp_path):
    """--test: the annotated set is split into train / val only, images also in the test set are
    left out, and splits.json lists file names as the source COCO writes them."""
    from data.coco import save_coco
    from data.demo import make_demo_dataset
    from defectsynth.splits import SplitConfig, make_splits

    make_demo_dataset(DemoConfig(out=str(tmp_path / "d"), size=64, num_defective=12, num_free=3), progress=False)
    data = load_coco(tmp_path / "d" / "annotations.json", check_images=False, progress=False)
    first = {image["id"] for image in data["images"][:3]}
    test = {**data, "images": data["images"][:3], "annotations": [a for a in data["annotations"] if a["image_id"] in first]}
    save_coco(test, tmp_path / "test.json")
    cfg = SplitConfig(data=str(tmp_path / "d" / "annotations.json"), free=str(tmp_path / "d" / "free.json"),
                      out=str(tmp_path / "splits"), listing=str(tmp_path / "splits.json"),
                      test=str(tmp_path / "test.json"), diversity_conditions=2)
    listing = make_splits(cfg)
    test_names = {Path(i["file_name"]).name for i in test["images"]}
    assert listing["info"]["excluded_as_in_test"] == 3 and listing["info"]["sizes"]["test"] == 3
    assert {Path(n).name for n in listing["test"]} == test_names
    for name in ("train", "val", "train_small"):
        assert not names_of(tmp_path / "splits" / f"{name}.json") & test_names, name
    assert listing["info"]["sizes"]["train"] + listing["info"]["sizes"]["val"] == 9
    raw = json.loads((tmp_path / "d" / "annotations.json").read_text())
    assert set(listing["train"]) <= {im["file_name"] for im in raw["images"]}  # as the source COCO names them
    assert len(json.loads((tmp_path / "splits" / "free_diversity.json").read_text())["images"]) == 2


def test_threads_auto():
    assert run.pick_threads(3) == 3
    assert 1 <= run.pick_threads(0) <= (__import__("os").cpu_count() or 1)
