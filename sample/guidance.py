"""Wrappers that turn a UNet into the `denoiser(x, t) -> eps` the samplers take.

The samplers know nothing of prompts, guidance, control or parameterisation; each of those is one
wrapper here, and they compose from the inside out:

    model_fn = unet                                                    # (x, t, context, control=None) -> eps or v
    model_fn = ControlledModel(unet, controlnet, hint, scale=1.0)      # optional: adds control residuals
    guided   = ClassifierFreeGuidance(model_fn, cond, uncond, scale)   # (x, t) -> eps or v
    denoiser = as_eps_denoiser(guided, schedule, prediction_type)      # (x, t) -> eps
    x0 = sample_ddim(denoiser, x_T, schedule, ddim_timesteps(50))

A model function is `model_fn(x, t, context) -> output` (UNet: `unet(x, t, context, control=None)`).

Samplers whose noise levels fall between the training table's timesteps (Euler ancestral, the
Karras spacing; sample/sigmas.py) call `denoiser(x, t, alpha_bar=ab)`: the network sees t, and
the v -> eps conversion uses the (B,) float64 alpha_bar the sampler means instead of the table's
value at t. The other wrappers accept and ignore it.

Batch layout under classifier-free guidance, which `ControlledModel` relies on: the model sees ONE
forward of 2B rows, rows [0, B) unconditional (uncond / negative-prompt context) and rows [B, 2B)
conditional, both with the same x and t. CFG (Ho & Salimans 2022, eq. 6 in the eps form SD uses):

    out = out_uncond + s * (out_cond - out_uncond)

It is applied to the raw model output; for a v-model this equals guiding eps, because
eps = sqrt(ab) v + sqrt(1 - ab) x is affine in v with the same x in both halves.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from model.schedule import NoiseSchedule

ModelFn = Callable[..., torch.Tensor]                       # (x, t, context, **kwargs) -> eps or v
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> eps
ControlFn = Callable[..., list[torch.Tensor]]               # (x, t, context, hint) -> residuals


class ClassifierFreeGuidance:
    """(x, t) -> guided model output, with cond and uncond in one batched forward.

    model_fn: (x, t, context) -> output, e.g. a UNet or a `ControlledModel`.
    cond: (B, L, D) prompt context, one row per sample (or (1, L, D), broadcast to the batch).
    uncond: (B, L, D) or (1, L, D) context of "" or of the negative prompt; None means no guidance.
    scale: guidance scale s. s == 1 (or uncond None) runs only the conditional half: out = out_cond.
    """

    def __init__(self, model_fn: ModelFn, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                 scale: float = 7.5):
        self.model_fn = model_fn
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)

    def _context(self, context: torch.Tensor, batch: int, name: str) -> torch.Tensor:
        if context.shape[0] == batch:
            return context
        if context.shape[0] == 1:
            return context.expand(batch, *context.shape[1:])  # (1, L, D) -> (B, L, D)
        raise ValueError(f"ClassifierFreeGuidance: {name} context has batch {context.shape[0]}, expected 1 or {batch}")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]  # alpha_bar: for EpsFromV outside; the raw output does not depend on it
        cond = self._context(self.cond, batch, "cond")
        if self.uncond is None or self.scale == 1.0:
            return self.model_fn(x, t, cond)
        uncond = self._context(self.uncond, batch, "uncond")
        out = self.model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))  # (2B, ...)
        out_uncond, out_cond = out.chunk(2)  # rows [0, B) uncond, [B, 2B) cond
        return out_uncond + self.scale * (out_cond - out_uncond)


class ControlledModel:
    """A model function with control residuals: (x, t, context) -> model_fn(x, t, context, control=...).

    control_fn(x, t, context, hint) -> list of residuals (ControlNet order, middle block last); a
    `ControlNet` module fits as is, with extra keywords (scale, guess_mode) passed through
    `control_kwargs`. hint: (B, 3, H, W) driver in [0, 1], one row per sample.

    The hint follows the batch the model sees: under CFG that is 2B rows (uncond half, then cond
    half), so the hint is tiled to [hint; hint]. With `cond_only=True` (ControlNet "guess mode" with
    CFG) the control net runs on the conditional rows only and the unconditional rows get zero
    residuals, i.e. no control, as in the reference implementations. Without CFG (batch B) every
    row is conditional and gets control either way.
    """

    def __init__(self, model_fn: ModelFn, control_fn: ControlFn, hint: torch.Tensor, *, cond_only: bool = False,
                 active: Callable[[], bool] | None = None, **control_kwargs):
        self.model_fn = model_fn
        self.control_fn = control_fn
        self.hint = hint
        self.cond_only = cond_only
        self.active = active  # () -> bool: is the control on at this step (control_start / _end); None: always
        self.control_kwargs = control_kwargs

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.active is not None and not self.active():
            return self.model_fn(x, t, context)  # outside the control window: the plain model
        n = self.hint.shape[0]
        if x.shape[0] not in (n, 2 * n):
            raise ValueError(f"ControlledModel: hint has batch {n}, so the model batch must be {n} "
                             f"(no CFG) or {2 * n} (CFG), got {x.shape[0]}")
        if x.shape[0] == n:
            control = self.control_fn(x, t, context, self.hint, **self.control_kwargs)
        elif not self.cond_only:
            hint = torch.cat([self.hint, self.hint])  # (B, 3, H, W) -> (2B, 3, H, W), matching [uncond; cond]
            control = self.control_fn(x, t, context, hint, **self.control_kwargs)
        else:
            cond_rows = slice(n, 2 * n)
            control = self.control_fn(x[cond_rows], t[cond_rows], context[cond_rows], self.hint, **self.control_kwargs)
            control = [torch.cat([torch.zeros_like(r), r]) for r in control]  # uncond rows: no control
        return self.model_fn(x, t, context, control=control)


class EpsFromV:
    """(x, t) -> eps from a v-predicting (x, t) -> v: eps = sqrt(ab_t) v + sqrt(1 - ab_t) x."""

    def __init__(self, model_fn: Denoiser, schedule: NoiseSchedule):
        self.model_fn = model_fn
        self.schedule = schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor | None = None) -> torch.Tensor:
        v = self.model_fn(x, t)
        if alpha_bar is None:
            return self.schedule.eps_from_v(x, t, v)
        # the sampler's own noise level (off the table): eps = sqrt(ab) v + sqrt(1 - ab) x
        shape = (-1,) + (1,) * (x.dim() - 1)  # (B,) -> (B, 1, 1, 1)
        sqrt_ab = alpha_bar.sqrt().to(device=x.device, dtype=x.dtype).view(shape)
        sqrt_1m_ab = (1.0 - alpha_bar).sqrt().to(device=x.device, dtype=x.dtype).view(shape)
        return sqrt_ab * v + sqrt_1m_ab * x


def as_eps_denoiser(model_fn: Denoiser, schedule: NoiseSchedule, prediction_type: str) -> Denoiser:
    """The (x, t) -> eps denoiser for a model of the given prediction type ("epsilon" | "v_prediction")."""
    if prediction_type == "epsilon":
        return model_fn
    if prediction_type == "v_prediction":
        return EpsFromV(model_fn, schedule)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
