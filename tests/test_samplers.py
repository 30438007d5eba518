"""Samplers: full loops against diffusers' schedulers, per-sample noise, and a first-principles check.

How the two sides are driven identically:
- The model is a dummy, a deterministic function of (x, t) only (`dummy_model`): both loops call it
  on their own current x, so any difference is the samplers' arithmetic, compounded over the loop.
- x_T is one tensor handed to both.
- Injected noise: our samplers draw, at each step that adds noise, one torch.randn((1, C, h, w)) per
  row from that row's generator (sample/noise.py). diffusers' `step(..., generator=[g_0, ..., g_B-1])`
  draws through `randn_tensor`, which for a list of generators makes exactly the same per-row calls.
  Both sides get fresh generators seeded alike, and both draw once per noisy step in the same step
  order: DDIM with eta > 0 at every step (the last included); DDPM at every step but the last.
  (diffusers DDPM also draws at the last step when that step is t > 0, e.g. with steps_offset=1,
  but scales it by sqrt(1e-20): no visible effect, and nothing is drawn after it.)
- For v-prediction, diffusers gets prediction_type="v_prediction" and the raw v; our samplers get
  the same v through `as_eps_denoiser` (v -> eps), so the wrapper is covered by the loop too.

Tolerance 1e-5 absolute in float32 (docs/testing.md). diffusers keeps its schedule in float32; that is
within 1e-5 everywhere except the full 1000-step DDPM chain, where its per-step beta
1 - ab_t / ab_{t-1} loses ~5 digits to cancellation (measured 3e-5 drift at the end). That test
hands diffusers our float64 table so it compares the algorithms, and a second test shows the
as-shipped float32 reference is the one further from the float64 answer.
"""
import functools

import diffusers
import pytest
import torch

from model.schedule import NoiseSchedule
from sample.ddim import sample_ddim
from sample.ddpm import sample_ddpm
from sample.dpm_solver import sample_dpm_solver
from sample.guidance import as_eps_denoiser
from sample.noise import generators_from_seeds, randn_per_sample
from sample.timesteps import (check_timesteps, ddim_timesteps, ddpm_timesteps, dpm_solver_timesteps,
                              leading_timesteps)

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULE = NoiseSchedule()
TOL = 1e-5
SEEDS = [11, 12]
DATA_MEAN, DATA_STD = 0.3, 0.5  # the dummy's "data": x0 ~ N(0.3, 0.5^2) per element


def gaussian_eps(x, t, schedule=SCHEDULE):
    """E[eps | x_t] when x0 ~ N(DATA_MEAN, DATA_STD^2) element-wise: the exact eps-predictor."""
    ab = schedule.alpha_bar(t).to(x.dtype).view(-1, 1, 1, 1)
    return (1 - ab).sqrt() * (x - ab.sqrt() * DATA_MEAN) / (ab * DATA_STD ** 2 + 1 - ab)


def gaussian_v(x, t, schedule=SCHEDULE):
    """The exact v-predictor for the same data: v = sqrt(ab) eps - sqrt(1 - ab) x0_hat."""
    ab = schedule.alpha_bar(t).to(x.dtype).view(-1, 1, 1, 1)
    eps = gaussian_eps(x, t, schedule)
    return ab.sqrt() * eps - (1 - ab).sqrt() * (x - (1 - ab).sqrt() * eps) / ab.sqrt()


_g = torch.Generator().manual_seed(1234)
MIX = torch.randn(4, 4, generator=_g) * 0.1     # fixed random channel-mixing map
PHASE = torch.randn(1, 4, 8, 8, generator=_g)  # fixed random spatial phase


def dummy_model(prediction_type):
    """A deterministic (x, t) -> eps or v: the exact Gaussian predictor, a fixed random linear map of
    x and a sin(t) term, so that every step's output depends on x and t in a non-trivial way.
    Written with element-wise ops only (a 4x4 BLAS call is slower than the whole step on a busy box)."""
    base = gaussian_eps if prediction_type == "epsilon" else gaussian_v

    def model(x, t):
        t = t.reshape(-1).expand(x.shape[0])
        mixed = (MIX.view(1, 4, 4, 1, 1) * x.unsqueeze(1)).sum(2)  # (B, C_in, h, w) -> (B, C_out, h, w)
        return base(x, t) + mixed + 0.05 * torch.sin(t.float().view(-1, 1, 1, 1) / 50 + PHASE)
    return model


def x_T(batch=2):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(99))


def run_reference(scheduler, model, x, generators=None, **step_kwargs):
    """The diffusers loop, as its pipelines write it (no scale_model_input: it is identity here)."""
    for t in scheduler.timesteps:
        extra = {} if generators is None else {"generator": generators}
        x = scheduler.step(model(x, t), t, x, **step_kwargs, **extra).prev_sample
    return x


# ---- timestep spacing ----------------------------------------------------------------------------

def test_ddim_spacing_matches_diffusers_leading_offset_1():
    assert ddim_timesteps(50)[:3] == [981, 961, 941] and ddim_timesteps(50)[-1] == 1
    reference = diffusers.DDIMScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading")
    for steps in range(1, 1000):
        reference.set_timesteps(steps)
        assert ddim_timesteps(steps) == reference.timesteps.tolist(), steps
    with pytest.raises(ValueError, match="steps_offset"):
        ddim_timesteps(1000)  # would reach t=1000 (diffusers returns it and indexes out of range)


def test_ddpm_spacing_matches_diffusers():
    assert ddpm_timesteps(1000) == list(range(999, -1, -1))
    reference = diffusers.DDPMScheduler(**SD_SCHEDULE)
    for steps in range(1, 1001):
        reference.set_timesteps(steps)
        assert ddpm_timesteps(steps) == reference.timesteps.tolist(), steps


def test_dpm_solver_spacing_matches_diffusers_default_linspace():
    reference = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE)
    assert reference.config.timestep_spacing == "linspace"  # what SD configs (which set none) get
    assert dpm_solver_timesteps(20)[:3] == [999, 949, 899] and dpm_solver_timesteps(20)[-1] == 50
    for steps in range(1, 1000):  # includes the half-way ties, e.g. steps=26, that round to even
        reference.set_timesteps(steps)
        assert dpm_solver_timesteps(steps) == reference.timesteps.tolist(), steps


def test_timesteps_are_validated():
    with pytest.raises(ValueError, match="descending"):
        check_timesteps([1, 5], 1000)
    with pytest.raises(ValueError, match="descending"):
        check_timesteps([5, 5, 1], 1000)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        check_timesteps([1000, 1], 1000)
    with pytest.raises(ValueError, match="num_steps"):
        leading_timesteps(0)
    assert check_timesteps(torch.tensor([9, 3, 0]), 1000) == [9, 3, 0]


# ---- full loops vs diffusers ---------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers(prediction_type, steps, eta):
    model = dummy_model(prediction_type)
    reference = diffusers.DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        timestep_spacing="leading", prediction_type=prediction_type)
    reference.set_timesteps(steps)
    expected = run_reference(reference, model, x_T(), generators_from_seeds(SEEDS), eta=eta)
    out = sample_ddim(as_eps_denoiser(model, SCHEDULE, prediction_type), x_T(), SCHEDULE, ddim_timesteps(steps),
                      eta=eta, generators=generators_from_seeds(SEEDS))
    assert out.dtype == torch.float32
    assert (out - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_dpm_solver_matches_diffusers(prediction_type, steps):
    model = dummy_model(prediction_type)
    reference = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                      prediction_type=prediction_type)
    reference.set_timesteps(steps)
    expected = run_reference(reference, model, x_T())
    out = sample_dpm_solver(as_eps_denoiser(model, SCHEDULE, prediction_type), x_T(), SCHEDULE,
                            dpm_solver_timesteps(steps))
    assert (out - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps,steps_offset", [(10, 0), (20, 0), (50, 0), (50, 1)])
def test_ddpm_respaced_matches_diffusers(prediction_type, steps, steps_offset):
    model = dummy_model(prediction_type)
    reference = diffusers.DDPMScheduler(**SD_SCHEDULE, clip_sample=False, steps_offset=steps_offset,
                                        prediction_type=prediction_type)
    reference.set_timesteps(steps)
    expected = run_reference(reference, model, x_T(), generators_from_seeds(SEEDS))
    out = sample_ddpm(as_eps_denoiser(model, SCHEDULE, prediction_type), x_T(), SCHEDULE,
                      ddpm_timesteps(steps, steps_offset=steps_offset), generators=generators_from_seeds(SEEDS))
    assert (out - expected).abs().max().item() <= TOL


@functools.lru_cache(maxsize=None)  # each reference run is reused by two tests
def full_chain_reference(prediction_type, float64_table, dtype=torch.float32):
    reference = diffusers.DDPMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type=prediction_type)
    if float64_table:
        # The same float64 alpha_bar table we use (what diffusers would hold if it kept float64);
        # its step code then forms the coefficients in float64 and applies them to x, as ours does.
        reference.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
        reference.one = torch.tensor(1.0, dtype=torch.float64)
    # No set_timesteps: the scheduler's default chain 999..0 with prev = t - 1.
    return run_reference(reference, dummy_model(prediction_type), x_T().to(dtype), generators_from_seeds(SEEDS))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_full_chain_matches_diffusers(prediction_type):
    expected = full_chain_reference(prediction_type, float64_table=True)
    out = sample_ddpm(as_eps_denoiser(dummy_model(prediction_type), SCHEDULE, prediction_type), x_T(), SCHEDULE,
                      ddpm_timesteps(1000), generators=generators_from_seeds(SEEDS))
    assert (out - expected).abs().max().item() <= TOL


def test_ddpm_full_chain_drift_of_diffusers_as_shipped_comes_from_its_float32_table():
    with_float64_table = full_chain_reference("epsilon", float64_table=True)
    as_shipped = full_chain_reference("epsilon", float64_table=False)
    # Our sampler with float64 state (same noise: drawn in float32, then cast) lands on the
    # float64-table reference too, so the float32 state is not what limits the agreement ...
    ours64 = sample_ddpm(dummy_model("epsilon"), x_T().double(), SCHEDULE, ddpm_timesteps(1000),
                         generators=generators_from_seeds(SEEDS))
    assert (ours64 - with_float64_table.double()).abs().max().item() <= TOL
    # ... while the two diffusers runs, which differ only in the table, are further apart (3e-5).
    assert (as_shipped - with_float64_table).abs().max().item() > TOL


# ---- per-sample randomness -----------------------------------------------------------------------

def test_randn_per_sample_is_batch_independent():
    batch = randn_per_sample((4, 4, 8, 8), generators_from_seeds([1, 2, 3, 4]))
    for i, seed in enumerate([1, 2, 3, 4]):
        assert torch.equal(batch[i:i + 1], randn_per_sample((1, 4, 8, 8), generators_from_seeds([seed])))
    assert not torch.equal(batch[0], batch[1])
    with pytest.raises(ValueError, match="one generator per batch row"):
        randn_per_sample((4, 4, 8, 8), generators_from_seeds([1, 2]))


@pytest.mark.parametrize("sampler,kwargs,timesteps", [
    (sample_ddpm, {}, ddpm_timesteps(20)),
    (sample_ddim, {"eta": 1.0}, ddim_timesteps(20)),
    (sample_ddim, {"eta": 0.0}, ddim_timesteps(20)),
    (sample_dpm_solver, {}, dpm_solver_timesteps(20)),
])
def test_batch_of_4_equals_four_batch_1_runs(sampler, kwargs, timesteps):
    seeds = [5, 6, 7, 8]
    model = dummy_model("epsilon")  # row-wise: row i's output depends only on row i
    x = randn_per_sample((4, 4, 8, 8), generators_from_seeds([s + 100 for s in seeds]))
    batched = sampler(model, x, SCHEDULE, timesteps, generators=generators_from_seeds(seeds), **kwargs)
    for i, seed in enumerate(seeds):
        alone = sampler(model, x[i:i + 1], SCHEDULE, timesteps, generators=generators_from_seeds([seed]), **kwargs)
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-6, rtol=0)
    if sampler is sample_ddpm or kwargs.get("eta", 0) > 0:  # stochastic: other seeds give another sample
        other = sampler(model, x, SCHEDULE, timesteps, generators=generators_from_seeds([s + 1 for s in seeds]),
                        **kwargs)
        assert (other - batched).abs().max().item() > 1e-3


# ---- first principles: the exact predictor of Gaussian data gives back that data ----------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,kwargs,timesteps", [
    (sample_ddpm, {}, ddpm_timesteps(1000)),
    (sample_ddim, {"eta": 1.0}, ddim_timesteps(999)),
    (sample_ddim, {"eta": 0.0}, ddim_timesteps(500)),
    (sample_dpm_solver, {}, dpm_solver_timesteps(250)),
])
def test_exact_predictor_recovers_the_data_distribution(prediction_type, sampler, kwargs, timesteps):
    """Independent of diffusers: with the exact predictor for x0 ~ N(0.3, 0.5^2), fine-step sampling
    returns that distribution. (Coarse steps legitimately return a narrower one, e.g. std 0.45 at
    20 steps: each step, and above all the last jump to x0_hat = E[x0 | x_t], keeps only the
    posterior mean, whose variance is below the data's. So only fine steps are asserted here.)"""
    model = gaussian_eps if prediction_type == "epsilon" else gaussian_v
    denoiser = as_eps_denoiser(model, SCHEDULE, prediction_type)
    seeds = list(range(4))
    # x_T from the true marginal q(x_T) of this data rather than N(0, I) (they differ by ~2% at
    # t = 981), so that only the sampler's own error is measured.
    x0 = DATA_MEAN + DATA_STD * randn_per_sample((4, 4, 32, 32), generators_from_seeds(seeds))
    x = SCHEDULE.q_sample(x0, timesteps[0], randn_per_sample(x0.shape, generators_from_seeds([s + 20 for s in seeds])))
    out = sampler(denoiser, x, SCHEDULE, timesteps, generators=generators_from_seeds([s + 10 for s in seeds]), **kwargs)
    # 16384 values: the standard error of the mean is 0.004 and of the std 0.003 (measured 0.494-0.497).
    assert out.mean().item() == pytest.approx(DATA_MEAN, abs=0.015)
    assert out.std().item() == pytest.approx(DATA_STD, abs=0.015)


def test_progress_bar_runs():
    out = sample_ddim(dummy_model("epsilon"), x_T(), SCHEDULE, ddim_timesteps(3), progress=True)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_ddim_rejects_eta_outside_0_1():
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(dummy_model("epsilon"), x_T(), SCHEDULE, ddim_timesteps(3), eta=1.5)


@pytest.mark.parametrize("sampler,timesteps", [(sample_ddpm, ddpm_timesteps(10)), (sample_ddim, ddim_timesteps(10)),
                                               (sample_dpm_solver, dpm_solver_timesteps(10))])
def test_samplers_keep_the_dtype_of_x_and_noise_is_precision_independent(sampler, timesteps):
    model = dummy_model("epsilon")

    def bf16_model(x, t):  # stands in for a bfloat16 UNet
        return model(x.float(), t).to(x.dtype)

    out32 = sampler(model, x_T(), SCHEDULE, timesteps, generators=generators_from_seeds(SEEDS))
    out16 = sampler(bf16_model, x_T().bfloat16(), SCHEDULE, timesteps, generators=generators_from_seeds(SEEDS))
    assert out16.dtype == torch.bfloat16
    # The same seeds give the same sample up to bfloat16 rounding (noise is drawn in float32, then cast).
    assert (out16.float() - out32).abs().max().item() < 0.1
