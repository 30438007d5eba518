"""NoiseSchedule: the SD tables, the forward process and the eps / x0 / v conversions.

Reference: diffusers' DDPMScheduler(beta_schedule="scaled_linear", 0.00085, 0.012) and the original
LDM recipe. diffusers builds its betas and alphas_cumprod in float32 (measured: up to 4.7e-7 from
the float64 values, rounding accumulated over the 1000-term cumprod), so float64 agreement to 1e-12
is checked against the LDM float64 recipe re-derived here in numpy, and against diffusers' own
add_noise / get_velocity code once it is handed the float64 table; the float32 tables as shipped
are compared at their own precision.
"""
import diffusers
import numpy as np
import pytest
import torch

from model.schedule import NoiseSchedule


def reference_scheduler():
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False)


def test_tables_are_float64_cpu_and_match_the_ldm_recipe():
    schedule = NoiseSchedule()
    assert schedule.betas.dtype == torch.float64 and schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.betas.device.type == "cpu" and schedule.betas.shape == (1000,)
    # LDM make_beta_schedule("linear"): linspace of sqrt(beta) in float64, squared; np.cumprod.
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    assert np.abs(schedule.betas.numpy() - betas).max() <= 1e-12
    assert np.abs(schedule.alphas_cumprod.numpy() - alphas_cumprod).max() <= 1e-12
    assert schedule.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-15)


def test_tables_match_diffusers_float32_tables():
    schedule, reference = NoiseSchedule(), reference_scheduler()
    # diffusers' linspace runs in float32: each beta is off by at most one float32 ulp of 0.012.
    assert (schedule.betas - reference.betas.double()).abs().max().item() <= 2e-9
    # ... and its float32 cumprod accumulates ~1000 roundings (measured 4.7e-7).
    assert (schedule.alphas_cumprod - reference.alphas_cumprod.double()).abs().max().item() <= 1e-6


def test_built_under_meta_device_still_holds_real_tables():
    with torch.device("meta"):
        schedule = NoiseSchedule()
        ab = schedule.alpha_bar(10)
    assert schedule.alphas_cumprod.device.type == "cpu" and ab.device.type == "cpu"
    assert torch.equal(schedule.alphas_cumprod, NoiseSchedule().alphas_cumprod)


def test_q_sample_and_v_target_match_diffusers_code_with_the_same_table():
    schedule, reference = NoiseSchedule(), reference_scheduler()
    reference.alphas_cumprod = schedule.alphas_cumprod.clone()  # same float64 table: compares the formulas
    x0, noise = torch.randn(6, 4, 8, 8, dtype=torch.float64), torch.randn(6, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert (schedule.q_sample(x0, t, noise) - reference.add_noise(x0, noise, t)).abs().max().item() <= 1e-12
    assert (schedule.v_target(x0, t, noise) - reference.get_velocity(x0, noise, t)).abs().max().item() <= 1e-12
    assert schedule.get_v(x0, t, noise).equal(schedule.v_target(x0, t, noise))


def test_q_sample_and_v_target_match_diffusers_as_shipped_in_float32():
    schedule, reference = NoiseSchedule(), reference_scheduler()
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    out, ref = schedule.q_sample(x0, t, noise), reference.add_noise(x0, noise, t)
    assert out.dtype == torch.float32
    # Float32 tables: sqrt(1 - alpha_bar_0) = 0.029 carries ~1e-6 relative error in diffusers' table.
    assert (out - ref).abs().max().item() <= 1e-5
    assert (schedule.v_target(x0, t, noise) - reference.get_velocity(x0, noise, t)).abs().max().item() <= 1e-5


def test_conversions_invert_each_other():
    schedule = NoiseSchedule()
    x0, eps = torch.randn(5, 4, 8, 8, dtype=torch.float64), torch.randn(5, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 3, 400, 901, 999])
    x_t = schedule.q_sample(x0, t, eps)
    v = schedule.v_target(x0, t, eps)
    torch.testing.assert_close(schedule.predict_x0(x_t, t, eps), x0, atol=1e-10, rtol=0)
    torch.testing.assert_close(schedule.predict_eps(x_t, t, x0), eps, atol=1e-10, rtol=0)
    torch.testing.assert_close(schedule.eps_from_v(x_t, t, v), eps, atol=1e-10, rtol=0)
    torch.testing.assert_close(schedule.x0_from_v(x_t, t, v), x0, atol=1e-10, rtol=0)
    # (x_t, v) is (x0, eps) rotated by the angle phi_t with cos = sqrt(alpha_bar_t): lengths are kept.
    torch.testing.assert_close(v ** 2 + x_t ** 2, eps ** 2 + x0 ** 2, atol=1e-10, rtol=0)


def test_timestep_types_and_interpolation():
    schedule = NoiseSchedule()
    ab = schedule.alphas_cumprod
    assert schedule.alpha_bar(7).item() == ab[7].item()
    assert torch.equal(schedule.alpha_bar(torch.tensor([7, 500])), ab[[7, 500]])
    assert torch.equal(schedule.alpha_bar(torch.tensor([7.0, 500.0])), ab[[7, 500]])  # integer-valued floats exact
    mid = schedule.alpha_bar(torch.tensor([500.5])).item()
    assert ab[501].item() < mid < ab[500].item()
    # log-linear interpolation: log ab(500.5) is the mean of the neighbours' logs
    assert np.log(mid) == pytest.approx((np.log(ab[500].item()) + np.log(ab[501].item())) / 2, abs=1e-14)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        schedule.alpha_bar(torch.tensor([1000]))
    with pytest.raises(ValueError, match="timesteps must lie in"):
        schedule.alpha_bar(-0.5)
    snr = schedule.snr(torch.arange(1000))
    assert snr.dtype == torch.float64 and bool((snr[1:] < snr[:-1]).all())
    torch.testing.assert_close(snr, ab / (1 - ab), atol=0, rtol=1e-14)


def test_output_follows_input_dtype_and_scalar_t():
    schedule = NoiseSchedule()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x0, eps = torch.randn(2, 4, 4, 4, dtype=dtype), torch.randn(2, 4, 4, 4, dtype=dtype)
        assert schedule.q_sample(x0, 10, eps).dtype == dtype
        assert schedule.q_sample(x0, torch.tensor([10, 20]), eps).dtype == dtype
    with pytest.raises(ValueError, match="batch"):
        schedule.q_sample(torch.randn(2, 4, 4, 4), torch.tensor([1, 2, 3]), torch.randn(2, 4, 4, 4))


def test_posterior_matches_ddpm_eq7_on_the_full_chain():
    schedule = NoiseSchedule()
    betas, ab = schedule.betas, schedule.alphas_cumprod
    x0, x_t = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 500, 999])
    mean, var = schedule.q_posterior_mean_variance(x0, x_t, t)
    ab_prev = ab[t - 1]
    # Ho et al. eq. 7 written with the table betas (guided-diffusion's posterior coefficients).
    coef1 = betas[t] * ab_prev.sqrt() / (1 - ab[t])
    coef2 = (1 - ab_prev) * (1 - betas[t]).sqrt() / (1 - ab[t])
    expected_var = betas[t] * (1 - ab_prev) / (1 - ab[t])
    torch.testing.assert_close(mean, coef1.view(-1, 1, 1, 1) * x0 + coef2.view(-1, 1, 1, 1) * x_t, atol=1e-12, rtol=0)
    torch.testing.assert_close(var.flatten(), expected_var, atol=1e-15, rtol=1e-9)


def test_posterior_past_the_last_step_is_x0_with_zero_variance():
    schedule = NoiseSchedule()
    x0, x_t = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, 4, dtype=torch.float64)
    for t in (0, 21):  # the full chain's t=0, and a respaced chain whose last kept step is 21
        mean, var = schedule.q_posterior_mean_variance(x0, x_t, t, -1)
        torch.testing.assert_close(mean, x0, atol=1e-12, rtol=0)
        assert var.item() == 0.0
