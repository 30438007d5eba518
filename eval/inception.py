"""The FID Inception-v3: the network every published FID number is computed with.

FID compares pool3 features (the 2048-d global average pool before the classifier) of the
TensorFlow "inception-2015-12-05" graph. Its PyTorch port, `pt_inception-2015-12-05-6726825d.pth`
(pytorch-fid's release file), uses torchvision's Inception-v3 module names with 1008 classes, no
auxiliary head, and three departures from the torchvision network that change the features:

- every InceptionA / InceptionC / first InceptionE block averages its pool branch with
  `count_include_pad=False` (TensorFlow ignores the zero padding in the average);
- the last InceptionE block (Mixed_7c) pools its pool branch with a 3x3 *max* pool;
- BatchNorm eps is 0.001, as TensorFlow's.

Input: float (B, 3, H, W) RGB in [0, 1]. It is resized bilinearly to 299x299
(`align_corners=False`) and then mapped to [-1, 1], in that order, as pytorch-fid does.
Output of `forward`: (B, 2048) pool3 features.

The weights are never downloaded: `find_inception_weights` looks at a path the user gives, then
`weights/checkpoints/`, then the torch hub cache, and stops with a message naming the exact file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL_FOR_HUMANS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE_NAME)
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's 1008-way classifier (1000 classes + 8 unused)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001, TensorFlow's) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(TF)-1x1, concatenated on channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], dim=1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: stride-2 3x3 | 1x1-3x3-3x3(s2) | maxpool(s2)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)  # (B, 480 + C_in, H', W')


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions and the TF average pool."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3(s2) | 1x1-1x7-7x1-3x3(s2) | maxpool(s2)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)  # (B, 512 + C_in, 8, 8)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches. `pool` is "avg" (Mixed_7b, TF average) or
    "max" (Mixed_7c: the TF graph max-pools here, unlike the Inception paper)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"FIDInceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        if self.pool == "avg":
            pooled = _avg_pool_tf(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], dim=1)  # (B, 2048, 8, 8)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to pool3 (plus the unused 1008-way `fc`, kept so the published
    file loads strictly). forward: (B, 3, H, W) in [0, 1] -> (B, 2048) float32 features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0  # [0, 1] -> [-1, 1], the range the TF graph was trained on
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)  # ends at (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool3: (B, 2048, 1, 1) -> (B, 2048)


def inception_weight_candidates(path: str | os.PathLike | None = None) -> list[Path]:
    """Where the weights are looked for, in order: `path` (a file, or a folder holding the file),
    `weights/checkpoints/<file>` in the repository, then the torch hub cache
    (`torch.hub.get_dir()/checkpoints/<file>`, usually ~/.cache/torch/hub/checkpoints/)."""
    candidates: list[Path] = []
    if path is not None:
        given = Path(path).expanduser()
        candidates.append(given / INCEPTION_FILE_NAME if given.is_dir() else given)
        return candidates
    repo_root = Path(__file__).resolve().parent.parent
    candidates.append(repo_root / "weights" / "checkpoints" / INCEPTION_FILE_NAME)
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE_NAME)
    return candidates


class InceptionWeightsNotFound(FileNotFoundError):
    """The FID Inception weights are not on disk (they are never downloaded)."""


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file, or `InceptionWeightsNotFound` with a message saying where to put it."""
    candidates = inception_weight_candidates(path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = "\n  ".join(str(c) for c in candidates)
    hub_target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE_NAME
    raise InceptionWeightsNotFound(
        f"FID Inception weights not found. Looked at:\n  {tried}\n"
        f"Download {INCEPTION_FILE_NAME} (pytorch-fid's release file, {INCEPTION_URL_FOR_HUMANS}) "
        f"yourself and put it at {hub_target} or at weights/checkpoints/{INCEPTION_FILE_NAME}, "
        f"or pass --inception-weights PATH. defectsynth never downloads it.")


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the file with `torch.load(weights_only=True)` and check it is a flat tensor dict."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor) of the FID Inception-v3")
    return dict(state)


def build_fid_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        random_init_seed: int | None = None) -> FIDInceptionV3:
    """The FID Inception-v3 in eval mode with frozen weights.

    weights: file path (or folder) of `pt_inception-2015-12-05-6726825d.pth`; None searches the
    default places (`inception_weight_candidates`). random_init_seed: build a randomly initialised
    network instead (tests and experiments only; its distances are NOT FID).
    Loading is strict. The only tolerated difference: BatchNorm `num_batches_tracked` counters,
    which files written by old PyTorch versions lack and which eval-mode BatchNorm never reads.
    """
    model = FIDInceptionV3()
    if random_init_seed is not None:
        generator = torch.Generator().manual_seed(random_init_seed)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if name.endswith("running_var"):
                    tensor.uniform_(0.5, 1.5, generator=generator)
                elif name.endswith("running_mean") or name.endswith("bias"):
                    tensor.normal_(0.0, 0.01, generator=generator)
                elif tensor.is_floating_point() and tensor.dim() > 1:
                    fan_in = tensor[0].numel()
                    tensor.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                elif tensor.is_floating_point():
                    tensor.fill_(1.0)  # BatchNorm scale
    else:
        path = find_inception_weights(weights)
        state = load_inception_state_dict(path)
        expected = model.state_dict()
        for key, value in expected.items():
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = torch.zeros_like(value)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path}: not the FID Inception-v3 layout ({INCEPTION_FILE_NAME}): {err}") from err
    model.eval().requires_grad_(False)
    return model.to(device)
