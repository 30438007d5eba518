"""Issue 15, the one error path: malformed model files, COCO files, images and flags given to the
real CLIs each give exit 2 and ONE line `defectsynth <stage>: ...` naming the file or field, never
a traceback, never exit 0, and nothing written to OUT. In-process calls of the dispatcher (fast),
plus real subprocesses for the entry points themselves."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from defectsynth.cli import main as defectsynth
from model.stable_diffusion import StableDiffusion, preset
from weights import save_ldm

ROOT = Path(__file__).resolve().parents[1]
UNET = "model.diffusion_model."
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_data):
    """Every malformed input of the cases below, made once."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    good = save_ldm(StableDiffusion(preset("tiny")), root / "good.safetensors")
    tensors = load_file(str(good))
    with safe_open(str(good), "pt") as handle:
        metadata = handle.metadata()

    def variant(name, change):
        copy_ = {k: v.clone() for k, v in tensors.items()}
        change(copy_)
        save_file(copy_, str(root / name), metadata=metadata)
        return root / name

    f = {"good": good, "demo": demo_data}
    f["nan"] = variant("nan.safetensors", lambda t: t[UNET + "out.2.weight"].fill_(float("nan")))
    f["inf"] = variant("inf.safetensors", lambda t: t["first_stage_model.decoder.conv_out.bias"].fill_(float("inf")))
    f["int"] = variant("int.safetensors", lambda t: t.__setitem__(UNET + "out.2.bias", t[UNET + "out.2.bias"].long()))
    f["missing_key"] = variant("missing.safetensors", lambda t: t.pop(UNET + "out.2.bias"))
    (root / "empty.safetensors").write_bytes(b"")
    f["empty"] = root / "empty.safetensors"
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    f["garbage"] = root / "garbage.safetensors"
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    f["truncated"] = root / "truncated.safetensors"
    (root / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64
                                          + "\nsize 4265146304\n")
    f["lfs"] = root / "lfs.safetensors"
    (root / "text.ckpt").write_text("this is not a checkpoint\n")
    f["text_ckpt"] = root / "text.ckpt"
    import datetime
    torch.save({"state_dict": {"w": torch.zeros(2)}, "when": datetime.date(2024, 1, 1)}, root / "unsafe.ckpt")
    f["unsafe"] = root / "unsafe.ckpt"
    (root / "weights.txt").write_text("x")
    f["txt"] = root / "weights.txt"
    (root / "not_a_model").mkdir()
    f["folder"] = root / "not_a_model"
    # images
    (root / "empty.png").write_bytes(b"")
    f["empty_png"] = root / "empty.png"
    (root / "text.png").write_text("not an image")
    f["text_png"] = root / "text.png"
    # COCO files, written beside the demo's images (relative file names resolve against the JSON)
    coco = json.loads((demo_data / "annotations.json").read_text())

    def bad_coco(name, change):
        data = copy.deepcopy(coco)
        change(data)
        path = demo_data / f"bad_{name}.json"
        path.write_text(json.dumps(data))
        return path

    f["coco_syntax"] = demo_data / "bad_syntax.json"
    f["coco_syntax"].write_text('{"images": [}')
    f["coco_area"] = bad_coco("area", lambda d: d["annotations"][0].__setitem__("area", -1.0))
    f["coco_bbox"] = bad_coco("bbox", lambda d: d["annotations"][1].__setitem__("bbox", [40.0, 40.0, 30.0, 30.0]))
    f["coco_dup"] = bad_coco("dup", lambda d: d["images"][1].__setitem__("file_name", d["images"][0]["file_name"]))
    f["coco_crowd"] = bad_coco("crowd", lambda d: d["annotations"][2].__setitem__("iscrowd", 1))
    f["coco_file"] = bad_coco("file", lambda d: d["images"][3].__setitem__("file_name", "images/nowhere.png"))
    f["coco_cat"] = bad_coco("cat", lambda d: d["annotations"][0].__setitem__("category_id", 99))
    f["coco_top"] = demo_data / "bad_top.json"
    f["coco_top"].write_text("[1, 2, 3]")
    f["coco_size"] = bad_coco("size", lambda d: d["images"][0].__setitem__("width", 65))
    f["coco_image_id"] = bad_coco("image_id", lambda d: d["annotations"][0].__setitem__("image_id", 42))
    # an import root with images at the top and one subfolder (the wrong layout)
    (root / "layout" / "sub").mkdir(parents=True)
    for path in (root / "layout" / "a.png", root / "layout" / "sub" / "b.png"):
        path.write_bytes((demo_data / coco["images"][0]["file_name"]).read_bytes())
    f["layout"] = root / "layout"
    f["root"] = root
    return f


GEN = ["--steps", "1", "--num", "1", "--no-progress", "--device", "cpu", "--dtype", "fp32"]
TINY = ["--random-weights", "--preset", "tiny"]

# (id, stage, argv built from the files, text the one line must contain)
CASES = [
    # model files
    ("missing-file", "inspect", lambda f: [str(f["root"] / "nope.safetensors")], "no such file"),
    ("empty-file", "inspect", lambda f: [str(f["empty"])], "empty.safetensors"),
    ("garbage-header", "inspect", lambda f: [str(f["garbage"])], "not a readable safetensors file"),
    ("lfs-pointer", "inspect", lambda f: [str(f["lfs"])], "git-lfs pointer"),
    ("text-ckpt", "inspect", lambda f: [str(f["text_ckpt"])], "text.ckpt"),
    ("unsafe-pickle", "inspect", lambda f: [str(f["unsafe"])], "refused to unpickle"),
    ("unknown-suffix", "inspect", lambda f: [str(f["txt"])], "unknown weights file type"),
    ("not-a-model-folder", "inspect", lambda f: [str(f["folder"])], "not_a_model"),
    ("nan-generate", "generate", lambda f: ["--ckpt", str(f["nan"]), *GEN], UNET + "out.2.weight"),
    ("inf-vae-generate", "generate", lambda f: ["--ckpt", str(f["inf"]), *GEN], "decoder.conv_out.bias"),
    ("int-generate", "generate", lambda f: ["--ckpt", str(f["int"]), *GEN], "int64"),
    ("missing-key-generate", "generate", lambda f: ["--ckpt", str(f["missing_key"]), *GEN], "out.2.bias"),
    ("truncated-generate", "generate", lambda f: ["--ckpt", str(f["truncated"]), *GEN], "truncated.safetensors"),
    ("lfs-generate", "generate", lambda f: ["--ckpt", str(f["lfs"]), *GEN], "git-lfs pointer"),
    ("nan-convert", "convert", lambda f: [str(f["nan"]), str(f["root"] / "out" / "c.safetensors")], "NaN/inf"),
    ("convert-exists", "convert", lambda f: [str(f["good"]), str(f["nan"])], "--overwrite"),
    ("convert-suffix", "convert", lambda f: [str(f["good"]), str(f["root"] / "out" / "c.bin")], ".safetensors"),
    # flags
    ("num-0", "generate", lambda f: [*TINY, "--num", "0"], "--num"),
    ("height-100", "generate", lambda f: [*TINY, "--height", "100"], "multiples of"),
    ("steps-not-int", "generate", lambda f: [*TINY, "--steps", "abc"], "--steps"),
    ("bad-choice", "generate", lambda f: [*TINY, "--sampler", "bogus"], "--sampler"),
    ("unknown-flag", "generate", lambda f: [*TINY, "--bogus-flag"], "--bogus-flag"),
    ("control-without-hint", "generate", lambda f: [*TINY, "--control", str(f["good"])], "--hint"),
    ("control-missing", "generate", lambda f: [*TINY, "--control", str(f["root"] / "no_control.safetensors"), "--hint",
                                                str(f["demo"] / "images" / "defect_0000.png")], "no_control.safetensors"),
    ("concept-batch-0", "concept", lambda f: [*TINY, "--data", str(f["demo"]), "--batch-size", "0"], "--batch-size"),
    ("condition-drop-rate", "condition", lambda f: [*TINY, "--data", str(f["demo"]), "--drop-prompt-rate", "2"],
     "--drop-prompt-rate"),
    ("evaluate-checkpoint-0", "evaluate", lambda f: ["--checkpoint-every", "0"], "--checkpoint-every"),
    ("evaluate-bad-data", "evaluate", lambda f: ["--data", str(f["coco_area"])], "area must be a number > 0"),
    ("evaluate-no-data-file", "evaluate", lambda f: ["--data", str(f["root"] / "none.json")], "none.json"),
    ("synthesize-no-free", "synthesize", lambda f: [*TINY], "--free"),
    ("prior-no-data", "prior", lambda f: [], "--data"),
    # images
    ("hint-missing", "generate", lambda f: [*TINY, "--control", str(f["good"]), "--hint", str(f["root"] / "no.png")],
     "no.png"),
    ("hint-empty", "generate", lambda f: [*TINY, "--control", str(f["good"]), "--hint", str(f["empty_png"])],
     "empty.png"),
    ("hint-not-image", "generate", lambda f: [*TINY, "--control", str(f["good"]), "--hint", str(f["text_png"])],
     "text.png"),
    # COCO files
    ("coco-syntax", "concept", lambda f: [*TINY, "--data", str(f["coco_syntax"])], "not valid JSON"),
    ("coco-area", "concept", lambda f: [*TINY, "--data", str(f["coco_area"])], "annotation id=1"),
    ("coco-bbox", "concept", lambda f: [*TINY, "--data", str(f["coco_bbox"])], "outside"),
    ("coco-duplicate", "concept", lambda f: [*TINY, "--data", str(f["coco_dup"])], "duplicate file_name"),
    ("coco-iscrowd", "concept", lambda f: [*TINY, "--data", str(f["coco_crowd"])], "iscrowd=1"),
    ("coco-missing-image", "condition", lambda f: [*TINY, "--data", str(f["coco_file"])], "nowhere.png"),
    ("coco-category", "condition", lambda f: [*TINY, "--data", str(f["coco_cat"])], "category_id 99"),
    ("coco-top-level", "concept", lambda f: [*TINY, "--data", str(f["coco_top"])], "top level"),
    ("coco-size", "concept", lambda f: [*TINY, "--data", str(f["coco_size"])], "65x64"),
    ("coco-image-id", "concept", lambda f: [*TINY, "--data", str(f["coco_image_id"])], "image_id 42"),
    ("import-layout", "import", lambda f: ["--root", str(f["layout"])], "--format images"),
    ("import-no-root", "import", lambda f: ["--root", str(f["root"] / "nowhere")], "nowhere"),
]


@pytest.mark.parametrize("name, stage, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_and_exit_2(name, stage, argv, expected, files, tmp_path, capsys):
    out = tmp_path / "OUT"
    args = argv(files)
    if stage not in ("inspect", "convert"):
        args += ["--out", str(out / "x.json") if stage == "import" else str(out)]
    code = defectsynth([stage, *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("defectsynth")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"defectsynth {stage}: ") and expected in lines[0], lines[0]
    assert not out.exists()  # nothing written to OUT
    assert not (files["root"] / "out").exists()


def test_unknown_stage_is_one_line():
    result = subprocess.run([sys.executable, "-m", "defectsynth", "nonsense"], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "unknown stage 'nonsense'" in result.stderr


@pytest.mark.parametrize("entry", [["-m", "defectsynth", "generate"], ["-m", "sample.generate"]])
def test_real_entry_points_print_one_line(entry, files, tmp_path):
    """The same error through a real process: `defectsynth generate` and `python -m sample.generate`."""
    result = subprocess.run([sys.executable, *entry, "--ckpt", str(files["nan"]), "--out", str(tmp_path / "o"), *GEN],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("defectsynth generate: ") and str(files["nan"]) in lines[-1]
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    """Bugs are not expected errors: the wrapper re-raises them."""
    import sample.generate as generate

    def bug(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(generate, "main", bug)
    with pytest.raises(ZeroDivisionError):
        defectsynth(["generate", "--random-weights", "--out", "x"])


def test_the_wrapper_classifies_errors(capsys):
    """UserError and OSError (environment) are one line and exit 2; ENOSPC says disk full; a
    multi-line message is joined into one line; anything else propagates."""
    import errno

    from defectsynth.errors import UserError, command

    def raising(error):
        @command("demo")
        def cli(argv=None):
            raise error
        return cli

    cases = [(UserError("train.concept: a\nb:\nc"), "defectsynth demo: a; b: c"),
             (FileNotFoundError("the FID weights are not on disk"), "defectsynth demo: the FID weights are not on disk"),
             (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"), "defectsynth demo: /x/y: No such file"),
             (OSError(errno.ENOSPC, "No space left on device", "/x/z.png"), "defectsynth demo: disk full while writing /x/z.png")]
    for error, start in cases:
        assert raising(error)() == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(start), (error, err)
    with pytest.raises(KeyError):
        raising(KeyError("bug"))()
