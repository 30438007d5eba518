"""Single-file numerics through diffusers' own converter: the LDM .safetensors file save_ldm writes,
converted by diffusers' single-file functions (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` for SD 1.x, `convert_open_clip_checkpoint`
for SD 2.x; what `from_single_file` runs, offline) and loaded strictly into diffusers / transformers
modules whose configs are written out here, gives the same UNet, VAE and text-encoder outputs as our
model. So the single-file layout rests on the reference's key table, not only on ours.

Tolerance 1e-5 absolute (float32, tiny configs), as every parity test here (docs/testing.md).
"""
import pytest
import torch
from safetensors.torch import load_file

from model.stable_diffusion import StableDiffusion, preset
from weights import save_ldm

TOLERANCE = 1e-5


def random_model(name: str) -> StableDiffusion:
    """Every weight N(0, 0.1): no zero-initialised layer hides a mis-mapped tensor."""
    torch.manual_seed(0)
    model = StableDiffusion(preset(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def reference_modules(name: str):
    """diffusers / transformers modules of the tiny presets' shapes, configured by hand."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = name == "tiny-sd2"
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8,
        # diffusers' attention_head_dim counts heads: SD1 tiny 2 heads, SD2 tiny 16-dim heads (2 at 32, 4 at 64)
        attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=3 if sd2 else 2, num_attention_heads=4,
                                        hidden_act="gelu" if sd2 else "quick_gelu", max_position_embeddings=77,
                                        projection_dim=32))
    return unet.eval(), vae.eval(), text.eval()


def load_strict(module, state: dict, known_extras: tuple[str, ...] = ()) -> None:
    """Strict but for `known_extras` (position_ids: a buffer some transformers versions save and
    others do not; the documented known extra of every load)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert all(k.endswith(known_extras) for k in unexpected), unexpected
    assert all(k.endswith(known_extras) for k in missing), missing


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_diffusers_single_file_converter_reads_our_file(name, tmp_path):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    model = random_model(name)
    checkpoint = load_file(str(save_ldm(model, tmp_path / "model.safetensors")))
    unet, vae, text = reference_modules(name)

    load_strict(unet, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)))
    load_strict(vae, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))
    converted = (convert_open_clip_checkpoint(text, checkpoint) if name == "tiny-sd2"
                 else convert_ldm_clip_checkpoint(checkpoint))
    # The converter writes transformers 4 names (text_model.*); transformers 5 dropped that level.
    text_model = getattr(text, "text_model", text)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    load_strict(text_model, converted, known_extras=("position_ids",))

    g = torch.Generator().manual_seed(1)
    tokens = model.tokenizer(["an image of a sks crack", "a photo of a cat", ""])
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([1, 500, 999])
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        context = model.text_encoder(tokens)
        out = text(tokens, output_hidden_states=True)
        if name == "tiny-sd2":  # SD 2.x: the penultimate layer, then the final LayerNorm
            reference = text_model.final_layer_norm(out.hidden_states[-2])
        else:
            reference = out.last_hidden_state
        assert context.abs().max() > 0.1 and max_diff(context, reference) <= TOLERANCE

        eps = model.unet(x, t, context)
        assert eps.abs().max() > 0.1
        assert max_diff(eps, unet(x, t, encoder_hidden_states=context).sample) <= TOLERANCE

        posterior, theirs = model.vae.encode(images), vae.encode(images).latent_dist
        assert max_diff(posterior.mean, theirs.mean) <= TOLERANCE
        assert max_diff(posterior.logvar, theirs.logvar) <= TOLERANCE
        decoded = model.vae.decode(x[:2])
        assert decoded.abs().max() > 0.1 and max_diff(decoded, vae.decode(x[:2]).sample) <= TOLERANCE
