"""Round trips on the tiny presets: ours -> LDM file / diffusers folder -> ours is bit-exact, and
every real-world variant of those layouts (pickles, fp16, EMA, standalone VAE, transformers 5,
legacy VAE names, float position_ids, bare OpenCLIP) loads to the same tensors."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from model.stable_diffusion import StableDiffusion, preset
from model.text_encoder import TextEncoder
from weights import (load_pipeline, load_text_encoder, load_unet, load_vae, save_diffusers, save_ldm)
from weights import layouts
from weights.files import LIGHTNING_MODEL_CHECKPOINT
from weights.load import METADATA_CONFIG
from weights.save import ldm_state_dict


def random_model(name: str, seed: int = 0) -> StableDiffusion:
    """A tiny model with every parameter random (zero-initialised convs included)."""
    torch.manual_seed(seed)
    model = StableDiffusion(preset(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module", params=["tiny", "tiny-sd2"])
def model(request):
    return random_model(request.param)


def test_ldm_file_round_trip_is_exact(model, tmp_path):
    path = save_ldm(model, tmp_path / "model.safetensors")
    loaded, info = load_pipeline(path, return_info=True)
    assert info.ok and info.prediction_reason == "file metadata (written by defectsynth)"
    assert loaded.config == model.config
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert loaded.schedule.betas.device.type == "cpu"


def test_ldm_file_without_metadata_infers_the_tiny_preset(model, tmp_path):
    """Configs come from shapes when the file has no defectsynth metadata (any other tool's file)."""
    tensors, _ = ldm_state_dict(model)
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    loaded, info = load_pipeline(path, return_info=True, prediction_type="epsilon")
    assert {r.config_source for r in info.components.values()} == {"tensor shapes"}
    assert loaded.config == model.config
    assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_diffusers_folder_round_trip_is_exact(model, tmp_path):
    folder = save_diffusers(model, tmp_path / "pipe")
    loaded, info = load_pipeline(folder, return_info=True)
    assert info.ok and info.prediction_reason == "scheduler/scheduler_config.json"
    assert loaded.config == model.config
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    # And back to LDM: the same bytes as a direct LDM export.
    direct = load_file(str(save_ldm(model, tmp_path / "direct.safetensors")))
    via = load_file(str(save_ldm(loaded, tmp_path / "via.safetensors")))
    assert_same_tensors(direct, via)


def test_component_loaders_on_folders_and_files(model, tmp_path):
    folder = save_diffusers(model, tmp_path / "pipe")
    single = save_ldm(model, tmp_path / "model.safetensors")
    for source in (folder / "unet", folder, single):
        assert_same_tensors(model.unet.state_dict(), load_unet(source).state_dict())
    for source in (folder / "vae", folder, single):
        assert_same_tensors(model.vae.state_dict(), load_vae(source).state_dict())
    for source in (folder / "text_encoder", folder, single):
        loaded = load_text_encoder(source)
        assert loaded.config == model.config.text
        assert_same_tensors(model.text_encoder.state_dict(), loaded.state_dict())


def test_half_precision_files_load_cast_to_the_requested_dtype(tmp_path):
    model = random_model("tiny")
    state = model.state_dict()
    path = save_ldm(model, tmp_path / "half.safetensors", dtype=torch.float16)
    written = load_file(str(path))
    assert written[layouts.LDM_UNET + "out.2.weight"].dtype == torch.float16
    assert written[layouts.LDM_CLIP + "embeddings.position_ids"].dtype == torch.int64
    loaded = load_pipeline(path).state_dict()  # default float32
    for key, tensor in state.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], tensor.half().float()), key
    path = save_ldm(model, tmp_path / "bf16.safetensors", dtype="bf16")
    loaded = load_pipeline(path, dtype=torch.bfloat16).state_dict()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor.bfloat16()), key
    folder = save_diffusers(model, tmp_path / "half", dtype="fp16")
    assert {p.dtype for p in load_pipeline(folder, dtype=torch.float16).parameters()} == {torch.float16}


def _lightning_ckpt(tensors: dict, path, **top):
    """A Lightning-style .ckpt: {"state_dict": ..., "callbacks": {ModelCheckpoint: {...}}} where the
    ModelCheckpoint global is pickled under its real module path (a fake module at save time)."""
    import sys
    import types

    module_path, _, class_name = LIGHTNING_MODEL_CHECKPOINT.rpartition(".")
    parts = module_path.split(".")
    saved = {name: sys.modules.get(name) for name in (".".join(parts[:i + 1]) for i in range(len(parts)))}
    try:
        for i in range(len(parts)):
            sys.modules[".".join(parts[:i + 1])] = types.ModuleType(".".join(parts[:i + 1]))
        cls = type(class_name, (), {"__module__": module_path})
        setattr(sys.modules[module_path], class_name, cls)
        instance = cls()
        instance.best_model_path = "/ckpt/last.ckpt"
        instance.best_model_score = torch.tensor(0.25)
        payload = {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                   "callbacks": {cls: {"best_model_path": "", "best_model_score": None}},
                   "instance": instance, "state_dict": tensors, **top}
        torch.save(payload, path)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_lightning_ckpt_with_model_checkpoint_loads_with_weights_only(tmp_path):
    model = random_model("tiny")
    tensors, _ = ldm_state_dict(model)
    path = tmp_path / "sd-v1-4.ckpt"
    _lightning_ckpt(tensors, path)
    import sys
    assert "pytorch_lightning" not in sys.modules
    loaded, info = load_pipeline(path, return_info=True, prediction_type="epsilon")
    assert info.ok
    assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_ema_weights_are_loaded_when_asked(tmp_path):
    model, ema_model = random_model("tiny", seed=0), random_model("tiny", seed=1)
    tensors, _ = ldm_state_dict(model)
    rules = layouts.unet_ema_layout().rules(list(ema_model.unet.state_dict()))
    for rule in rules:
        tensors[rule.theirs[0]] = ema_model.unet.state_dict()[rule.ours[0]]
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    path = tmp_path / "v1-5-pruned.ckpt"
    torch.save({"state_dict": tensors}, path)
    plain = load_pipeline(path, prediction_type="epsilon")
    assert_same_tensors(model.unet.state_dict(), plain.unet.state_dict())
    ema = load_pipeline(path, prediction_type="epsilon", ema=True)
    assert_same_tensors(ema_model.unet.state_dict(), ema.unet.state_dict())
    assert_same_tensors(model.vae.state_dict(), ema.vae.state_dict())
    assert_same_tensors(ema_model.unet.state_dict(), load_unet(path, ema=True).state_dict())


def test_standalone_vae_file_ignores_loss_and_ema_scalars(tmp_path):
    """vae-ft-mse-840000-ema-pruned style: bare encoder.*/decoder.* + loss.* + model_ema scalars."""
    model = random_model("tiny")
    tensors = dict(model.vae.state_dict())
    tensors["loss.logvar"] = torch.zeros(())
    tensors["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(1, dtype=torch.int32)
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": tensors}, path)
    assert_same_tensors(model.vae.state_dict(), load_vae(path).state_dict())


def test_text_encoder_variants(tmp_path):
    """transformers 5 layout, float position_ids with drift, the NAI prefix, a bare OpenCLIP tower."""
    sd1 = random_model("tiny").text_encoder
    state = sd1.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "t5.safetensors"))
    assert_same_tensors(state, load_text_encoder(tmp_path / "t5.safetensors").state_dict())
    drifted = {layouts.LDM_CLIP + k: v for k, v in state.items()}
    drifted[layouts.LDM_CLIP + "embeddings.position_ids"] = torch.arange(77.0)[None] - 0.0025
    save_file(drifted, str(tmp_path / "merge.safetensors"))
    assert_same_tensors(state, load_text_encoder(tmp_path / "merge.safetensors").state_dict())
    nai = {layouts.LDM_CLIP_NAI + k: v for k, v in state.items()}
    save_file(nai, str(tmp_path / "nai.safetensors"))
    assert_same_tensors(state, load_text_encoder(tmp_path / "nai.safetensors").state_dict())

    sd2_model = random_model("tiny-sd2")
    tensors, _ = ldm_state_dict(sd2_model)
    openclip = {k: v for k, v in tensors.items() if k.startswith(layouts.LDM_OPENCLIP)}
    save_file({k[len(layouts.LDM_OPENCLIP):]: v for k, v in openclip.items()}, str(tmp_path / "bare.safetensors"))
    torch.save(openclip, tmp_path / "openclip.pth")
    for name in ("bare.safetensors", "openclip.pth"):
        loaded = load_text_encoder(tmp_path / name)
        assert loaded.config == sd2_model.config.text
        assert_same_tensors(sd2_model.text_encoder.state_dict(), loaded.state_dict())


def test_legacy_vae_attention_names_load(tmp_path):
    model = random_model("tiny")
    folder = save_diffusers(model, tmp_path / "pipe")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    current = load_file(str(weights))
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, tensor in current.items():
        for new, old in renames.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = tensor
    assert any(".query." in k for k in legacy)
    weights.unlink()
    save_file(legacy, str(weights))
    assert_same_tensors(model.vae.state_dict(), load_vae(folder / "vae").state_dict())


def test_sd2_text_from_a_real_style_diffusers_folder_exports_an_equivalent_ldm_file(tmp_path):
    """A diffusers SD 2.x folder without our extras file: the text encoder has one block fewer and
    outputs its last block. save_ldm appends an identity block so LDM loaders (penultimate block)
    compute the same conditioning."""
    model = random_model("tiny-sd2")
    folder = save_diffusers(model, tmp_path / "pipe")
    (folder / "text_encoder" / "sd2_text_extra.safetensors").unlink()
    trimmed = load_pipeline(folder)
    assert (trimmed.config.text.layers, trimmed.config.text.output_layer) == (2, -1)
    assert trimmed.config.text.projection_dim is None
    tokens = model.tokenizer(["an image of a crack", ""])
    with torch.no_grad():
        expected = model.text_encoder(tokens)
        assert torch.equal(trimmed.text_encoder(tokens), expected)
        path = save_ldm(trimmed, tmp_path / "sd2.safetensors")
        meta = load_file(str(path))
        assert layouts.LDM_OPENCLIP + "transformer.resblocks.2.attn.in_proj_weight" in meta
        reloaded = load_pipeline(path)
        assert (reloaded.config.text.layers, reloaded.config.text.output_layer) == (3, -2)
        assert torch.equal(reloaded.text_encoder(tokens), expected)


def test_written_files_are_what_other_tools_expect(tmp_path):
    model = random_model("tiny")
    tensors = load_file(str(save_ldm(model, tmp_path / "m.safetensors")))
    assert torch.equal(tensors[layouts.LDM_CLIP + "embeddings.position_ids"], torch.arange(77)[None])
    assert all(name in tensors for name in layouts.SCHEDULE_BUFFERS)
    alphas = torch.cumprod(1 - tensors["betas"].double(), 0)
    assert torch.allclose(tensors["alphas_cumprod"].double(), alphas, atol=1e-7)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        assert METADATA_CONFIG in handle.metadata()
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_text_encoder_module_of_sd2_has_the_projection():
    """The SD2 text module holds text_projection / logit_scale (kept for strict round trips)."""
    keys = TextEncoder(preset("tiny-sd2").text).state_dict()
    assert {"text_projection", "logit_scale"} <= set(keys)
