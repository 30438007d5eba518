"""UNet and shared layers: tiny-config behaviour, and parity with diffusers' UNet2DConditionModel.

Parity tests build the reference with random weights, save it with its own `save_pretrained`, and
load that folder through OUR loader (`weights.load_unet`), so they prove the module code and the
diffusers -> LDM key mapping together.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from model.layers import GroupNorm32, attention, timestep_embedding
from model.unet import UNet, UNetConfig

# Documented in docs/testing.md: 1e-5 absolute on tiny configs (float32, CPU).
TINY_ATOL = 1e-5


def tiny_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A tiny UNet with every parameter random: LDM zero-initialises the last conv of each residual
    branch and the output conv, which would make the whole network output exactly zero."""
    torch.manual_seed(seed)
    unet = UNet(config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1)
    return unet


def tiny_inputs(config: UNetConfig, batch: int = 2, size: int = 8, tokens: int = 77, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.tensor([17, 981, 500, 3][:batch])
    context = torch.randn(batch, tokens, config.context_dim, generator=g)
    return x, t, context


# ----------------------------------------------------------------------------------------------
# Shared layers
# ----------------------------------------------------------------------------------------------

def test_attention_is_softmax_qk_v():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v  # (2, 3, 5, 8)
    torch.testing.assert_close(attention(q, k, v), expected, atol=1e-6, rtol=0)
    mask = torch.ones(5, 7, dtype=torch.bool).tril()  # each query sees a prefix of the keys
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, mask), torch.softmax(scores, -1) @ v, atol=1e-6, rtol=0)


def test_timestep_embedding_cos_then_sin():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 320)
    assert emb.shape == (3, 320) and emb.dtype == torch.float32
    # t = 0: every cos is 1 and every sin is 0, so the order is visible.
    assert torch.equal(emb[0], torch.cat([torch.ones(160), torch.zeros(160)]))
    # Frequency 0 is 1 rad per step; the last is 10000 ** (-159 / 160) rad per step.
    assert emb[1, 0].item() == pytest.approx(math.cos(1.0))
    assert emb[2, 159].item() == pytest.approx(math.cos(999 * 10000 ** (-159 / 160)), abs=1e-6)
    assert timestep_embedding(t, 7).shape == (3, 7) and torch.all(timestep_embedding(t, 7)[:, -1] == 0)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, 320), ref)


def test_group_norm32_computes_in_float32_and_keeps_dtype():
    norm = GroupNorm32(4, 16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, 5, 5) * 100 + 1000  # a large mean: bf16 statistics would be visibly off
    ref = F.group_norm(x, 4, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(norm(x), ref, atol=0, rtol=0)
    out = norm.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # Only the bf16 rounding of input, weights and output remains (not of the statistics).
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ----------------------------------------------------------------------------------------------
# Tiny UNet behaviour
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [UNetConfig.tiny(), UNetConfig.tiny_sd2()], ids=["sd1", "sd2"])
def test_tiny_shape_dtype_determinism(config):
    x, t, context = tiny_inputs(config)
    with torch.no_grad():
        out = tiny_unet(config)(x, t, context)
        again = tiny_unet(config)(x, t, context)
        other = tiny_unet(config, seed=1)(x, t, context)
    assert out.shape == (2, config.out_channels, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    assert not torch.allclose(out, other)


def test_structure_of_tiny_presets():
    unet = UNet(UNetConfig.tiny())
    # conv_in + 2 levels x 2 ResBlocks + 1 Downsample; 3 output blocks per level.
    assert len(unet.input_blocks) == 6 and len(unet.output_blocks) == 6
    assert [type(m).__name__ for m in unet.input_blocks[1]] == ["ResBlock"]
    assert [type(m).__name__ for m in unet.input_blocks[3]] == ["Downsample"]
    assert [type(m).__name__ for m in unet.input_blocks[4]] == ["ResBlock", "SpatialTransformer"]
    assert [type(m).__name__ for m in unet.output_blocks[2]] == ["ResBlock", "SpatialTransformer", "Upsample"]
    assert unet.middle_block[1].transformer_blocks[0].attn1.heads == 2
    sd2 = UNet(UNetConfig.tiny_sd2())
    assert sd2.input_blocks[4][1].transformer_blocks[0].attn1.heads == 4  # 64 channels / 16
    assert isinstance(sd2.input_blocks[4][1].proj_in, torch.nn.Linear)
    with pytest.raises(ValueError, match="exactly one"):
        UNetConfig(num_heads=8, head_dim=64)


def test_timesteps_int_float_and_scalar_agree():
    config = UNetConfig.tiny()
    unet = tiny_unet(config)
    x, t, context = tiny_inputs(config)
    with torch.no_grad():
        out = unet(x, t, context)
        assert torch.equal(unet(x, t.float(), context), out)
        same_t = unet(x, torch.tensor(17), context)
        assert torch.equal(same_t, unet(x, torch.tensor([17, 17]), context))


def test_latent_size_must_divide():
    config = UNetConfig.tiny()
    x, t, context = tiny_inputs(config, size=8)
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny_unet(config)(x[..., :7, :7], t, context)


def test_control_residuals():
    config = UNetConfig.tiny()
    unet = tiny_unet(config)
    x, t, context = tiny_inputs(config)
    # Residual shapes: one per input block (its output), then the middle block's.
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.append(out.shape))
             for m in [*unet.input_blocks, unet.middle_block]]
    with torch.no_grad():
        bare = unet(x, t, context)
    for h in hooks:
        h.remove()
    zeros = [torch.zeros(s) for s in shapes]
    with torch.no_grad():
        assert torch.equal(unet(x, t, context, control=zeros), bare)
        for i in (0, 3, len(zeros) - 1):  # a full-res skip, a deeper skip, the middle block
            control = [z.clone() for z in zeros]
            control[i] = torch.randn(shapes[i])
            changed = unet(x, t, context, control=control)
            assert (changed - bare).abs().max() > 1e-3, f"residual {i} had no effect"
        with pytest.raises(ValueError, match="residuals"):
            unet(x, t, context, control=zeros[:-1])


def test_gradient_checkpointing_same_output_and_grads():
    config = UNetConfig.tiny()
    x, t, context = tiny_inputs(config)
    results = []
    for enabled in (False, True):
        unet = tiny_unet(config).train()
        unet.set_gradient_checkpointing(enabled)
        calls = []
        # A pre-hook: the recompute stops early once it has rebuilt what backward needs, so a
        # post-forward hook would not see it.
        unet.middle_block.register_forward_pre_hook(lambda *a: calls.append(1))
        out = unet(x, t, context)
        out.square().mean().backward()
        # With checkpointing the block runs again during backward to rebuild its activations.
        assert len(calls) == (2 if enabled else 1)
        results.append((out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-7, rtol=1e-6, msg=name)
    assert not UNet(config).gradient_checkpointing  # off by default


def test_bf16_forward_is_finite_and_close():
    config = UNetConfig.tiny()
    x, t, context = tiny_inputs(config)
    unet = tiny_unet(config)
    with torch.no_grad():
        ref = unet(x, t, context)
        out = unet.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_meta_construction_has_no_buffers():
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    assert not list(unet.buffers())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5 UNet


# ----------------------------------------------------------------------------------------------
# Parity with diffusers through our loader
# ----------------------------------------------------------------------------------------------

DIFFUSERS_TINY_SD1 = dict(  # diffusers' tiny SD pipeline-test UNet, with heads and groups as in tiny()
    block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
# SD 2.x style: per-level head counts (2, 4) on (32, 64) channels = a fixed 16-dim head; linear proj.
DIFFUSERS_TINY_SD2 = dict(DIFFUSERS_TINY_SD1, attention_head_dim=(2, 4), use_linear_projection=True)


def random_reference_unet(seed: int, **config):
    """diffusers UNet with its default random init, plus random norm affines: by default every
    norm weight is 1 and bias 0, and then swapped norm parameters would go unnoticed."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def load_through_our_loader(ref, folder):
    from weights import load_unet  # imported here so the tests above run without weights/

    ref.save_pretrained(folder)
    return load_unet(str(folder)).eval()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny_pair(request, tmp_path_factory):
    """(reference, ours, preset): a random tiny diffusers UNet and the same weights in ours."""
    diffusers_config, preset = {"sd1": (DIFFUSERS_TINY_SD1, UNetConfig.tiny()),
                                "sd2": (DIFFUSERS_TINY_SD2, UNetConfig.tiny_sd2())}[request.param]
    ref = random_reference_unet(0, **diffusers_config)
    return ref, load_through_our_loader(ref, tmp_path_factory.mktemp("unet")), preset


def test_parity_with_diffusers_tiny(tiny_pair):
    ref, ours, preset = tiny_pair
    assert ours.config == preset  # our tiny presets are exactly these reference configs
    x, t, context = tiny_inputs(preset, batch=3)
    with torch.no_grad():
        expected = ref(x, t, context).sample
        out = ours(x, t, context)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not two zero maps
    assert (out - expected).abs().max() <= TINY_ATOL


def test_control_residuals_match_diffusers_additional_residuals(tiny_pair):
    """Our control list (input blocks in order, middle last) is diffusers'
    down_block_additional_residuals + mid_block_additional_residual."""
    ref, ours, preset = tiny_pair
    x, t, context = tiny_inputs(preset)
    shapes = [(2, 32, 8, 8)] * 3 + [(2, 32, 4, 4)] + [(2, 64, 4, 4)] * 2 + [(2, 64, 4, 4)]
    g = torch.Generator().manual_seed(3)
    control = [torch.randn(s, generator=g) for s in shapes]
    with torch.no_grad():
        expected = ref(x, t, context, down_block_additional_residuals=tuple(control[:-1]),
                       mid_block_additional_residual=control[-1]).sample
        out = ours(x, t, context, control=control)
        bare = ours(x, t, context)
    assert (out - bare).abs().max() > 1e-2  # the residuals matter
    assert (out - expected).abs().max() <= TINY_ATOL


@pytest.mark.slow
def test_parity_with_diffusers_sd15_size(tmp_path):
    """The real SD 1.5 UNet (random weights), batch 1, 32x32 latent, 77 tokens.

    Tolerance 1e-4, not 1e-5: at this size float32 summation-order noise alone is ~7e-6 (docs/testing.md:
    the reference UNet against itself with its two attention implementations), and a different
    matmul blocking on another CPU can add a few times that. A real bug is orders of magnitude
    larger. (Measured here: 4.3e-6; our SD 1.x proj_in/proj_out run as Linears, theirs as 1x1 convs.)
    """
    from weights import load_unet  # noqa: F401  (fail before the ~20 s reference build)

    ref = random_reference_unet(0, sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    ours = load_through_our_loader(ref, tmp_path / "unet")
    assert ours.config == UNetConfig.sd15()
    x, t, context = tiny_inputs(UNetConfig.sd15(), batch=1, size=32, tokens=77)
    with torch.no_grad():
        expected = ref(x, t, context).sample
        out = ours(x, t, context)
    assert expected.abs().max() > 0.1
    assert (out - expected).abs().max() <= 1e-4
