"""Issue 15, runs: a training stage never overwrites or mixes a run by accident, checks its inputs
before OUT changes, resumes a moved run folder, skips a damaged checkpoint, reports a full disk,
and class images belong to the base model that drew them."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

import train.checkpoint as ckpt
from defectsynth.errors import UserError
from model.stable_diffusion import StableDiffusion, preset
from train import concept, condition, prior
from train.concept import CLASS_MANIFEST, ConceptConfig
from weights import save_ldm

pytestmark = pytest.mark.usefixtures("one_thread")


def concept_config(data: Path, out: Path, **overrides) -> ConceptConfig:
    base = dict(preset="tiny", random_weights=True, data=str(data), out=str(out), steps=2, batch_size=1,
                num_class_images=1, class_steps=1, class_batch_size=1, log_every=1, checkpoint_every=1,
                keep_last=1, validate_every=0, num_validation_images=0, progress=False, lr=1e-4,
                precision="fp32", device="cpu")
    base.update(overrides)
    return ConceptConfig(**base)


def concept_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--random-weights", "--data", str(data), "--out", str(out), "--steps", "2",
            "--batch-size", "1", "--num-class-images", "1", "--class-steps", "1", "--checkpoint-every", "1",
            "--keep-last", "1", "--validate-every", "0", "--num-validation-images", "0", "--no-progress",
            "--precision", "fp32", "--device", "cpu", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: 'nothing changed' compares two snapshots."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def finished_run(demo_data, tmp_path_factory) -> Path:
    """A finished 2-step concept run (checkpoint every step, keep 1)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    concept.main(concept_config(demo_data, out))
    return out


def test_rerun_without_resume_is_refused_and_changes_nothing(demo_data, finished_run, capsys):
    # Before: exit 0, metrics.jsonl and config.json replaced, the new run's checkpoint pruned at once.
    before = snapshot(finished_run)
    assert concept.cli(concept_argv(demo_data, finished_run)) == 2
    line = one_line(capsys)
    assert line.startswith("defectsynth concept: ") and str(finished_run) in line
    assert "already holds a run" in line and "--resume latest" in line and "--overwrite" in line
    assert snapshot(finished_run) == before


def test_overwrite_moves_the_old_run_aside_and_says_so(demo_data, finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    old_metrics = (out / "metrics.jsonl").read_bytes()
    concept.main(concept_config(demo_data, out, steps=1, overwrite=True))
    said = capsys.readouterr().out
    archived = list((out / ckpt.ARCHIVE).iterdir())
    assert len(archived) == 1 and "--overwrite: moved the previous run" in said and str(archived[0]) in said
    assert (archived[0] / "metrics.jsonl").read_bytes() == old_metrics
    assert (archived[0] / "checkpoints" / "step_00000002").is_dir()
    # The new run's own checkpoint survives (pruning sees only this run's checkpoints).
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000001"]
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_prior_and_condition_refuse_a_used_out_before_loading(demo_data, finished_run, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "config.json").write_text("{}\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(out)
    assert condition.cli(["--random-weights", "--preset", "tiny", "--data", str(demo_data), "--out", str(out)]) == 2
    assert "already holds a run" in one_line(capsys)
    assert prior.cli(["--data", str(demo_data / "annotations.json"), "--out", str(out)]) == 2
    assert "already holds a run" in one_line(capsys)
    assert snapshot(out) == before


@pytest.mark.parametrize("stage", ["concept", "condition"])
def test_bad_data_is_refused_before_anything_is_written(stage, demo_data, finished_run, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [], "categories": [}')
    fresh = tmp_path / "fresh"
    argv = ["--random-weights", "--preset", "tiny", "--data", str(bad), "--out", str(fresh), "--no-progress"]
    cli = concept.cli if stage == "concept" else condition.cli
    assert cli(argv) == 2
    assert str(bad) in one_line(capsys)
    assert not fresh.exists()  # before: class images (concept) were drawn and config.json written first
    # A resumed run with bad --data leaves its config.json alone (before: overwritten first).
    before = snapshot(finished_run)
    if stage == "concept":
        assert concept.cli(concept_argv(bad, finished_run, "--resume", "latest")) == 2
        assert str(bad) in one_line(capsys)
        assert snapshot(finished_run) == before


def test_a_moved_run_folder_resumes(demo_data, finished_run, tmp_path):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished_run, moved)  # config and checkpoints hold the old absolute out/class_dir
    result = concept.main(concept_config(demo_data, moved, steps=3, resume="latest"))
    assert [r["step"] for r in result.history] == [3]


def test_damaged_checkpoint_is_named_and_skipped(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    concept.main(concept_config(demo_data, out, keep_last=0))
    root = out / "checkpoints"
    newest = root / "step_00000002" / ckpt.WEIGHTS_FILE
    data = bytearray(newest.read_bytes())
    data[8:24] = b"\xff" * 16  # a damaged header, same size: the COMPLETE marker still matches
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    assert ckpt.resolve_resume(root, "latest").name == "step_00000001"
    assert str(newest) in capsys.readouterr().out
    with pytest.raises(UserError, match="step_00000002.*damaged"):
        ckpt.resolve_resume(root, str(root / "step_00000002"))
    with pytest.raises(UserError, match="step_00000002.*damaged checkpoint"):
        ckpt.load_checkpoint(root / "step_00000002")


def test_disk_full_names_the_path_and_stale_saves_are_cleared(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    stale = root / ".step_00000007.tmp"
    stale.mkdir(parents=True)
    (stale / "weights.safetensors").write_bytes(b"\0" * 1000)
    weights = {"w": torch.zeros(1000, 1000)}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(UserError, match=r"disk full while writing .*\.step_00000003\.tmp \(needed about 12 MB"):
        ckpt.save_checkpoint(root, 3, weights, {"step": 3}, {"a": 1})
    assert not stale.exists() and list(root.iterdir()) == []  # the stale save is gone, the failed one too
    monkeypatch.undo()
    ckpt.save_checkpoint(root, 3, weights, {"step": 3}, {"a": 1})
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000003"]


def save_tiny(path: Path, seed: int, blank: bool = False) -> Path:
    torch.manual_seed(seed)
    model = StableDiffusion(preset("tiny"))
    if blank:  # a broken base model: its VAE decodes every latent to one flat colour
        with torch.no_grad():
            model.vae.decoder.conv_out.weight.zero_()
    return save_ldm(model, path)


def test_class_images_are_redrawn_for_another_base_model(demo_data, tmp_path, capsys):
    class_dir = tmp_path / "class_images"
    first = save_tiny(tmp_path / "a.safetensors", 1)
    second = save_tiny(tmp_path / "b.safetensors", 2)
    config = dict(random_weights=False, class_dir=str(class_dir), steps=1, checkpoint_every=0)
    concept.main(concept_config(demo_data, tmp_path / "a", ckpt=str(first), **config))
    drawn = (class_dir / "000000.png").read_bytes()
    manifest = json.loads((class_dir / CLASS_MANIFEST).read_text())
    assert manifest["prompt"] == "an image of a metal surface" and manifest["steps"] == 1
    capsys.readouterr()
    # Before: reused whatever made them (same sha1), without a word.
    concept.main(concept_config(demo_data, tmp_path / "b", ckpt=str(second), **config))
    assert "drawn with other settings (the base model weights)" in capsys.readouterr().out
    assert (class_dir / "000000.png").read_bytes() != drawn
    assert json.loads((class_dir / CLASS_MANIFEST).read_text())["base_model"] != manifest["base_model"]
    # The same model again: reused as they are.
    redrawn = (class_dir / "000000.png").read_bytes()
    concept.main(concept_config(demo_data, tmp_path / "c", ckpt=str(second), **config))
    assert (class_dir / "000000.png").read_bytes() == redrawn


def test_blank_class_images_are_refused(demo_data, tmp_path, capsys):
    broken = save_tiny(tmp_path / "broken.safetensors", 1, blank=True)
    out = tmp_path / "run"
    assert concept.cli(concept_argv(demo_data, out, "--no-random-weights", "--ckpt", str(broken))) == 2
    line = one_line(capsys)
    assert "class images" in line and "blank" in line and "inspect" in line
    assert not (out / "checkpoints").exists()
