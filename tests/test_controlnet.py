"""The control copy (model/controlnet.py): structure and keys, from_unet, zero-init identity,
scales / guess mode, checkpointing, dtype, and parity with diffusers' ControlNetModel driving
UNet2DConditionModel (both saved by diffusers, loaded through OUR weights/ code)."""
import gzip
import json
from pathlib import Path

import pytest
import torch

from model.controlnet import ControlNet, ControlNetConfig, hint_widths_for
from model.unet import UNet, UNetConfig

FIXTURES = Path(__file__).parent / "fixtures"
TINY_ATOL = 1e-5  # docs/testing.md: float32 parity on tiny configs


def randomise_zero_inits(control: ControlNet, seed: int = 0) -> ControlNet:
    """Random zero convs, middle_block_out and last hint conv: otherwise every residual is 0."""
    g = torch.Generator().manual_seed(seed)
    zeroed = list(control.zero_convs.parameters()) + list(control.middle_block_out.parameters()) \
        + list(control.input_hint_block[-1].parameters())
    with torch.no_grad():
        for p in zeroed:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return control


def random_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose zero-initialised output layers are random too (else its output is always 0)."""
    torch.manual_seed(seed)
    unet = UNet(config).eval()
    for module in unet.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    return unet


def inputs(config: UNetConfig, batch: int = 2, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.tensor([17, 503, 999, 250][:batch])
    context = torch.randn(batch, 77, config.context_dim, generator=g)
    hint = torch.rand(batch, 3, 8 * size, 8 * size, generator=g)
    return x, t, context, hint


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------

def test_state_dict_is_the_original_control_model_layout_on_meta():
    """Keys, order and shapes == controlnet_sd15.json (the official cldm.ControlNet) minus the prefix."""
    with gzip.open(FIXTURES / "manifest_controlnet_sd15.json.gz", "rt", encoding="utf-8") as handle:
        manifest = json.load(handle)
    expected = [(k[len("control_model."):], tuple(shape)) for k, (shape, _) in manifest.items()]
    with torch.device("meta"):
        control = ControlNet(ControlNetConfig.sd15())
    assert [(k, tuple(v.shape)) for k, v in control.state_dict().items()] == expected
    assert len(control.zero_convs) == len(control.input_blocks) == 12
    assert [type(m).__name__ for m in control.input_hint_block][:3] == ["Conv2d", "SiLU", "Conv2d"]
    assert [m.stride for m in control.input_hint_block if isinstance(m, torch.nn.Conv2d)] == \
        [(1, 1), (1, 1), (2, 2), (1, 1), (2, 2), (1, 1), (2, 2), (1, 1)]
    assert list(control.buffers()) == []


def test_hint_widths_generalise_sd_and_tiny():
    assert hint_widths_for(320, 8) == (16, 32, 96, 256)  # the original
    assert hint_widths_for(32, 8) == (16, 32, 32, 32)    # tiny: capped at model_channels
    assert hint_widths_for(320, 4) == (16, 32, 96)       # one stride-2 conv fewer
    assert hint_widths_for(320, 16) == (16, 32, 96, 256, 256)
    assert ControlNetConfig.tiny().downsample_factor == ControlNetConfig.sd15().downsample_factor == 8
    with pytest.raises(ValueError, match="power of two"):
        hint_widths_for(320, 6)


@pytest.mark.parametrize("config", [UNetConfig.tiny(), UNetConfig.tiny_sd2()], ids=["sd1", "sd2"])
def test_from_unet_copies_the_encoder_and_zero_inits_the_rest(config):
    unet = random_unet(config)
    control = ControlNet.from_unet(unet)
    assert control.config == ControlNetConfig(config, 3, (16, 32, 32, 32))
    for name in ("time_embed", "input_blocks", "middle_block"):
        ours, theirs = getattr(control, name).state_dict(), getattr(unet, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # A copy, not shared tensors: training the control must not move the UNet.
    assert control.input_blocks[0][0].weight.data_ptr() != unet.input_blocks[0][0].weight.data_ptr()
    zeroed = [control.zero_convs, control.middle_block_out, control.input_hint_block[-1]]
    assert all(not p.any() for m in zeroed for p in m.parameters())
    assert all(p.any() for p in control.input_hint_block[0].parameters())  # the rest is random

    x, t, context, hint = inputs(config)
    with torch.no_grad():
        residuals = control(x, t, context, hint)
        assert len(residuals) == len(unet.input_blocks) + 1
        assert all(not r.any() for r in residuals)
        bare = unet(x, t, context)
        assert bare.abs().max() > 0.1
        assert torch.equal(unet(x, t, context, control=residuals), bare)  # a fresh copy changes nothing


def test_residual_shapes_follow_the_skips_and_the_hint_enters_once():
    config = UNetConfig.tiny()
    control = randomise_zero_inits(ControlNet.from_unet(random_unet(config)))
    x, t, context, hint = inputs(config)
    with torch.no_grad():
        residuals = control(x, t, context, hint)
        assert [tuple(r.shape) for r in residuals] == \
            [(2, 32, 8, 8)] * 3 + [(2, 32, 4, 4)] + [(2, 64, 4, 4)] * 3
        # The hint matters, and only through the first block: with input_hint_block's output
        # added by hand after conv_in, running the blocks with a zero hint encoder gives the same.
        other = control(x, t, context, torch.rand_like(hint))
        assert all((a - b).abs().max() > 0 for a, b in zip(residuals, other))
        h = control.input_blocks[0](x, None, None) + control.input_hint_block(hint)
        assert torch.allclose(control.zero_convs[0](h), residuals[0], atol=1e-6)


def test_scale_guess_mode_and_global_pool():
    config = UNetConfig.tiny()
    control = randomise_zero_inits(ControlNet.from_unet(random_unet(config)))
    x, t, context, hint = inputs(config)
    n = len(control.input_blocks) + 1
    with torch.no_grad():
        base = control(x, t, context, hint)
        half = control(x, t, context, hint, scale=0.5)
        assert all(torch.equal(h, b * 0.5) for h, b in zip(half, base))
        guess = control(x, t, context, hint, scale=0.8, guess_mode=True)
        # The original's control_scales in guess mode: strength * 0.825 ** (12 - i) for SD's 13.
        assert control.residual_scales(0.8, True) == [0.8 * 0.825 ** (n - 1 - i) for i in range(n)]
        assert all(torch.equal(g, b * (0.8 * 0.825 ** (n - 1 - i))) for i, (g, b) in enumerate(zip(guess, base)))
        pooled = ControlNet(ControlNetConfig(config, 3, (16, 32, 32, 32), global_pool=True))
        pooled.load_state_dict(control.state_dict())
        out = pooled(x, t, context, hint)
        assert all(o.shape[-2:] == (1, 1) and torch.allclose(o, b.mean(dim=(2, 3), keepdim=True), atol=1e-6)
                   for o, b in zip(out, base))
    with torch.device("meta"):
        sd15 = ControlNet(ControlNetConfig.sd15())
    scales = sd15.residual_scales(1.0, True)
    assert len(scales) == 13 and scales[-1] == 1.0 and scales[0] == pytest.approx(0.825 ** 12)


def test_hint_of_the_wrong_size_is_an_error_naming_the_expected_shape():
    config = UNetConfig.tiny()
    control = ControlNet.from_unet(random_unet(config))
    x, t, context, hint = inputs(config)
    with pytest.raises(ValueError, match=r"expected \(B=2, 3, 64, 64\)"):
        control(x, t, context, hint[..., :32, :32])


def test_determinism_scalar_timestep_and_bf16():
    config = UNetConfig.tiny()
    control = randomise_zero_inits(ControlNet.from_unet(random_unet(config)))
    x, t, context, hint = inputs(config)
    with torch.no_grad():
        a = control(x, t, context, hint)
        b = control(x, t, context, hint)
        assert all(torch.equal(p, q) for p, q in zip(a, b))
        same_t = control(x, torch.tensor(503), context, hint)
        assert all(torch.equal(p, q) for p, q in zip(same_t, control(x, torch.tensor([503, 503]), context, hint)))
        low = ControlNet(control.config)
        low.load_state_dict(control.state_dict())
        low = low.to(torch.bfloat16)
        out = low(x.bfloat16(), t, context.bfloat16(), hint)  # the hint is cast to x's dtype
        assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in out)
        assert max((o.float() - r).abs().max() / r.abs().max() for o, r in zip(out, a)) < 0.1


def test_gradient_checkpointing_same_output_and_grads():
    config = UNetConfig.tiny()
    x, t, context, hint = inputs(config)
    results = []
    for enabled in (False, True):
        control = randomise_zero_inits(ControlNet.from_unet(random_unet(config))).train()
        control.set_gradient_checkpointing(enabled)
        loss = sum((r ** 2).mean() for r in control(x, t, context, hint))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in control.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.allclose(grads_a[k], grads_b[k], atol=1e-6) for k in grads_a)
    assert grads_a["input_hint_block.0.weight"].abs().max() > 0  # the hint encoder learns


def test_from_unet_on_meta_and_other_dtype():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    control = ControlNet.from_unet(unet)
    assert next(control.parameters()).is_meta
    assert sum(p.numel() for p in control.parameters()) == 361_279_120  # controlnet_sd15.json
    small = ControlNet.from_unet(random_unet(UNetConfig.tiny()).to(torch.bfloat16))
    assert next(small.parameters()).dtype == torch.float32  # trainable weights stay float32


# ----------------------------------------------------------------------------------------------
# Parity with diffusers (ControlNetModel + UNet2DConditionModel), through weights/
# ----------------------------------------------------------------------------------------------

DIFFUSERS_TINY = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8),
    # SD 2.x style: 16-dim heads (2 and 4 heads on 32 and 64 channels), linear proj.
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True),
}
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def random_reference_pair(family: str, seed: int = 0):
    """diffusers UNet2DConditionModel + ControlNetModel with random weights everywhere (norm
    affines and the zero-initialised layers too, so swapped or dropped tensors show)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**DIFFUSERS_TINY[family], up_block_types=UP_BLOCKS, out_channels=4,
                                sample_size=8).eval()
    control = ControlNetModel(**DIFFUSERS_TINY[family], conditioning_embedding_out_channels=(16, 32, 32, 32)).eval()
    with torch.no_grad():
        for model in (unet, control):
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
                elif not p.any():
                    p.copy_(0.1 * torch.randn_like(p))
    return unet, control


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_parity_with_diffusers_controlnet_through_our_loader(tmp_path, family):
    from weights import load_control, load_unet

    ref_unet, ref_control = random_reference_pair(family)
    ref_unet.save_pretrained(tmp_path / "unet")
    ref_control.save_pretrained(tmp_path / "controlnet")
    unet = load_unet(tmp_path / "unet")
    control = load_control(tmp_path / "controlnet", unet=unet)
    expected_config = UNetConfig.tiny() if family == "sd1" else UNetConfig.tiny_sd2()
    assert unet.config == expected_config and control.config.unet == expected_config

    x, t, context, hint = inputs(expected_config, batch=3)
    with torch.no_grad():
        for scale in (1.0, 0.6):
            down, mid = ref_control(x, t, context, controlnet_cond=hint, conditioning_scale=scale,
                                    return_dict=False)
            residuals = control(x, t, context, hint, scale=scale)
            expected = list(down) + [mid]
            assert len(residuals) == len(expected) == 7
            assert min(r.abs().max() for r in expected) > 0.01  # meaningful: nothing is zero
            assert max((a - b).abs().max() for a, b in zip(residuals, expected)) <= TINY_ATOL
            ref_out = ref_unet(x, t, context, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample
            out = unet(x, t, context, control=residuals)
            assert (ref_out - ref_unet(x, t, context).sample).abs().max() > 0.01  # the control matters
            assert (out - ref_out).abs().max() <= TINY_ATOL
