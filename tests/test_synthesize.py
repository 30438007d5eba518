"""sample.synthesize on the tiny preset: 2 defect-free images x 2 variants x 2 samples = 8 images,
batch 3 (so batches straddle pairs and the last one is ragged), a saved tiny checkpoint and a
control with random (non-zero) residual convs, so the hint changes the images.

One uninterrupted run (module fixture) is the reference every other way of running must equal:
resumed after a crash, two shards merged, torchrun with two processes (slow), and any image
regenerated from its record.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample.sadf_inputs as sadf_inputs
from data.coco import load_coco, to_pycocotools
from data.demo import DemoConfig, make_demo_dataset
from data.hints import CONDITION_METADATA_KEY, build_hint
from data.images import read_image
from data.pairing import PairingConfig, SadfPairs
from model.controlnet import ControlNet
from model.unet import UNet, UNetConfig
from sample.pipeline import generate as real_generate
from sample.pipeline import random_pipeline
from sample.records import read_records
from sample.sadf_jobs import job_seed, shard_batches
from sample.synthesize import (SynthesisError, SynthesizeConfig, cli, main, prepare, regenerate,
                               resolve_condition)
from weights import save_control, save_ldm

SEED = 3
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is ~10x cheaper


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthesize")
    make_demo_dataset(DemoConfig(out=str(root / "demo"), size=64, num_defective=4, num_free=2, seed=0), progress=False)
    sd = random_pipeline("tiny", seed=0)
    save_ldm(sd, root / "tuned.safetensors")
    control = ControlNet.from_unet(sd.unet)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a "trained" control: the hint must matter
        for m in [*control.zero_convs, control.middle_block_out, control.input_hint_block[-1]]:
            for p in m.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    save_control(control, root / "control.safetensors")
    return SimpleNamespace(root=root, ckpt=root / "tuned.safetensors", control=root / "control.safetensors",
                           free=root / "demo" / "free.json", masks=root / "demo" / "annotations.json")


def config(inputs, out, **overrides) -> SynthesizeConfig:
    values = dict(ckpt=str(inputs.ckpt), control=str(inputs.control), free=str(inputs.free), masks=str(inputs.masks),
                  out=str(out), variants=2, samples_per_driver=2, steps=2, batch=3, seed=SEED, device="cpu",
                  progress=False, sheet_pairs=2)
    values.update(overrides)
    return SynthesizeConfig(**values)


@pytest.fixture(scope="module")
def reference(inputs):
    out = inputs.root / "reference"
    return out, main(config(inputs, out))


class CountingGenerate:
    """Stands in for sample.pipeline.generate: counts calls and rows, can crash on call `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.rows, self.fail_at = 0, 0, fail_at

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        self.rows += len(kwargs["seeds"])
        return real_generate(*args, **kwargs)


def same_dataset(a: Path, b: Path) -> None:
    """Identical sadf.json and identical image files."""
    coco_a, coco_b = (json.loads((p / "sadf.json").read_text()) for p in (a, b))
    assert coco_a == coco_b
    for img in coco_a["images"]:
        assert (a / img["file_name"]).read_bytes() == (b / img["file_name"]).read_bytes(), img["file_name"]


def exact_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


# ----------------------------------------------------------------------------------------------
# The job list
# ----------------------------------------------------------------------------------------------

def test_job_list_is_fixed_and_shards_are_disjoint():
    everything = [j for b in shard_batches(40, 8, 0, 1, samples_per_driver=15) for j in b]
    assert [j.index for j in everything] == list(range(40))
    assert (everything[17].pair_id, everything[17].sample_index, everything[17].image_id) == (1, 2, 18)
    shards = [[j.index for b in shard_batches(40, 8, s, 3, 15) for j in b] for s in range(3)]
    assert sorted(sum(shards, [])) == list(range(40)) and not set(shards[0]) & set(shards[1])
    assert shards[1][:8] == list(range(8, 16))  # whole batches, round robin
    seeds = {job_seed(0, p, s, a) for p in range(20) for s in range(15) for a in range(3)}
    assert len(seeds) == 20 * 15 * 3 and job_seed(0, 1, 2) == job_seed(0, 1, 2)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------

def test_end_to_end_coco_masks_metadata_and_regeneration(inputs, reference):
    out, result = reference
    assert result.coco == out / "sadf.json" and result.generated == 8 and result.dropped == 0
    coco = to_pycocotools(load_coco(out / "sadf.json"))  # validates, decodes every image file
    assert len(coco.imgs) == 8 and (out / "contact_sheet.png").is_file()
    annotated = load_coco(inputs.masks, progress=False)
    assert coco.dataset["categories"] == annotated["categories"]

    # The annotations are the data layer's perturbed masks of each pair, pixel for pixel.
    pairs = SadfPairs(load_coco(inputs.free, progress=False), annotated, PairingConfig(resolution=64, variants=2),
                      seed=SEED)
    conditions = {}
    for image_id, img in coco.imgs.items():
        pair = pairs.build(img["pair_id"])
        assert img["condition_id"] == img["pair_id"] == (image_id - 1) // 2
        assert img["sample_index"] == (image_id - 1) % 2
        assert img["seed"] == job_seed(SEED, img["pair_id"], img["sample_index"]) and img["prompt"] == pair.prompt
        anns = sorted(coco.imgToAnns[image_id], key=lambda a: a["id"])
        assert len(anns) == len(pair.instances) > 0
        for ann, (mask, category_id) in zip(anns, pair.instances):
            decoded = coco.annToMask(ann)
            assert np.array_equal(decoded, mask != 0) and ann["category_id"] == category_id
            assert ann["area"] == float(mask.sum()) == float(mask_utils.area(ann["segmentation"]))
            assert ann["bbox"] == exact_bbox(mask)
        assert read_image(out / img["file_name"]).shape == (64, 64, 3)
        conditions.setdefault(img["pair_id"], []).append(read_image(out / img["file_name"]))
    assert all(np.abs(a.astype(int) - b).max() > 10 for a, b in conditions.values())  # two seeds, two images

    # Any image comes back bit for bit from its record: the middle of a batch that spans two pairs,
    # and the ragged last batch, via the function (loads and hash-checks the model) and the CLI.
    record = read_records(out)[5]
    assert record["call"]["row"] == 1 and [r[0] for r in record["call"]["rows"]] == [1, 2, 2]
    assert record["models"]["ckpt"] == json.loads((out / "synthesize.json").read_text())["models"]["ckpt"]
    assert np.array_equal(regenerate(out, 5, device="cpu"), read_image(out / record["file_name"]))
    assert cli(["--out", str(out), "--regenerate", "8", "--device", "cpu"]) == 0
    name = read_records(out)[8]["file_name"]
    assert np.array_equal(read_image(out / "regenerated" / Path(name).name), read_image(out / name))


def test_crash_and_budget_then_rerun_equals_uninterrupted_run(inputs, reference, monkeypatch):
    out = inputs.root / "resumed"
    first = main(config(inputs, out, max_images=3))  # a budget: one batch of 3, no COCO yet
    assert first.generated == 3 and first.coco is None and not (out / "sadf.json").exists()
    crash = CountingGenerate(fail_at=2)
    monkeypatch.setattr(sadf_inputs, "generate", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(config(inputs, out))  # batch 2 finishes, batch 3 dies
    finished = read_records(out)
    assert sorted(finished) == [1, 2, 3, 4, 5, 6] and not list((out / "images").glob(".*"))  # no temporaries left
    # Finished images are never rewritten: same inode (writes go to a temporary name, then rename) and bytes.
    kept = {p.name: (p.stat().st_ino, p.read_bytes()) for p in (out / "images").iterdir()}
    counting = CountingGenerate()
    monkeypatch.setattr(sadf_inputs, "generate", counting)
    result = main(config(inputs, out))
    assert (counting.calls, counting.rows, result.generated, result.skipped) == (1, 2, 2, 6)
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in (out / "images").iterdir() if p.name in kept} == kept
    same_dataset(out, reference[0])
    again = CountingGenerate()
    monkeypatch.setattr(sadf_inputs, "generate", again)
    assert main(config(inputs, out)).generated == 0 and again.calls == 0  # idempotent
    same_dataset(out, reference[0])


def test_two_shards_merged_equal_one_process(inputs, reference):
    out = inputs.root / "sharded"
    second = main(config(inputs, out, shard=1, num_shards=2))
    assert second.coco is None and sorted(read_records(out)) == [4, 5, 6]  # batch 1 of batches 0, 1, 2
    first = main(config(inputs, out, shard=0, num_shards=2))
    assert first.generated == 5 and first.coco == out / "sadf.json"  # the last shard to finish merges
    same_dataset(out, reference[0])
    (out / "sadf.json").unlink()
    assert main(SynthesizeConfig(out=str(out), merge_only=True)).coco == out / "sadf.json"
    same_dataset(out, reference[0])


@pytest.mark.slow
def test_torchrun_two_processes_match(inputs, reference):
    out = inputs.root / "torchrun"
    args = ["--ckpt", str(inputs.ckpt), "--control", str(inputs.control), "--free", str(inputs.free), "--masks",
            str(inputs.masks), "--out", str(out), "--variants", "2", "--samples-per-driver", "2", "--steps", "2",
            "--batch", "3", "--seed", str(SEED), "--device", "cpu", "--no-progress", "--sheet-pairs", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sample.synthesize", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert sorted(p.name for p in (out / "records").iterdir()) == ["shard-000-of-002.jsonl", "shard-001-of-002.jsonl"]
    ours, theirs = (json.loads((p / "sadf.json").read_text()) for p in (out, reference[0]))
    assert ours == theirs
    for img in ours["images"]:  # another process: at most the last-bit kernel differences
        a, b = (read_image(p / img["file_name"]).astype(int) for p in (out, reference[0]))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-2


# ----------------------------------------------------------------------------------------------
# Validation before sampling
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_stop_before_any_sampling(inputs, reference, tmp_path, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")
    monkeypatch.setattr(sadf_inputs, "generate", no_sampling)

    folder = tmp_path / "free"
    folder.mkdir()
    (folder / "good.png").write_bytes((inputs.root / "demo" / "free" / "free_0000.png").read_bytes())
    (folder / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(SynthesisError, match=r"--free .*broken\.png"):
        main(config(inputs, tmp_path / "a", free=str(folder)))

    empty = json.loads(inputs.masks.read_text())
    empty["annotations"] = []
    (inputs.root / "demo" / "empty.json").write_text(json.dumps(empty))  # beside its images
    with pytest.raises(SynthesisError, match="--masks .*no annotations"):
        main(config(inputs, tmp_path / "b", masks=str(inputs.root / "demo" / "empty.json")))

    save_control(ControlNet.from_unet(UNet(UNetConfig.tiny_sd2())), tmp_path / "sd2_control.safetensors")
    with pytest.raises(SynthesisError, match="does not fit .*use_linear_proj"):
        main(config(inputs, tmp_path / "c", control=str(tmp_path / "sd2_control.safetensors")))

    with pytest.raises(SynthesisError, match="other settings .*steps"):
        main(config(inputs, reference[0], steps=3))  # the reference folder was made with 2
    assert not (tmp_path / "a" / "images").exists()


def test_condition_from_the_control_record(inputs, tmp_path):
    path = tmp_path / "inpaint_control.safetensors"
    with safe_open(str(inputs.control), framework="pt") as handle:
        metadata = dict(handle.metadata())
    record = {"condition": "inpaint", "driver": {"background_level": 40}, "prompt": {"token": "zwx"},
              "only_mid_control": False}
    save_file(load_file(str(inputs.control)), str(path), {**metadata, CONDITION_METADATA_KEY: json.dumps(record)})
    resolved = resolve_condition(config(inputs, tmp_path, control=str(path)))
    assert (resolved["hint"], resolved["driver"].background_level, resolved["prompt"].token) == ("inpaint", 40, "zwx")
    with pytest.raises(SynthesisError, match="trained with condition 'inpaint'"):
        resolve_condition(config(inputs, tmp_path, control=str(path), condition="driver"))
    assert resolve_condition(config(inputs, tmp_path))["hint"] == "driver"  # no record: the driver

    # The inpainting hint of a pair is the pair's image with its masks painted, as training saw it.
    run = prepare(config(inputs, tmp_path / "out", control=str(path), resolution=64), torch.device("cpu"),
                  torch.float32, load=False)
    pair = run.builder.pairs.build(1)
    assert pair.prompt.startswith("an image of a zwx")
    expected = build_hint("inpaint", pair.image, pair.instances, run.builder.pairs.config.driver)
    assert torch.equal(run.builder(1).hint, expected)


# ----------------------------------------------------------------------------------------------
# The guard
# ----------------------------------------------------------------------------------------------

def fake_images(seeds, nan_seeds=(), blank=False) -> torch.Tensor:
    rows = []
    for seed in seeds:
        row = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed % 2 ** 31))
        rows.append(torch.full_like(row, 0.5) if blank else row * float("nan") if seed in nan_seeds else row)
    return torch.stack(rows)


def test_guard_retries_with_a_derived_seed_then_drops(inputs, tmp_path, monkeypatch):
    bad = job_seed(SEED, 1, 0)  # the first draw of pair 1, sample 0 is NaN
    monkeypatch.setattr(sadf_inputs, "generate", lambda *a, seeds, **k: fake_images(seeds, nan_seeds={bad}))
    out = tmp_path / "retry"
    result = main(config(inputs, out))
    assert (result.retried, result.dropped) == (1, 0)
    record = read_records(out)[3]
    assert record["attempt"] == 1 and record["seed"] == job_seed(SEED, 1, 0, attempt=1)
    assert record["rejected"] == [{"seed": bad, "reason": "non-finite"}] and record["call"] == {
        "rows": [[1, 0, record["seed"]]], "row": 0}
    assert np.array_equal(regenerate(out, 3, device="cpu"), read_image(out / record["file_name"]))

    monkeypatch.setattr(sadf_inputs, "generate", lambda *a, seeds, **k: fake_images(seeds, blank=True))
    out = tmp_path / "blank"
    smoke = dict(ckpt="", control="", random_weights=True, preset="tiny", resolution=64)  # fresh zero control
    # Every image dropped: exit 2 with the count, no (empty) sadf.json (issue 15; it was written before).
    with pytest.raises(SynthesisError, match="all 8 images were dropped by the guard"):
        main(config(inputs, out, retries=1, **smoke))
    assert not (out / "sadf.json").exists()
    assert all(r["status"] == "dropped" and len(r["rejected"]) == 2 and "blank" in r["rejected"][0]["reason"]
               for r in read_records(out).values())
    with pytest.raises(SynthesisError, match="dropped by the guard"):
        regenerate(out, 1, device="cpu")
