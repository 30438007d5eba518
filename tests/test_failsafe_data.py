"""Issue 15, data and generation: import refuses an empty result, the COCO validator's new checks
keep valid data valid, and generate streams, warns about a stretched hint and fails when nothing
usable was written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sample.generate as generate_module
from data.coco import CocoError, validate_coco
from data.importers import ImportConfig, main as import_main
from defectsynth.cli import main as defectsynth
from sample.generate import GenerateConfig, main as generate_main

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("defectsynth")]
    assert len(lines) == 1, lines
    return lines[0]


def test_import_with_images_but_no_annotations_is_refused(demo_data, tmp_path, capsys):
    root = tmp_path / "flat"
    root.mkdir()
    (root / "a.png").write_bytes((demo_data / "images" / "defect_0000.png").read_bytes())
    out = tmp_path / "coco.json"
    argv = ["import", "--format", "class-index", "--classes", "crack", "--missing-mask", "empty",
            "--mask-template", "masks/{stem}.png", "--root", str(root), "--out", str(out)]
    assert defectsynth(argv) == 2
    line = one_line(capsys)
    assert "1 images but no annotations" in line and "--format images" in line and not out.exists()
    # The same folder as plain images (no annotations expected) imports.
    coco = import_main(ImportConfig(format="images", root=str(root), out=str(out)))
    assert len(coco["images"]) == 1 and out.is_file()


def test_valid_records_still_validate(demo_data):
    coco = json.loads((demo_data / "annotations.json").read_text())
    validate_coco(coco, image_root=demo_data)
    img = coco["images"][0]
    ann = next(a for a in coco["annotations"] if a["image_id"] == img["id"])
    # A box ending exactly on the border, a missing area (computed) and a missing iscrowd pass.
    ann["bbox"] = [0.0, 0.0, float(img["width"]), float(img["height"])]
    del ann["area"], ann["iscrowd"]
    checked = validate_coco(coco, image_root=demo_data)
    done = next(a for a in checked["annotations"] if a["id"] == ann["id"])
    assert done["area"] > 0 and done["iscrowd"] == 0
    ann["bbox"] = [0.0, 0.0, img["width"] + 1.0, float(img["height"])]
    with pytest.raises(CocoError, match=f"annotation id={ann['id']}.*outside"):
        validate_coco(coco, image_root=demo_data)


def tiny_generate(out, **overrides) -> GenerateConfig:
    values = dict(random_weights=True, preset="tiny", prompt="x", steps=1, num=3, batch=2, out=str(out),
                  progress=False, device="cpu", dtype="fp32")
    values.update(overrides)
    return GenerateConfig(**values)


def test_generate_streams_with_lazy_seeds_and_a_bounded_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "SEEDS_LISTED", 2)
    monkeypatch.setattr(generate_module, "GRID_MAX", 2)
    on_disk_at_grid = []
    real = generate_module.write_image_atomic

    def write(path, array):
        if path.name == "grid.png":
            on_disk_at_grid.extend(sorted(p.name for p in path.parent.glob("0*.png")))
        real(path, array)
    monkeypatch.setattr(generate_module, "write_image_atomic", write)
    result = generate_main(tiny_generate(tmp_path / "o"))
    record = json.loads((tmp_path / "o" / "generate.json").read_text())
    assert "seeds" not in record and record["seed_rule"] == "derive_seed(seed, 'sample', i)"
    assert len(result.seeds) == 3 and result.seeds[2] == generate_module.derive_seed(0, "sample", 2)
    assert [p.name for p in result.images] == ["000000.png", "000001.png", "000002.png"] and result.usable == 3
    # every image is on disk before the grid (of the first GRID_MAX only) is made
    assert on_disk_at_grid == ["000000.png", "000001.png", "000002.png"]
    from data.images import read_image
    assert read_image(result.grid).shape == (2 + 2 * (64 + 2), 2 + 64 + 2, 3)  # the first 2 images only


def test_generate_with_nothing_usable_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate_module, "generate", lambda sd, prompt, seeds, **k: torch.full((len(seeds), 3, 64, 64), 0.0))
    with pytest.raises(ValueError, match="none of the 3 images"):
        generate_main(tiny_generate(tmp_path / "o"))
    assert defectsynth(["generate", "--random-weights", "--preset", "tiny", "--steps", "1", "--num", "2",
                        "--out", str(tmp_path / "p"), "--no-progress", "--device", "cpu"]) == 2
    assert "none of the 2 images" in one_line(capsys)


def test_a_hint_of_another_aspect_ratio_warns(tmp_path, capsys):
    from data.files import write_image_atomic
    from sample.generate import read_hint

    hint = tmp_path / "wide.png"
    write_image_atomic(hint, np.zeros((64, 128, 3), np.uint8))
    assert read_hint(str(hint), 64, 64).shape == (1, 3, 64, 64)
    err = capsys.readouterr().err
    assert "stretched" in err and "128x64" in err and str(hint) in err
    write_image_atomic(hint, np.zeros((32, 32, 3), np.uint8))
    read_hint(str(hint), 64, 64)  # same aspect ratio: resized silently
    assert "stretched" not in capsys.readouterr().err


def test_disk_full_anywhere_names_the_file(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing an image (generate) or a weights file (convert): one line naming the file
    and about how much it needed, exit 2 (before: a raw OSError / safetensors error)."""
    import errno
    import pathlib

    import safetensors.torch

    real_write = pathlib.Path.write_bytes

    def full(self, data):
        if ".png." in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    assert defectsynth(["generate", "--random-weights", "--preset", "tiny", "--steps", "1", "--num", "1",
                        "--out", str(tmp_path / "g"), "--no-progress", "--device", "cpu"]) == 2
    line = one_line(capsys)
    assert f"disk full while writing {tmp_path / 'g' / '000000.png'} (needed about 1 MB" in line
    monkeypatch.undo()

    from model.stable_diffusion import StableDiffusion, preset
    from weights import save_ldm
    src = save_ldm(StableDiffusion(preset("tiny")), tmp_path / "src.safetensors")

    def no_space(*args, **kwargs):
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    dst = tmp_path / "dst.safetensors"
    assert defectsynth(["convert", str(src), str(dst)]) == 2
    assert f"disk full while writing {dst} (needed about" in one_line(capsys) and not dst.exists()


def test_synthesize_reports_images_written_not_drawn(tmp_path, monkeypatch, capsys):
    """--max-images with every drawn image dropped: the summary says 0 written (before: '4 new images')."""
    import sample.sadf_inputs as sadf_inputs
    from data.demo import DemoConfig, make_demo_dataset
    from sample.synthesize import SynthesizeConfig, main as synthesize_main

    demo = tmp_path / "demo"
    make_demo_dataset(DemoConfig(out=str(demo), size=64, num_defective=2, num_free=2, seed=0), progress=False)
    monkeypatch.setattr(sadf_inputs, "generate", lambda *a, seeds, **k: torch.full((len(seeds), 3, 64, 64), 0.5))
    cfg = SynthesizeConfig(random_weights=True, preset="tiny", free=str(demo / "free.json"),
                           masks=str(demo / "annotations.json"), out=str(tmp_path / "sadf"), variants=0,
                           samples_per_driver=2, steps=1, batch=2, retries=0, max_images=2, resolution=64,
                           device="cpu", progress=False)
    result = synthesize_main(cfg)
    assert (result.generated, result.dropped) == (2, 2)
    assert "0 new images written (0 guard redraws, 2 dropped)" in capsys.readouterr().out


def test_model_hash_cache_sees_a_file_replaced_within_one_clock_tick(tmp_path):
    """A model file swapped (atomic rename) for another of the same size and the same mtime is hashed
    again: the cache key holds the inode (before: size + mtime only, so a fast swap kept the old hash)."""
    import os

    from sample.records import file_sha256

    path, other = tmp_path / "model.safetensors", tmp_path / "other.safetensors"
    path.write_bytes(b"a" * 64)
    other.write_bytes(b"b" * 64)
    cache: dict = {}
    first = file_sha256(path, cache)
    stat = path.stat()
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same tick of a coarse clock
    os.replace(other, path)
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    assert file_sha256(path, cache) != first
