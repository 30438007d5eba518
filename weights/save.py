"""Writing our models as LDM single files and diffusers folders, in the layouts other SD tools load.

`save_ldm(model, "model.safetensors")` writes the exact LDM keys: the 12 schedule buffers,
`model.diffusion_model.*`, `first_stage_model.*`, and either SD 1.x's
`cond_stage_model.transformer.text_model.*` (with `position_ids` int64 [1, 77]) or SD 2.x's
`cond_stage_model.model.*` (q/k/v fused back into `in_proj_*`, `text_projection`, `logit_scale`).
Its safetensors metadata carries our SDConfig as JSON (`defectsynth.sd_config`) so a reload is
exact even for configs shapes cannot pin down (head counts, toy presets).

`save_diffusers(model, folder)` writes what diffusers' `save_pretrained` writes:
model_index.json, unet/, vae/ (current attention names), text_encoder/ (transformers 4.x
CLIPTextModel layout: `text_model.*` + position_ids, which transformers 4 and 5 both load),
tokenizer/ (CLIP vocab.json + merges.txt, built from open_clip's bundled BPE file) and
scheduler/ (DDIM with SD's betas and the model's prediction type).

SD 2.x text encoders: diffusers stores only the layers SD runs (23 of OpenCLIP-H's 24, the output
being the last one) and drops `text_projection` / `logit_scale`. We write the same, and keep the
dropped tensors (our names) in text_encoder/sd2_text_extra.safetensors, which transformers ignores
and our loader re-attaches, so LDM -> diffusers -> LDM is lossless.

Every file is written to a temporary name and renamed; model_index.json is written last, so a
folder with model_index.json is complete.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import torch

from defectsynth.runconfig import config_to_dict
from model.stable_diffusion import SDConfig
from weights import layouts
from weights.components import COMPONENTS
from weights.configs import (DIFFUSERS_VERSION, ConfigError, text_config_to_transformers, unet_config_to_diffusers,
                             vae_config_to_diffusers)
from weights.files import save_json, save_safetensors, save_text
from weights.keymap import Layout, to_theirs
from weights.load import METADATA_CONFIG, SD2_TEXT_EXTRA

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached CPU tensors; floating ones cast to `dtype` when given (integer ids stay integer)."""
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor
    return out


def _check_consistent(model) -> None:
    for name, field_name in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text")):
        module_config = getattr(getattr(model, name), "config", None)
        if module_config is not None and module_config != getattr(model.config, field_name):
            raise ConfigError(f"model.{name}.config differs from model.config.{field_name}: "
                              f"{module_config} vs {getattr(model.config, field_name)}")


def ldm_schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """LDM's `register_schedule` buffers (float64 maths, stored float32), v_posterior = 0."""
    betas = betas.double().cpu()
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    assert tuple(values) == layouts.SCHEDULE_BUFFERS
    return {k: v.float() for k, v in values.items()}


def _identity_layer(text_state: dict[str, torch.Tensor], index: int, like: int) -> dict[str, torch.Tensor]:
    """A text block that is the identity map: zero projections add nothing to the residual stream."""
    out = {}
    prefix = f"encoder.layers.{like}."
    for key, tensor in text_state.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            value = torch.ones_like(tensor) if name.startswith("layer_norm") and name.endswith("weight") \
                else torch.zeros_like(tensor)
            out[f"encoder.layers.{index}.{name}"] = value
    return out


def ldm_state_dict(model) -> tuple[dict[str, torch.Tensor], SDConfig]:
    """Our StableDiffusion as LDM single-file tensors (names, shapes; dtypes unchanged), and the
    SDConfig those tensors describe (the model's, or with the identity block below appended)."""
    _check_consistent(model)
    config = model.config
    out = ldm_schedule_buffers(model.schedule.betas)
    out.update({layouts.LDM_UNET + k: v for k, v in model.unet.state_dict().items()})
    out.update({layouts.LDM_VAE + k: v for k, v in model.vae.state_dict().items()})
    text = model.text_encoder.state_dict()
    if config.family == "sd1":
        if config.text.output_layer != -1:
            raise ConfigError(f"SD 1.x LDM files condition on the text encoder's last layer; this model uses "
                              f"output_layer {config.text.output_layer}; save it with save_diffusers instead")
        out[layouts.LDM_CLIP + "embeddings.position_ids"] = torch.arange(config.text.max_length)[None]  # (1, 77) int64
        out.update({layouts.LDM_CLIP + k: v for k, v in text.items()})
        return out, config
    # SD 2.x: FrozenOpenCLIPEmbedder always conditions on the penultimate block. A model whose
    # output is its last block (loaded from a diffusers folder, which drops OpenCLIP's 24th block)
    # gets one identity block appended, so every LDM loader computes the same conditioning.
    text_config = config.text
    if text_config.output_layer == -1:
        text = dict(text, **_identity_layer(text, text_config.layers, text_config.layers - 1))
        text_config = replace(text_config, layers=text_config.layers + 1, output_layer=-2)
    elif text_config.output_layer != -2:
        raise ConfigError(f"SD 2.x LDM files condition on the penultimate text layer; output_layer "
                          f"{text_config.output_layer} cannot be written in that layout")
    layout = COMPONENTS["text_encoder"].layout("openclip", text_config).with_prefix(layouts.LDM_OPENCLIP)
    out.update(to_theirs(layout.rules(list(text)), text))
    return out, replace(config, text=text_config)


def save_ldm(model, path: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write `model` (a StableDiffusion) as one LDM `.safetensors` file; returns the path.

    dtype: None keeps each tensor's dtype; torch.float16 / "fp16" etc. casts floating tensors.
    An SD 2.x model also gets the LDM inference config beside it (`ldm_inference_yaml`, same name
    with .yaml), which is how A1111 and ComfyUI learn its prediction type.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: save_ldm writes .safetensors only (pickles can run code when loaded)")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    tensors, written = ldm_state_dict(model)
    metadata = {"format": "pt", METADATA_CONFIG: json.dumps(config_to_dict(written), sort_keys=True)}
    save_safetensors(_cast(tensors, dtype), path, metadata=metadata)
    if written.family == "sd2":
        save_text(ldm_inference_yaml(written), path.with_suffix(".yaml"))
    return path


def ldm_inference_yaml(config: SDConfig) -> str:
    """The LDM inference config of an SD 2.x model, as Stability's v2-inference-v.yaml (v) or
    v2-inference.yaml (epsilon), with this model's sizes. A1111 reads `<checkpoint>.yaml` beside a
    checkpoint and ComfyUI's CheckpointLoader (with config) takes it: `parameterization: "v"` is
    what tells them a v-prediction model; without it they assume epsilon. Written as text (no
    yaml dependency)."""
    unet, vae = config.unet, config.vae
    attention = [2 ** level for level in unet.attention_levels]  # LDM counts downsampling factors
    heads = f"num_head_channels: {unet.head_dim}" if unet.head_dim else f"num_heads: {unet.num_heads}"
    latent = config.image_size // vae.downsample_factor
    lines = [
        "model:",
        "  base_learning_rate: 1.0e-4",
        "  target: ldm.models.diffusion.ddpm.LatentDiffusion",
        "  params:",
        *(['    parameterization: "v"'] if config.prediction_type == "v_prediction" else []),
        "    linear_start: 0.00085",
        "    linear_end: 0.0120",
        "    num_timesteps_cond: 1",
        "    log_every_t: 200",
        "    timesteps: 1000",
        '    first_stage_key: "jpg"',
        '    cond_stage_key: "txt"',
        f"    image_size: {latent}",
        f"    channels: {unet.in_channels}",
        "    cond_stage_trainable: false",
        "    conditioning_key: crossattn",
        "    monitor: val/loss_simple_ema",
        f"    scale_factor: {vae.scaling_factor}",
        "    use_ema: False",
        "",
        "    unet_config:",
        "      target: ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "      params:",
        "        use_checkpoint: True",
        "        use_fp16: True",
        "        image_size: 32 # unused",
        f"        in_channels: {unet.in_channels}",
        f"        out_channels: {unet.out_channels}",
        f"        model_channels: {unet.model_channels}",
        f"        attention_resolutions: [ {', '.join(str(a) for a in sorted(attention, reverse=True))} ]",
        f"        num_res_blocks: {unet.num_res_blocks}",
        f"        channel_mult: [ {', '.join(str(m) for m in unet.channel_mult)} ]",
        f"        {heads}",
        "        use_spatial_transformer: True",
        f"        use_linear_in_transformer: {unet.use_linear_proj}",
        f"        transformer_depth: {unet.transformer_depth}",
        f"        context_dim: {unet.context_dim}",
        "        legacy: False",
        "",
        "    first_stage_config:",
        "      target: ldm.models.autoencoder.AutoencoderKL",
        "      params:",
        f"        embed_dim: {vae.latent_channels}",
        "        monitor: val/rec_loss",
        "        ddconfig:",
        "          double_z: true",
        f"          z_channels: {vae.latent_channels}",
        "          resolution: 256",
        f"          in_channels: {vae.in_channels}",
        f"          out_ch: {vae.out_channels}",
        f"          ch: {vae.base_channels}",
        "          ch_mult:",
        *[f"          - {m}" for m in vae.channel_mult],
        f"          num_res_blocks: {vae.num_res_blocks}",
        "          attn_resolutions: []",
        "          dropout: 0.0",
        "        lossconfig:",
        "          target: torch.nn.Identity",
        "",
        "    cond_stage_config:",
        "      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "      params:",
        "        freeze: True",
        '        layer: "penultimate"',
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# diffusers folders
def clip_tokenizer_files(pad_token: str) -> dict[str, str]:
    """transformers CLIPTokenizer files (vocab.json, merges.txt, configs) from open_clip's BPE file.

    The vocabulary is CLIP's: 256 byte symbols, the same with "</w>", then one entry per merge
    (the first 49152 - 256 - 2 lines after the header), then the two special tokens.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    tokenizer_config = dict(special, add_prefix_space=False, do_lower_case=True, errors="replace",
                            model_max_length=77, tokenizer_class="CLIPTokenizer")
    return {
        "vocab.json": json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n",
    }


def scheduler_config(prediction_type: str) -> dict:
    """DDIM with SD's training schedule (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": prediction_type,
            "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}


def diffusers_text_tensors(text_encoder) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(CLIPTextModel tensors in the transformers 4.x layout, extras in our names, layers written).

    A CLIPTextModel's output is its last layer, so only the layers our encoder runs are written;
    the rest, text_projection and logit_scale go to the extras (see the module docstring).
    """
    config = text_encoder.config
    state = text_encoder.state_dict()
    run = config.layers_run
    dropped = tuple(f"encoder.layers.{i}." for i in range(run, config.layers))
    extra = {k: v for k, v in state.items() if k.startswith(dropped) or k in ("text_projection", "logit_scale")}
    main = {k: v for k, v in state.items() if k not in extra}
    layout = Layout("transformers4-text", prefix=layouts.TRANSFORMERS4_TEXT)
    tensors = to_theirs(layout.rules(list(main)), main)
    tensors[layouts.TRANSFORMERS4_TEXT + "embeddings.position_ids"] = torch.arange(config.max_length)[None]
    return tensors, extra, run


def save_diffusers(model, folder: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Write `model` (a StableDiffusion) as a diffusers StableDiffusionPipeline folder; returns it."""
    _check_consistent(model)
    folder = Path(folder)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    # model_index.json marks a complete folder: when overwriting, it goes first and comes back last.
    if (folder / "model_index.json").exists():
        (folder / "model_index.json").unlink()
    config = model.config
    latent_size = config.image_size // config.vae.downsample_factor
    weights = "diffusion_pytorch_model.safetensors"

    unet = model.unet.state_dict()
    rules = COMPONENTS["unet"].layout("diffusers", config.unet).rules(list(unet))
    save_safetensors(_cast(to_theirs(rules, unet), dtype), folder / "unet" / weights, {"format": "pt"})
    save_json(unet_config_to_diffusers(config.unet, latent_size), folder / "unet" / "config.json")

    vae = model.vae.state_dict()
    rules = COMPONENTS["vae"].layout("diffusers", config.vae).rules(list(vae))
    save_safetensors(_cast(to_theirs(rules, vae), dtype), folder / "vae" / weights, {"format": "pt"})
    save_json(vae_config_to_diffusers(config.vae, config.image_size), folder / "vae" / "config.json")

    text, extra, layers = diffusers_text_tensors(model.text_encoder)
    save_safetensors(_cast(text, dtype), folder / "text_encoder" / "model.safetensors", {"format": "pt"})
    extra_path = folder / "text_encoder" / SD2_TEXT_EXTRA
    if extra:
        save_safetensors(_cast(extra, dtype), extra_path, {"format": "pt"})
    elif extra_path.exists():
        extra_path.unlink()
    save_json(text_config_to_transformers(config.text, layers), folder / "text_encoder" / "config.json")

    pad = "<|endoftext|>" if config.text.pad_token_id == 49407 else "!"
    if config.text.pad_token_id not in (0, 49407):
        raise ConfigError(f"TextEncoderConfig.pad_token_id {config.text.pad_token_id}: a CLIP tokenizer pads "
                          f"with 49407 (SD 1.x) or 0 (SD 2.x)")
    for name, text_file in clip_tokenizer_files(pad).items():
        save_text(text_file, folder / "tokenizer" / name)
    save_json(scheduler_config(config.prediction_type), folder / "scheduler" / "scheduler_config.json")
    save_json({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, folder / "model_index.json")  # last: its presence marks a complete folder
    return folder
