"""train/prior.py on the tiny preset (CPU): the VAE objective, the loss going down, the exported
file loading with weights.load_pipeline (latent scale and image size kept), bit-exact resume after
a stop inside each phase, and a finished run skipping both phases."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import train.prior as prior
from data.demo import DemoConfig, make_demo_dataset
from train.prior import PriorConfig, flat_images, psnr, random_crops, vae_loss
from weights import load_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def surfaces(tmp_path_factory) -> Path:
    """8 defect-free 64 px demo surfaces (COCO JSON) and 2 defective images for --eval-data."""
    folder = tmp_path_factory.mktemp("surfaces")
    make_demo_dataset(DemoConfig(out=str(folder), size=64, num_defective=2, num_free=8), progress=False)
    return folder


def tiny_config(data: Path, out: Path, **overrides) -> PriorConfig:
    base = dict(data=str(data / "free.json"), out=str(out), resolution=64, vae_steps=6, vae_batch_size=4,
                vae_crop=32, unet_steps=6, unet_batch_size=4, unet_warmup_steps=2, log_every=1,
                checkpoint_every=0, num_samples=2, sample_steps=2, progress=False, resume="latest")
    base.update(overrides)
    return PriorConfig(**base)


def test_vae_loss_terms_by_hand():
    g = torch.Generator().manual_seed(0)
    x, recon = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    mean, logvar = torch.randn(2, 4, 1, 1, generator=g), torch.randn(2, 4, 1, 1, generator=g)
    loss, terms = vae_loss(x, recon, mean, logvar, edge_weight=0.5, kl_weight=0.1)
    l1 = (x - recon).abs().mean()
    edge = 0.5 * ((torch.diff(recon, dim=3) - torch.diff(x, dim=3)).abs().mean()
                  + (torch.diff(recon, dim=2) - torch.diff(x, dim=2)).abs().mean())
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    torch.testing.assert_close(terms, torch.stack([l1 + 0.5 * edge + 0.1 * kl, l1, edge, kl]))
    torch.testing.assert_close(loss, l1 + 0.5 * edge + 0.1 * kl)


def test_crops_psnr_and_flat_baseline():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=g)
    crops = random_crops(images, 8, g)
    assert crops.shape == (3, 3, 8, 8) and crops.dtype == torch.uint8
    exact = images.float() / 127.5 - 1
    assert psnr(images, exact) > 90  # identical up to float rounding
    flat = flat_images(images)
    assert flat.shape == images.shape and torch.allclose(flat[0, :, 0, 0], flat[0, :, -1, -1])
    assert psnr(images, flat) < psnr(images, exact)


def test_prior_trains_exports_and_loads(surfaces, tmp_path):
    cfg = tiny_config(surfaces, tmp_path / "prior", vae_steps=12, eval_data=str(surfaces / "annotations.json"))
    result = prior.main(cfg)
    assert not result.stopped and result.exported == tmp_path / "prior" / "prior.safetensors"
    vae_losses = [r["loss"] for r in result.vae_history]
    assert all(torch.isfinite(torch.tensor(v)) for v in vae_losses)
    assert sum(vae_losses[-3:]) < sum(vae_losses[:3])  # the autoencoder learns
    assert len(result.unet_history) == 6 and all(r["loss"] > 0 for r in result.unet_history)
    assert set(result.psnr) == {"train", "eval"}
    out = tmp_path / "prior"
    for name in ("prior.json", "reconstructions.png", "curves.png", "config.json", "samples/unet_step_00000006.png"):
        assert (out / name).is_file(), name

    # The file loads through the ordinary loader with our latent scale and image size.
    model = load_pipeline(out / "prior.safetensors")
    assert model.config.image_size == 64
    assert model.latent_scale == pytest.approx(result.model.latent_scale)
    assert model.latent_scale != 0.18215
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(result.model, name).state_dict(), getattr(model, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name

    # The text encoder is the seeded random init, untouched by training.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(prior.derive_seed(cfg.seed, "init"))
        fresh = prior.StableDiffusion(prior.preset("tiny"))
    assert all(torch.equal(v, model.text_encoder.state_dict()[k]) for k, v in fresh.text_encoder.state_dict().items())

    # A rerun of a finished run trains nothing and writes the same file.
    again = prior.main(cfg)
    assert again.vae_history == [] and again.unet_history == []
    reloaded = load_pipeline(out / "prior.safetensors")
    assert all(torch.equal(v, reloaded.unet.state_dict()[k]) for k, v in model.unet.state_dict().items())


class StopAfter:
    """Stands in for train.monitor.StopSignal: a stop is requested from the n-th poll on."""

    polls = 0

    def __init__(self, n: int):
        self.n = n

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def requested(self) -> bool:
        StopAfter.polls += 1
        return StopAfter.polls >= self.n


@pytest.mark.parametrize("stop_at", [3, 6 + 3])  # inside the VAE phase, inside the UNet phase
def test_resume_after_stop_is_bit_exact(surfaces, tmp_path, monkeypatch, stop_at):
    straight = prior.main(tiny_config(surfaces, tmp_path / "straight"))

    StopAfter.polls = 0
    monkeypatch.setattr(prior, "StopSignal", StopAfter(stop_at))
    first = prior.main(tiny_config(surfaces, tmp_path / "split"))
    assert first.stopped and first.exported is None
    monkeypatch.undo()
    second = prior.main(tiny_config(surfaces, tmp_path / "split"))
    assert not second.stopped

    vae = first.vae_history + second.vae_history
    unet = first.unet_history + second.unet_history
    assert vae == straight.vae_history
    assert unet == straight.unet_history
    for name in ("unet", "vae"):
        a, b = getattr(straight.model, name).state_dict(), getattr(second.model, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert second.model.latent_scale == straight.model.latent_scale


def test_changed_training_setting_is_refused(surfaces, tmp_path):
    cfg = tiny_config(surfaces, tmp_path / "p", vae_steps=2, unet_steps=2, num_samples=0)
    prior.main(cfg)
    with pytest.raises(ValueError, match="vae_lr"):
        prior.main(dataclasses.replace(cfg, vae_lr=5e-4))
    with pytest.raises(ValueError, match="--resume"):
        prior.main(dataclasses.replace(cfg, resume="checkpoints/vae/step_00000002"))
