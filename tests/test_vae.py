"""KL autoencoder: tiny-config behaviour, the posterior, and parity with diffusers' AutoencoderKL.

Parity tests save the reference with its own `save_pretrained` and load the folder through OUR
loader (`weights.load_vae`), which also turns diffusers' Linear attention weights into LDM's 1x1
convs.
"""
import pytest
import torch

from model.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

TINY_ATOL = 1e-5  # docs/testing.md: float32 parity on tiny configs


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(VAEConfig.tiny()).eval()


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # [-1, 1]


def test_configs_keep_the_8x_geometry():
    assert VAEConfig.sd().downsample_factor == 8
    assert VAEConfig.tiny().downsample_factor == 8
    assert VAEConfig.sd().scaling_factor == 0.18215 and VAEConfig.tiny().scaling_factor == 0.18215
    with pytest.raises(ValueError, match="norm_groups"):
        VAEConfig(base_channels=48)


def test_tiny_shapes_dtype_determinism():
    x = images()
    with torch.no_grad():
        posterior = tiny_vae().encode(x)
        again = tiny_vae().encode(x)
        other = tiny_vae(seed=1).encode(x)
        recon = tiny_vae().decode(posterior.mean)
    assert posterior.mean.shape == (2, 4, 4, 4) and posterior.mean.dtype == torch.float32
    assert posterior.logvar.shape == posterior.std.shape == (2, 4, 4, 4)
    assert recon.shape == (2, 3, 32, 32) and recon.dtype == torch.float32
    assert torch.isfinite(recon).all()
    assert torch.equal(posterior.mean, again.mean) and torch.equal(posterior.logvar, again.logvar)
    assert not torch.allclose(posterior.mean, other.mean)


def test_non_square_and_size_check():
    vae = tiny_vae()
    with torch.no_grad():
        assert vae.encode(images(1, 64)[..., :32, :]).mean.shape == (1, 4, 4, 8)
        with pytest.raises(ValueError, match="multiple of 8"):
            vae.encode(images(1)[..., :28, :28])


def test_posterior_clamp_sample_and_mode():
    moments = torch.cat([torch.zeros(2, 4, 3, 3), torch.full((2, 4, 3, 3), -50.0)], dim=1)
    moments[:, 4:, 0, 0] = 40.0
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.min() == -30.0 and posterior.logvar.max() == 20.0
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))
    assert posterior.mode() is posterior.mean

    moments = torch.randn(3, 8, 4, 4)
    posterior = DiagonalGaussian(moments)
    a = posterior.sample(torch.Generator().manual_seed(5))
    b = posterior.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, posterior.mean)
    torch.testing.assert_close(a, posterior.mean + posterior.std * torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5)))


def test_per_row_generators_make_samples_batch_independent():
    moments = torch.randn(3, 8, 4, 4)
    batch = DiagonalGaussian(moments).sample([torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    alone = DiagonalGaussian(moments[1:2]).sample([torch.Generator().manual_seed(8)])
    assert torch.equal(batch[1:2], alone)
    with pytest.raises(ValueError, match="generators"):
        DiagonalGaussian(moments).sample([torch.Generator()])


def test_bf16_round_trip_is_finite_and_close():
    vae = tiny_vae()
    x = images(1)  # bf16 convolutions are slow on CPUs without bf16 units: keep it small
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).mean)
        vae = vae.to(torch.bfloat16)
        out = vae.decode(vae.encode(x.bfloat16()).mean)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_meta_construction_has_no_buffers():
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.sd())
    assert not list(vae.buffers())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD's VAE


# ----------------------------------------------------------------------------------------------
# Parity with diffusers through our loader
# ----------------------------------------------------------------------------------------------

DIFFUSERS_TINY = dict(  # the diffusers twin of VAEConfig.tiny()
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, norm_num_groups=8, sample_size=64)
DIFFUSERS_SD = dict(  # SD 1.x / 2.x vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=512)


def reference_through_our_loader(tmp_path, seed: int, **config):
    """A diffusers AutoencoderKL with random weights (norm affines randomised too, so swapped
    norms would show), saved by diffusers and loaded by weights.load_vae."""
    from diffusers import AutoencoderKL as ReferenceAutoencoderKL

    from weights import load_vae

    torch.manual_seed(seed)
    ref = ReferenceAutoencoderKL(**config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "vae")
    return ref, load_vae(str(tmp_path / "vae")).eval()


def compare(ref, ours, size: int, atol: float):
    x = images(2, size)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, size // 8, size // 8, generator=g)
    with torch.no_grad():
        expected, got = ref.encode(x).latent_dist, ours.encode(x)
        decoded_ref, decoded = ref.decode(z).sample, ours.decode(z)
    assert decoded_ref.abs().max() > 0.1
    assert (got.mean - expected.mean).abs().max() <= atol
    assert (got.logvar - expected.logvar).abs().max() <= atol
    assert (decoded - decoded_ref).abs().max() <= atol


def test_parity_with_diffusers_tiny(tmp_path):
    ref, ours = reference_through_our_loader(tmp_path, 0, **DIFFUSERS_TINY)
    assert ours.config == VAEConfig.tiny()
    compare(ref, ours, 32, TINY_ATOL)


@pytest.mark.slow
def test_parity_with_diffusers_sd_size(tmp_path):
    """The real SD VAE (random weights) at 64x64 pixels. 1e-4 as for the real-size UNet: at 512
    channels float32 summation-order noise from any difference in kernel choice or memory layout
    is ~1e-5 (2.6e-5 measured on the decoder when our attention residual was contiguous and
    theirs channels-last); a real bug is far larger. Measured now: 0.0."""
    ref, ours = reference_through_our_loader(tmp_path, 0, **DIFFUSERS_SD)
    assert ours.config == VAEConfig.sd()
    compare(ref, ours, 64, 1e-4)
