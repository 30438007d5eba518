"""Guidance wrappers: classifier-free guidance, v -> eps, control residuals, and their composition."""
import pytest
import torch

from model.schedule import NoiseSchedule
from model.unet import UNet, UNetConfig
from sample.ddim import sample_ddim
from sample.guidance import ClassifierFreeGuidance, ControlledModel, EpsFromV, as_eps_denoiser
from sample.timesteps import ddim_timesteps

SCHEDULE = NoiseSchedule()


class RecordingModel:
    """A linear model_fn(x, t, context, control=None) that records every forward's inputs.

    out = 0.5 x + mean(context) + 0.001 t (+ the sum of the control residuals)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, control=None):
        self.calls.append({"x": x, "t": t, "context": context, "control": control})
        out = 0.5 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.001 * t.view(-1, 1, 1, 1)
        if control is not None:
            out = out + sum(control)
        return out


def contexts(batch=3, length=5, dim=8):
    cond = torch.randn(batch, length, dim) + 1.0
    uncond = torch.randn(batch, length, dim) - 1.0
    return cond, uncond


# ---- classifier-free guidance --------------------------------------------------------------------

def test_cfg_is_one_forward_on_the_doubled_batch_uncond_first():
    model, (cond, uncond) = RecordingModel(), contexts()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 10, 10])
    ClassifierFreeGuidance(model, cond, uncond, scale=7.5)(x, t)
    assert len(model.calls) == 1
    call = model.calls[0]
    assert torch.equal(call["x"], torch.cat([x, x])) and torch.equal(call["t"], torch.cat([t, t]))
    assert torch.equal(call["context"], torch.cat([uncond, cond]))  # rows [0, B) uncond, [B, 2B) cond


def test_cfg_hand_check_on_a_linear_model():
    model, (cond, uncond) = RecordingModel(), contexts()
    x, t, scale = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 0]), 4.0
    out = ClassifierFreeGuidance(model, cond, uncond, scale)(x, t)
    # eps_c - eps_u = mean(cond) - mean(uncond): only the context term is amplified.
    m_c, m_u = cond.mean(dim=(1, 2)).view(-1, 1, 1, 1), uncond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    expected = 0.5 * x + 0.001 * t.view(-1, 1, 1, 1) + m_u + scale * (m_c - m_u)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_cfg_scale_1_is_the_cond_only_model_in_one_half_size_forward():
    model, (cond, uncond) = RecordingModel(), contexts()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 20, 30])
    out = ClassifierFreeGuidance(model, cond, uncond, scale=1.0)(x, t)
    assert len(model.calls) == 1 and model.calls[0]["x"].shape[0] == 3
    assert torch.equal(out, RecordingModel()(x, t, cond))
    assert torch.equal(ClassifierFreeGuidance(model, cond, None, scale=7.5)(x, t), out)  # no uncond: no guidance


def test_cfg_broadcasts_a_single_uncond_row_and_checks_batches():
    model, (cond, uncond) = RecordingModel(), contexts()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 10, 10])
    out = ClassifierFreeGuidance(model, cond, uncond[:1], scale=3.0)(x, t)
    expected = ClassifierFreeGuidance(model, cond, uncond[:1].expand(3, -1, -1), scale=3.0)(x, t)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="uncond context has batch 2"):
        ClassifierFreeGuidance(model, cond, uncond[:2], scale=3.0)(x, t)


def test_cfg_on_v_then_eps_equals_cfg_on_eps():
    # eps = sqrt(ab) v + sqrt(1 - ab) x is affine in v with the same x in both halves.
    v_model, (cond, uncond) = RecordingModel(), contexts()

    def eps_model(x, t, context):
        return SCHEDULE.eps_from_v(x, t, v_model(x, t, context))

    x, t = torch.randn(3, 4, 8, 8), torch.tensor([900, 900, 900])
    guided_v = EpsFromV(ClassifierFreeGuidance(v_model, cond, uncond, 7.5), SCHEDULE)(x, t)
    guided_eps = ClassifierFreeGuidance(eps_model, cond, uncond, 7.5)(x, t)
    torch.testing.assert_close(guided_v, guided_eps, atol=1e-5, rtol=0)


def test_cfg_batched_equals_two_separate_tiny_unet_forwards():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    cond, uncond = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([981, 981])
    with torch.no_grad():
        out = ClassifierFreeGuidance(unet, cond, uncond, 7.5)(x, t)
        e_c, e_u = unet(x, t, cond), unet(x, t, uncond)
    torch.testing.assert_close(out, e_u + 7.5 * (e_c - e_u), atol=1e-5, rtol=0)


# ---- v -> eps ------------------------------------------------------------------------------------

def test_eps_from_v_recovers_eps():
    x0, eps = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    x_t, v = SCHEDULE.q_sample(x0, t, eps), SCHEDULE.v_target(x0, t, eps)
    denoiser = as_eps_denoiser(lambda x, t: v, SCHEDULE, "v_prediction")
    assert isinstance(denoiser, EpsFromV)
    torch.testing.assert_close(denoiser(x_t, t), eps, atol=1e-10, rtol=0)


def test_as_eps_denoiser_passes_eps_models_through_and_rejects_unknown_types():
    def model(x, t):
        return x

    assert as_eps_denoiser(model, SCHEDULE, "epsilon") is model
    with pytest.raises(ValueError, match="prediction_type"):
        as_eps_denoiser(model, SCHEDULE, "sample")


# ---- control residuals ---------------------------------------------------------------------------

class RecordingControl:
    """control_fn(x, t, context, hint, **kwargs) -> two residuals shaped like x; records its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, hint, scale=1.0, guess_mode=False):
        self.calls.append({"x": x, "hint": hint, "context": context, "scale": scale, "guess_mode": guess_mode})
        r = scale * hint.mean(dim=1, keepdim=True).expand_as(x)  # (B, 3, H, W) -> (B, C, H, W)
        return [r, 2 * r]


def test_control_without_cfg_uses_the_hint_as_is():
    unet, control = RecordingModel(), RecordingControl()
    cond, _ = contexts()
    x, t, hint = torch.randn(3, 4, 8, 8), torch.tensor([5, 5, 5]), torch.rand(3, 3, 8, 8)
    out = ClassifierFreeGuidance(ControlledModel(unet, control, hint, scale=0.5), cond, None)(x, t)
    assert torch.equal(control.calls[0]["hint"], hint) and control.calls[0]["scale"] == 0.5
    r = 0.5 * hint.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, RecordingModel()(x, t, cond) + 3 * r, atol=1e-6, rtol=0)


def test_control_under_cfg_tiles_the_hint_to_the_doubled_batch():
    unet, control = RecordingModel(), RecordingControl()
    cond, uncond = contexts()
    x, t, hint = torch.randn(3, 4, 8, 8), torch.tensor([5, 5, 5]), torch.rand(3, 3, 8, 8)
    ClassifierFreeGuidance(ControlledModel(unet, control, hint), cond, uncond, 7.5)(x, t)
    assert len(unet.calls) == 1 and len(control.calls) == 1
    assert torch.equal(control.calls[0]["hint"], torch.cat([hint, hint]))
    assert torch.equal(control.calls[0]["x"], torch.cat([x, x]))
    assert unet.calls[0]["control"][0].shape[0] == 6


def test_guess_mode_controls_only_the_cond_half():
    unet, control = RecordingModel(), RecordingControl()
    cond, uncond = contexts()
    x, t, hint = torch.randn(3, 4, 8, 8), torch.tensor([5, 5, 5]), torch.rand(3, 3, 8, 8)
    controlled = ControlledModel(unet, control, hint, cond_only=True, guess_mode=True)
    out = ClassifierFreeGuidance(controlled, cond, uncond, 7.5)(x, t)
    call = control.calls[0]
    assert call["guess_mode"] is True
    assert torch.equal(call["x"], x) and torch.equal(call["hint"], hint) and torch.equal(call["context"], cond)
    residuals = unet.calls[0]["control"]
    assert all(torch.equal(r[:3], torch.zeros_like(r[:3])) for r in residuals)  # uncond rows: no control
    # By hand: uncond half = plain model, cond half = model + control.
    plain = RecordingModel()
    e_u = plain(x, t, uncond)
    e_c = plain(x, t, cond) + 3 * hint.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, e_u + 7.5 * (e_c - e_u), atol=1e-5, rtol=0)


def test_controlled_model_checks_the_batch():
    controlled = ControlledModel(RecordingModel(), RecordingControl(), torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="hint has batch 3"):
        controlled(torch.randn(4, 4, 8, 8), torch.zeros(4, dtype=torch.long), torch.randn(4, 5, 8))


# ---- composition with a sampler ------------------------------------------------------------------

def test_sampler_calls_the_guided_model_once_per_step():
    unet, control = RecordingModel(), RecordingControl()
    cond, uncond = contexts(batch=2)
    hint = torch.rand(2, 3, 8, 8)
    denoiser = as_eps_denoiser(ClassifierFreeGuidance(ControlledModel(unet, control, hint), cond, uncond, 5.0),
                               SCHEDULE, "v_prediction")
    out = sample_ddim(denoiser, torch.randn(2, 4, 8, 8), SCHEDULE, ddim_timesteps(4))
    assert len(unet.calls) == 4 and len(control.calls) == 4
    assert [c["t"][0].item() for c in unet.calls] == ddim_timesteps(4)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
