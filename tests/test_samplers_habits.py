"""The samplers users expect from A1111 / diffusers: Euler ancestral, UniPC and DPM++ 2M Karras,
each over full loops against its diffusers scheduler (<= 1e-5, float32), as tests/test_samplers.py
does for DDIM, DDPM and DPM-Solver++ (same dummy model, x_T and per-row generators)."""
import diffusers
import numpy as np
import pytest
import torch

from sample.dpm_solver import karras_timesteps, sample_dpm_solver_karras
from sample.euler_ancestral import euler_timesteps, sample_euler_ancestral
from sample.guidance import as_eps_denoiser
from sample.noise import generators_from_seeds
from sample.pipeline import SAMPLERS, generate, random_pipeline
from sample.sigmas import euler_levels, karras_levels
from sample.timesteps import dpm_solver_timesteps
from sample.unipc import sample_unipc
from test_samplers import SCHEDULE, SD_SCHEDULE, SEEDS, TOL, dummy_model, x_T

pytestmark = pytest.mark.usefixtures("one_thread")


def denoiser_for(prediction_type):
    """The dummy through our eps wrapper; an eps model ignores the samplers' alpha_bar= (the
    pipeline's ClassifierFreeGuidance does the same)."""
    model = dummy_model(prediction_type)
    if prediction_type == "epsilon":
        return lambda x, t, alpha_bar=None: model(x, t)
    return as_eps_denoiser(model, SCHEDULE, prediction_type)


def test_levels_match_diffusers_spacings():
    for steps in (1, 2, 7, 20, 50, 100):
        euler = diffusers.EulerAncestralDiscreteScheduler(**SD_SCHEDULE)
        euler.set_timesteps(steps)
        ts, sigmas = euler_levels(steps, SCHEDULE)
        assert np.array_equal(np.array(ts, np.float32), euler.timesteps.numpy())
        assert np.abs(np.array(sigmas) - euler.sigmas.numpy()).max() < 1e-5  # float32 vs float64 tables
        karras = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, use_karras_sigmas=True)
        karras.set_timesteps(steps)
        ts, sigmas = karras_levels(steps, SCHEDULE)
        assert ts == karras.timesteps.tolist() == karras_timesteps(steps)
        assert np.abs(np.array(sigmas) - karras.sigmas.numpy()).max() < 1e-5
        assert euler_timesteps(steps) == euler_levels(steps, SCHEDULE)[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_euler_ancestral_matches_diffusers(prediction_type, steps):
    model = dummy_model(prediction_type)
    reference = diffusers.EulerAncestralDiscreteScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    reference.set_timesteps(steps)
    x = x_T() * reference.init_noise_sigma
    generators = generators_from_seeds(SEEDS)
    for t in reference.timesteps:
        x = reference.step(model(reference.scale_model_input(x, t), t), t, x, generator=generators).prev_sample
    out = sample_euler_ancestral(denoiser_for(prediction_type), x_T(), SCHEDULE, euler_timesteps(steps),
                                 generators=generators_from_seeds(SEEDS))
    assert out.dtype == torch.float32
    assert (out - x).abs().max().item() <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_dpm_solver_karras_matches_diffusers(prediction_type, steps):
    model = dummy_model(prediction_type)
    reference = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                      use_karras_sigmas=True, prediction_type=prediction_type)
    reference.set_timesteps(steps)
    x = x_T()
    for t in reference.timesteps:
        x = reference.step(model(x, t), t, x).prev_sample
    out = sample_dpm_solver_karras(denoiser_for(prediction_type), x_T(), SCHEDULE, karras_timesteps(steps))
    assert (out - x).abs().max().item() <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 50])
def test_unipc_matches_diffusers(prediction_type, steps):
    model = dummy_model(prediction_type)
    reference = diffusers.UniPCMultistepScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    assert (reference.config.solver_type, reference.config.solver_order, reference.config.predict_x0) == ("bh2", 2, True)
    reference.set_timesteps(steps)
    assert reference.timesteps.tolist() == dpm_solver_timesteps(steps)
    x = x_T()
    for t in reference.timesteps:
        x = reference.step(model(x, t), t, x).prev_sample
    out = sample_unipc(denoiser_for(prediction_type), x_T(), SCHEDULE, dpm_solver_timesteps(steps))
    assert (out - x).abs().max().item() <= TOL


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_karras", "unipc"])
def test_new_samplers_run_in_the_pipeline_and_are_batch_independent(sampler):
    sd = random_pipeline("tiny", seed=0)
    together = generate(sd, "x", seeds=[1, 2], sampler=sampler, steps=3, guidance=2.0)
    alone = generate(sd, "x", seeds=[2], sampler=sampler, steps=3, guidance=2.0)
    assert together.shape == (2, 3, 64, 64) and torch.isfinite(together).all()
    assert (together[1:] - alone).abs().max() < 1e-4  # same seed, same image (up to batch kernels)
    assert sampler in SAMPLERS
