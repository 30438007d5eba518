"""Condition adherence: does a generated image follow the driver it was generated from?

ControlNet training "converges suddenly": the diffusion loss barely moves while the control goes
from ignored to obeyed. This score watches the thing itself, with no learned model: the driver is
re-extracted from the generated image by the same `topological_driver` procedure and compared with
the input driver, and every defect mask is checked for a defect-like contrast in the generated image.

Inputs: the generated image G (uint8 RGB (H, W, 3)); the input driver D (float32 (3, H, W) in
[0, 1] or uint8 (H, W, 3)), built with DriverConfig `dc` (L = dc.background_level); the defect
instances (M_i, c_i) painted into D; optionally the polarity s_c in {-1, 0, +1} of each class
(-1 defects darker than their surroundings, +1 brighter, 0 unknown / either; see `estimate_polarity`).
Distances are chessboard distances in pixels (square dilations).

(a) Topology agreement A in [0, 1]:
        T_in  = [D_grey * 255 > L / 2]                     the driver's binary topology map
        T_gen = [topology_map(G, dc) > L / 2]              the same procedure on the generated image
        O     = pixels farther than `margin` from every mask (painted pixels carry no topology, and
                the linear upsampling of the map blurs the mask border). A defect drawn unlike the
                source's also shifts the local threshold within the adaptive window, radius
                (block_size // 2 + 1) * downscale px; the small default margin keeps that
                neighbourhood, where such a change costs a few hundredths of A (measured 0.93
                for defects painted white); a margin of the window's radius leaves it out
        A     = max(0, MCC(T_in, T_gen) on O)
    MCC, the Matthews correlation (phi coefficient) of the two binary maps,
        (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)),
    is 1 for identical maps and about 0 for independent ones, whatever fraction of pixels is dark.
    Pixel accuracy would not do: an adaptive threshold marks about half of any textured surface dark,
    so two unrelated images already agree on about half their pixels. If either map is constant on
    O the correlation is undefined: A = 1 when the maps are equal there, else 0.

(b) Defect placement P in [0, 1]: for each instance i (class c),
        Y    = grey level of G (ITU-R BT.601, as the driver), float
        R_i  = ring around M_i: pixels at distance in (ring_gap, ring_gap + ring_width] from M_i and
               farther than ring_gap from every mask (the defect's soft edge and other defects stay out)
        s_i  = max(1.4826 * MAD(Y on R_i), min_noise)      robust noise level of the surroundings
        d_i  = (median(Y on M_i) - median(Y on R_i)) / s_i   robust effect size of the defect
        e_i  = s_c * d_i if s_c != 0 else |d_i|             contrast in the direction the class implies
        p_i  = clip(e_i / effect_ref, 0, 1)
        P    = mean of p_i over the instances
    A defect at least `effect_ref` (default 2) noise levels away from its surroundings, in its class's
    direction, scores 1; a mask region that looks like its surroundings scores about 0. Medians make
    it robust to masks drawn a little larger than the defect (it needs half the mask's pixels to
    differ). Should R_i be empty (a mask covering almost everything), all pixels farther than
    ring_gap from every mask are used; should that be empty too, the instance is left out.

Score S = (A + P) / 2 when there are instances, S = A otherwise, in [0, 1].
When G is the source image the driver was built from, T_gen == T_in exactly, so A = 1, and P = 1
as long as every source defect stands out by effect_ref (true of the demo data; a very faint real
defect gives its source < 1, which bounds what a generated image can reach too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch

from .drivers import DriverConfig, Instances, grey_image, instance_masks, topology_map

MAD_TO_STD = 1.4826  # MAD * 1.4826 estimates the standard deviation of Gaussian noise


@dataclass(frozen=True)
class AdherenceConfig:
    """Parameters of the adherence score (see the module docstring for the definition)."""
    margin: int = 2             # px around the masks left out of the topology comparison
    ring_gap: int = 2           # px between a mask and its background ring
    ring_width: int = 6         # px width of the background ring
    min_noise: float = 2.0      # grey levels: floor of the ring's noise level (flat synthetic surfaces)
    effect_ref: float = 2.0     # effect size (noise levels) that scores a defect as fully present
    polarity_min_effect: float = 1.0  # estimate_polarity: |median effect| needed to call a direction

    def __post_init__(self) -> None:
        for name in ("margin", "ring_gap"):
            if getattr(self, name) < 0:
                raise ValueError(f"AdherenceConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.ring_width < 1:
            raise ValueError(f"AdherenceConfig.ring_width must be >= 1, got {self.ring_width}")
        if self.min_noise <= 0 or self.effect_ref <= 0:
            raise ValueError("AdherenceConfig.min_noise and effect_ref must be > 0")


@dataclass(frozen=True)
class Adherence:
    """One image's adherence: score S, topology agreement A, placement P (None without instances)
    and the signed effect size d_i of every instance (nan when it could not be measured)."""
    score: float
    topology: float
    placement: float | None
    effects: tuple[float, ...] = field(default=())


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within chessboard distance `radius` of a bool mask."""
    if radius <= 0:
        return mask.copy()
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def _driver_grey(driver: torch.Tensor | np.ndarray) -> np.ndarray:
    """The driver's first channel as 0..255 levels, (H, W) float32 (topology is the same in all three)."""
    if isinstance(driver, torch.Tensor):
        if driver.dim() != 3 or driver.shape[0] != 3:
            raise ValueError(f"adherence: driver tensor must be (3, H, W) in [0, 1], got {tuple(driver.shape)}")
        return (driver[0].detach().float().cpu().numpy() * 255.0).round()
    driver = np.asarray(driver)
    if driver.ndim != 3 or driver.shape[2] != 3:
        raise ValueError(f"adherence: driver array must be uint8 (H, W, 3), got {driver.shape}")
    return driver[:, :, 0].astype(np.float32)


def matthews_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """MCC of two bool arrays; for a constant array (undefined), 1.0 if a == b everywhere else 0.0."""
    a, b = a.ravel(), b.ravel()
    tp = float(np.count_nonzero(a & b))
    tn = float(np.count_nonzero(~a & ~b))
    fp = float(np.count_nonzero(~a & b))
    fn = float(np.count_nonzero(a & ~b))
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if denominator == 0:
        return 1.0 if fp + fn == 0 else 0.0
    return (tp * tn - fp * fn) / math.sqrt(denominator)


def topology_agreement(generated: np.ndarray, driver: torch.Tensor | np.ndarray, instances: Instances = None,
                       driver_config: DriverConfig = DriverConfig(),
                       config: AdherenceConfig = AdherenceConfig()) -> float:
    """Part (a), A in [0, 1]: MCC of the input driver's topology and the generated image's,
    away from the masks (clipped at 0)."""
    grey = _driver_grey(driver)
    if grey.shape != generated.shape[:2]:
        raise ValueError(f"adherence: driver is {grey.shape} pixels, generated image {generated.shape[:2]}")
    half = driver_config.background_level / 2
    masks = instance_masks(instances, grey.shape)
    union = np.zeros(grey.shape, bool)
    for mask, _ in masks:
        union |= mask
    outside = ~_dilate(union, config.margin) if masks else np.ones(grey.shape, bool)
    if not outside.any():
        return 0.0
    t_in = grey > half
    # with inpaint_defects the generated image's defects are inpainted too, as the driver's were
    t_gen = topology_map(generated, driver_config, masks or None).astype(np.float32) > half
    return max(0.0, matthews_correlation(t_in[outside], t_gen[outside]))


def defect_effects(image: np.ndarray, instances: Instances, config: AdherenceConfig = AdherenceConfig()
                   ) -> list[float]:
    """Signed robust effect size d_i of every instance in `image` (uint8 RGB or grey): how many
    noise levels its median grey level lies above (+) or below (-) its background ring's. nan
    where there is no background to compare with."""
    grey = grey_image(np.asarray(image)).astype(np.float32)
    masks = instance_masks(instances, grey.shape)
    if not masks:
        return []
    union = np.zeros(grey.shape, bool)
    for mask, _ in masks:
        union |= mask
    clear = ~_dilate(union, config.ring_gap)  # farther than ring_gap from every mask
    effects = []
    for mask, _ in masks:
        if not mask.any():
            effects.append(float("nan"))
            continue
        ring = _dilate(mask, config.ring_gap + config.ring_width) & clear
        if not ring.any():
            ring = clear
        if not ring.any():
            effects.append(float("nan"))
            continue
        background = grey[ring]
        centre = float(np.median(background))
        noise = max(MAD_TO_STD * float(np.median(np.abs(background - centre))), config.min_noise)
        effects.append((float(np.median(grey[mask])) - centre) / noise)
    return effects


def placement_score(effects: Sequence[float], category_ids: Sequence[int], polarity: dict[int, int] | None = None,
                    config: AdherenceConfig = AdherenceConfig()) -> float | None:
    """Part (b), P in [0, 1] from the instances' effect sizes (nan ones left out); None if none."""
    polarity = polarity or {}
    scores = []
    for effect, category_id in zip(effects, category_ids, strict=True):
        if math.isnan(effect):
            continue
        sign = polarity.get(int(category_id), 0)
        directed = sign * effect if sign else abs(effect)
        scores.append(min(1.0, max(0.0, directed / config.effect_ref)))
    return sum(scores) / len(scores) if scores else None


def adherence(generated: np.ndarray, driver: torch.Tensor | np.ndarray, instances: Instances = None,
              polarity: dict[int, int] | None = None, driver_config: DriverConfig = DriverConfig(),
              config: AdherenceConfig = AdherenceConfig()) -> Adherence:
    """The adherence of one generated image (uint8 RGB (H, W, 3)) to its input driver; see the module
    docstring. instances: the (mask, category id) pairs painted into the driver (or a label map)."""
    generated = np.asarray(generated)
    if generated.dtype != np.uint8 or generated.ndim != 3 or generated.shape[2] != 3:
        raise ValueError(f"adherence: expected a uint8 (H, W, 3) generated image, "
                         f"got {generated.dtype} {generated.shape}")
    pairs = instance_masks(instances, generated.shape[:2])
    topology = topology_agreement(generated, driver, pairs, driver_config, config)
    effects = defect_effects(generated, pairs, config)
    placement = placement_score(effects, [c for _, c in pairs], polarity, config)
    score = topology if placement is None else (topology + placement) / 2
    return Adherence(score, topology, placement, tuple(effects))


def estimate_polarity(samples: Iterable[tuple[np.ndarray, Instances]],
                      config: AdherenceConfig = AdherenceConfig()) -> dict[int, int]:
    """Each class's contrast direction, from real annotated images: {category id: -1 | 0 | +1},
    the sign of the median effect size of its instances, 0 when that median is smaller than
    `polarity_min_effect` (no consistent direction: the score then accepts either)."""
    by_class: dict[int, list[float]] = {}
    for image, instances in samples:
        pairs = instance_masks(instances, np.asarray(image).shape[:2])
        for (_, category_id), effect in zip(pairs, defect_effects(image, pairs, config)):
            if not math.isnan(effect):
                by_class.setdefault(category_id, []).append(effect)
    polarity = {}
    for category_id, effects in sorted(by_class.items()):
        middle = float(np.median(effects))
        polarity[category_id] = int(np.sign(middle)) if abs(middle) >= config.polarity_min_effect else 0
    return polarity
