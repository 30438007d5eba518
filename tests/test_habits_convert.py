"""Intermediate checkpoints become loadable models (convert), ControlNets convert LDM <-> diffusers,
fp16 exports, SD 2.x files carry their prediction type where A1111 / ComfyUI / diffusers look, and
a training run's habits: plain image folders, class / extra validation prompts, curves.png,
window-mean losses, provenance, --report-to."""
import importlib.util
import json
import shutil

import diffusers
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from data.images import list_images
from defectsynth.errors import UserError
from model.controlnet import ControlNet
from model.stable_diffusion import StableDiffusion, preset
from sample.pipeline import random_pipeline
from train import concept, condition
from train.monitor import MetricsLog, window_mean
from weights import load_control, load_pipeline, save_control, save_ldm
from weights.convert import ConvertConfig, main as convert

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_base(path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        save_ldm(StableDiffusion(preset("tiny")), path)
    return path


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_concept_checkpoint_converts_to_an_fp16_model_and_the_run_keeps_its_habits(demo_data, tmp_path):
    base = tiny_base(tmp_path / "base.safetensors")
    plain = tmp_path / "plain_images"  # a plain image folder, no annotations.json
    plain.mkdir()
    for image in list_images(demo_data):
        shutil.copy(image, plain / image.name)
    out = tmp_path / "run"
    result = concept.main(concept.ConceptConfig(
        ckpt=str(base), data=str(plain), out=str(out), with_prior=False, steps=3, batch_size=2, lr=1e-3,
        log_every=2, checkpoint_every=1, keep_last=0, validate_every=0, num_validation_images=2,
        validation_prompt=("a red square",), validation_sampler_steps=2, save_dtype="fp16", progress=False,
        device="cpu", precision="fp32"))
    # window means: step 2 averages steps 1-2, step 3 (the last, shorter window) is step 3 alone
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in result.history]
    assert [r["step"] for r in records] == [2, 3] and [r["window_steps"] for r in records] == [2, 1]
    assert records[0]["loss"] == pytest.approx((losses[0] + losses[1]) / 2) and records[1]["loss"] == losses[2]
    assert (out / "curves.png").is_file()
    grid = np.asarray(__import__("cv2").imread(str(out / "samples" / "step_00000003.png")))
    assert grid.shape[:2] == (2 + 3 * 66, 2 + 2 * 66)  # rows: instance, class, "a red square"; 2 seeds each
    saved = json.loads((out / "config.json").read_text())
    assert saved["instance_prompt"] == "an image of a sks" and saved["class_prompt"] == "an image of a metal surface"
    assert saved["provenance"]["torch"] == torch.__version__ and saved["provenance"]["device"].startswith("cpu")
    exported = tensors(out / "concept.safetensors")
    assert all(v.dtype == torch.float16 for v in exported.values() if v.is_floating_point())

    # checkpoint step 1 -> LDM fp16 -> load: the trained UNet of step 1, the rest from the base
    step1 = out / "checkpoints" / "step_00000001"
    assert convert(ConvertConfig(src=str(step1), dst=str(tmp_path / "step1.safetensors"), dtype="fp16")) == 0
    loaded = load_pipeline(tmp_path / "step1.safetensors", dtype=torch.float16)
    trained = {k[len("unet."):]: v for k, v in load_file(str(step1 / "weights.safetensors")).items()}
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value, trained[key].half()), key
    base_model = load_pipeline(base)
    for key, value in loaded.vae.state_dict().items():
        assert torch.equal(value, base_model.vae.state_dict()[key].half()), key
    assert not torch.equal(trained["out.2.weight"], base_model.unet.state_dict()["out.2.weight"])
    # the last checkpoint converts to exactly the exported model (both fp16)
    convert(ConvertConfig(src=str(out / "checkpoints" / "step_00000003"), dst=str(tmp_path / "last.safetensors"),
                          dtype="fp16"))
    last = tensors(tmp_path / "last.safetensors")
    assert last.keys() == exported.keys() and all(torch.equal(last[k], exported[k]) for k in last)
    with pytest.raises(UserError, match="exists"):
        convert(ConvertConfig(src=str(step1), dst=str(tmp_path / "step1.safetensors")))


def test_condition_checkpoint_converts_to_the_exported_control_with_its_record(demo_data, tmp_path):
    out = tmp_path / "run"
    base = tiny_base(tmp_path / "base.safetensors")
    condition.main(condition.ConditionConfig(
        ckpt=str(base), data=str(demo_data), out=str(out), steps=2, batch_size=2, lr=1e-3, log_every=1,
        checkpoint_every=1, keep_last=0, validate_every=0, num_validation_images=0, progress=False,
        device="cpu", precision="fp32"))
    assert (out / "curves.png").is_file()
    last = out / "checkpoints" / "step_00000002"
    convert(ConvertConfig(src=str(last), dst=str(tmp_path / "control.safetensors")))
    ours, exported = tensors(tmp_path / "control.safetensors"), tensors(out / "control.safetensors")
    assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours)
    from data.hints import read_condition_metadata
    record = read_condition_metadata(tmp_path / "control.safetensors")
    assert record == read_condition_metadata(out / "control.safetensors")  # steps 2 either way
    convert(ConvertConfig(src=str(last), dst=str(tmp_path / "control_diffusers"), to="diffusers"))
    assert read_condition_metadata(tmp_path / "control_diffusers") == record


def test_controlnet_ldm_diffusers_round_trip_and_diffusers_loads_it(tmp_path):
    sd = random_pipeline("tiny", seed=4)
    control = ControlNet.from_unet(sd.unet)
    with torch.no_grad():
        for p in control.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # no zero tensors left: every key is checked for real
    save_control(control, tmp_path / "c.safetensors")
    convert(ConvertConfig(src=str(tmp_path / "c.safetensors"), dst=str(tmp_path / "c_diffusers"), to="diffusers"))
    convert(ConvertConfig(src=str(tmp_path / "c_diffusers"), dst=str(tmp_path / "back.safetensors")))
    a, b = tensors(tmp_path / "c.safetensors"), tensors(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reference = diffusers.ControlNetModel.from_pretrained(tmp_path / "c_diffusers")
    ours = load_file(str(tmp_path / "c_diffusers" / "diffusion_pytorch_model.safetensors"))
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    convert(ConvertConfig(src=str(tmp_path / "c.safetensors"), dst=str(tmp_path / "half.safetensors"), dtype="bf16"))
    half = load_control(tmp_path / "half.safetensors", dtype=torch.bfloat16)
    assert all(torch.equal(p, q.to(torch.bfloat16)) for p, q in zip(half.state_dict().values(),
                                                                     control.state_dict().values()))


@pytest.mark.parametrize("name,expected", [("tiny-sd2-v", "v_prediction"), ("tiny-sd2", "epsilon")])
def test_sd2_exports_carry_their_prediction_type_for_other_tools(tmp_path, name, expected):
    sd = random_pipeline(name, seed=1)
    save_ldm(sd, tmp_path / "m.safetensors")
    config = yaml.safe_load((tmp_path / "m.yaml").read_text())["model"]["params"]
    assert config.get("parameterization", "eps") == ("v" if expected == "v_prediction" else "eps")
    unet = config["unet_config"]["params"]
    assert (unet["context_dim"], unet["model_channels"], unet["num_head_channels"]) == (
        sd.config.unet.context_dim, sd.config.unet.model_channels, sd.config.unet.head_dim)
    assert unet["use_linear_in_transformer"] is True
    assert config["cond_stage_config"]["params"]["layer"] == "penultimate"
    convert(ConvertConfig(src=str(tmp_path / "m.safetensors"), dst=str(tmp_path / "d"), to="diffusers"))
    scheduler = json.loads((tmp_path / "d" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == expected
    assert load_pipeline(tmp_path / "d").prediction_type == expected
    save_ldm(random_pipeline("tiny", seed=1), tmp_path / "sd1.safetensors")
    assert not (tmp_path / "sd1.yaml").exists()  # SD 1.x: the tools' default config is right


def test_window_mean_and_report_to(tmp_path):
    history = [{"step": s, "loss": float(s)} for s in range(1, 8)]
    assert window_mean(history, 6, 3) == {"loss": 5.0, "window_steps": 3}
    assert window_mean(history, 7, 3) == {"loss": 7.0, "window_steps": 1}
    assert window_mean(history[4:], 6, 3) == {"loss": 5.5, "window_steps": 2}  # resumed at step 4
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(UserError, match="pip install tensorboard"):
            MetricsLog(tmp_path / "metrics.jsonl", report_to="tensorboard")
    else:
        log = MetricsLog(tmp_path / "metrics.jsonl", report_to="tensorboard")
        log.write({"step": 1, "loss": 0.5})
        log.close()
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_user_class_images_may_have_any_names(demo_data, tmp_path):
    import cv2
    classes = tmp_path / "classes"
    classes.mkdir()
    for name in ("steel plate.jpg", "IMG_0042.png"):
        cv2.imwrite(str(classes / name), np.full((64, 64, 3), 128, np.uint8) + np.arange(64, dtype=np.uint8)[:, None, None])
    assert [p.name for p in concept.class_image_paths(classes, 3)] == ["IMG_0042.png", "steel plate.jpg", "000002.png"]
    assert [p.name for p in concept.class_image_paths(classes, 1)] == ["IMG_0042.png"]
    concept.main(concept.ConceptConfig(
        preset="tiny", random_weights=True, data=str(demo_data), out=str(tmp_path / "run"), class_dir=str(classes),
        num_class_images=3, class_steps=1, steps=1, batch_size=1, validate_every=0, num_validation_images=0,
        progress=False, device="cpu", precision="fp32"))
    assert sorted(p.name for p in classes.iterdir()) == ["000002.png", "IMG_0042.png", "steel plate.jpg"]


def test_a_checkpoint_from_before_the_prompt_fields_still_resumes(demo_data, tmp_path):
    out = tmp_path / "run"
    options = dict(preset="tiny", random_weights=True, data=str(demo_data), out=str(out), with_prior=False,
                   batch_size=1, validate_every=0, num_validation_images=0, checkpoint_every=1, progress=False,
                   device="cpu", precision="fp32")
    concept.main(concept.ConceptConfig(steps=1, **options))
    folder = out / "checkpoints" / "step_00000001"
    saved = json.loads((folder / "config.json").read_text())  # as the older code wrote it: no prompt fields
    (folder / "config.json").write_text(json.dumps({k: v for k, v in saved.items()
                                                    if k not in ("instance_prompt", "class_prompt")}))
    state = torch.load(folder / "state.pt", weights_only=True)
    for key in ("instance_prompt", "class_prompt", "validation_prompt", "save_dtype", "report_to"):
        state["config"].pop(key)
    torch.save(state, folder / "state.pt")
    marker = json.loads((folder / "COMPLETE").read_text())  # the sizes it certifies, as they are now
    marker["files"] = {name: (folder / name).stat().st_size for name in marker["files"]}
    (folder / "COMPLETE").write_text(json.dumps(marker))
    resumed = concept.main(concept.ConceptConfig(steps=2, resume="latest", **options))
    assert [h["step"] for h in resumed.history] == [2]
    with pytest.raises(UserError, match="instance_prompt"):  # a prompt the old run did not train on
        concept.main(concept.ConceptConfig(steps=3, resume="latest", instance_prompt="a photo of zwx", **options))
