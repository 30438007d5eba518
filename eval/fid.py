"""Frechet Inception Distance and Kernel Inception Distance.

    python -m eval.fid --real DIR|COCO --fake DIR|COCO [--inception-weights PATH] [--kid]

Notation (Heusel et al. 2017, eq. 6; Binkowski et al. 2018, eq. 4 and appendix):
    x_i, y_j      feature vectors (float64) of the real and the generated images, dimension d
    mu, Sigma     sample mean and unbiased covariance (divide by N - 1) of a feature set
    FD            |mu_1 - mu_2|^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))
    k(x, y)       (x . y / d + 1)^3, the cubic polynomial kernel of KID
    MMD^2_u       unbiased estimate on m + m samples:
                  sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1))
                  - 2 sum_{i,j} k(x_i, y_j) / m^2
    KID           mean (and std) of MMD^2_u over seeded random subsets of size m (no replacement
                  within a subset), m = min(subset size, N_real, N_fake)

Tr((Sigma_1 Sigma_2)^(1/2)) is computed without scipy: Sigma_1 Sigma_2 is similar to the symmetric
positive semi-definite M = Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2), so the trace is the sum of the
square roots of M's eigenvalues (eigenvalues within round-off of zero count as zero). When that fails
(non-convergence or a non-finite result), eps = 1e-6 is added to both diagonals and it is redone,
the same fallback as pytorch-fid's sqrtm form.

The score is FID only with the published Inception weights (`eval.inception`); any other
feature extractor gives a distance labelled "FD-<name>". N is always reported with the score:
FID is biased upwards for small N, so numbers at different N are not comparable.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
import numpy as np

from defectsynth.errors import command
from defectsynth.device import DEVICE_HELP, resolve_device
from defectsynth.runconfig import config_from_args, parser_from_dataclass


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) features -> mean (d,) and unbiased covariance (d, d), both float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics: need (N >= 2, d) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_roots(eigenvalues: np.ndarray) -> np.ndarray:
    """Square roots of a PSD matrix's eigenvalues; those within round-off of zero (below
    n * machine eps * the largest magnitude, as in numpy's matrix_rank) count as exactly zero,
    otherwise their noise (~1e-16) would add ~1e-8 each after the square root."""
    tol = eigenvalues.size * np.finfo(np.float64).eps * max(np.abs(eigenvalues).max(initial=0.0), 1e-300)
    return np.sqrt(np.where(eigenvalues > tol, eigenvalues, 0.0))


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric PSD matrix via its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * _psd_roots(eigenvalues)) @ eigenvectors.T  # V diag(sqrt(w)) V^T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Sigma_1 Sigma_2)^(1/2)) for symmetric PSD Sigma_1, Sigma_2 (see module doc)."""
    half1 = _symmetric_sqrt(sigma1)
    product = half1 @ sigma2 @ half1
    product = 0.5 * (product + product.T)  # symmetric up to round-off; make it exactly so
    return float(_psd_roots(np.linalg.eigvalsh(product)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes disagree: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"frechet_distance: {name} holds non-finite values")
    diff = mu1 - mu2
    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:
        tr_covmean = float("nan")
    if not np.isfinite(tr_covmean):
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for all rows: (m, d), (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic kernel between two equally sized sets (m, d)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sum_xx = k_xx.sum() - np.trace(k_xx)  # off-diagonal terms only: i != j
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float
    subset_size: int
    num_subsets: int


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> KIDResult:
    """KID mean and std (population std over subsets) of MMD^2_u on seeded random subsets."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"KID: need (N, d) feature sets of one d, got {real.shape} and {fake.shape}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(f"KID: need at least 2 samples in each set, got {real.shape[0]} and {fake.shape[0]}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        rows_real = rng.choice(real.shape[0], m, replace=False)
        rows_fake = rng.choice(fake.shape[0], m, replace=False)
        values.append(mmd2_unbiased(real[rows_real], fake[rows_fake]))
    return KIDResult(float(np.mean(values)), float(np.std(values)), m, num_subsets)


@dataclass(frozen=True)
class DistanceResult:
    """A Frechet distance (and optionally KID) with what it was computed on."""

    label: str  # "FID" or "FD-<extractor>"
    value: float
    n_real: int
    n_fake: int
    kid: KIDResult | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = f"{self.label} {self.value:.4f} (N real {self.n_real}, N fake {self.n_fake})"
        if self.kid is not None:
            prefix = "KID" if self.label == "FID" else f"KD-{self.label[3:]}"
            text += (f"; {prefix} {self.kid.mean:.6f} +- {self.kid.std:.6f} "
                     f"({self.kid.num_subsets} subsets of {self.kid.subset_size})")
        return text


def distance_from_features(real: np.ndarray, fake: np.ndarray, label: str = "FID", kid: bool = False,
                           kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> DistanceResult:
    """Frechet distance (and KID) of two float64 (N, d) feature sets."""
    if min(real.shape[0], fake.shape[0]) < real.shape[1]:
        warnings.warn(f"{label}: N ({real.shape[0]} real, {fake.shape[0]} fake) is below the feature "
                      f"dimension {real.shape[1]}: the covariances are rank-deficient and the score is "
                      f"strongly biased; compare only numbers computed at the same N")
    mu1, sigma1 = feature_statistics(real)
    mu2, sigma2 = feature_statistics(fake)
    kid_result = (kernel_inception_distance(real, fake, kid_subsets, kid_subset_size, seed) if kid else None)
    return DistanceResult(label, frechet_distance(mu1, sigma1, mu2, sigma2), real.shape[0], fake.shape[0], kid_result)


@dataclass(frozen=True)
class FidConfig:
    """FID (and KID) between two image sets (folders or COCO json files)."""

    real: str = field(metadata={"help": "real images: a folder (searched recursively) or a COCO json"})
    fake: str = field(metadata={"help": "generated images: a folder or a COCO json"})
    inception_weights: str | None = field(default=None, metadata={
        "help": "pt_inception-2015-12-05-6726825d.pth (file or folder); default: weights/checkpoints/ "
                "then the torch hub cache"})
    kid: bool = field(default=False, metadata={"help": "also compute KID"})
    kid_subsets: int = field(default=100, metadata={"help": "KID: number of random subsets"})
    kid_subset_size: int = field(default=1000, metadata={"help": "KID: subset size (capped by both set sizes)"})
    feature_extractor: str = field(default="inception", metadata={
        "help": "inception (FID) | inception-random | pixels | package.module:factory (labelled FD-<name>)"})
    batch_size: int = field(default=50, metadata={"help": "images per forward pass"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    seed: int = field(default=0, metadata={"help": "KID subsets and random extractors"})
    out: str | None = field(default=None, metadata={"help": "write the result as JSON here"})


def get_args_parser():
    return parser_from_dataclass(FidConfig, prog="python -m eval.fid")


def compute_distance(real: str, fake: str, extractor, kid: bool = False, batch_size: int = 50,
                     device: str = "cpu", kid_subsets: int = 100, kid_subset_size: int = 1000,
                     seed: int = 0, progress: bool = True) -> DistanceResult:
    """Frechet distance (+ KID) between two image sets with an `eval.features.Extractor`."""
    from eval.features import extract_features, image_set_paths

    real_features = extract_features(image_set_paths(real), extractor, batch_size, device, progress, "real")
    fake_features = extract_features(image_set_paths(fake), extractor, batch_size, device, progress, "fake")
    return distance_from_features(real_features, fake_features, extractor.label, kid,
                                  kid_subsets, kid_subset_size, seed)


def main(cfg: FidConfig) -> DistanceResult:
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))  # "auto" -> cuda if available, else cpu
    from eval.features import build_extractor

    extractor = build_extractor(cfg.feature_extractor, cfg.inception_weights, cfg.device, cfg.seed)
    result = compute_distance(cfg.real, cfg.fake, extractor, cfg.kid, cfg.batch_size, cfg.device,
                              cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    print(result.summary())
    if cfg.out:
        from data.files import write_json_atomic

        write_json_atomic(cfg.out, {"result": result.as_dict(), "real": cfg.real, "fake": cfg.fake}, indent=2)
    return result


@command("fid")
def cli(argv: list[str] | None = None) -> int:
    from eval.inception import InceptionWeightsNotFound

    cfg = config_from_args(FidConfig, get_args_parser().parse_args(argv))
    try:
        main(cfg)
    except InceptionWeightsNotFound as err:
        print(f"eval.fid: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
