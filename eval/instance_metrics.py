"""Per-instance mask metrics: IoU, Hausdorff distance and the matching that pairs them up.

Definitions (masks are binary (H, W) arrays of one image):
    IoU(A, B)        |A & B| / |A | B| over pixels (0 when both are empty)
    h(A, B)          directed Hausdorff distance: max over pixels a of A of the Euclidean
                     distance (in pixels, pixel centres) from a to the nearest pixel of B
    HD(A, B)         max(h(A, B), h(B, A)), the symmetric Hausdorff distance
    HD_norm(A, B)    HD(A, B) / sqrt(H^2 + W^2), in [0, 1] since both masks lie in the image

All foreground pixels are used (not only contours); h(A, B) is read off an exact Euclidean
distance transform of B's complement (OpenCV, DIST_MASK_PRECISE).

Matching rule (`match_instances`), per image:
1. predictions with score < `score_threshold` (default 0.5) are dropped;
2. every (ground truth, prediction) pair of the SAME class with IoU > `min_iou` (default 0) is a
   candidate;
3. greedy by IoU: the candidate with the highest IoU is matched (ties: higher score, then lower
   indices), its ground truth and prediction are removed, repeat until no candidate is left.
Then: mean IoU averages the matched pairs only (our reading of the IoU column of the paper's
Tables 1 and 2; this matching rule is ours);
mean normalised Hausdorff averages over ALL ground-truth instances, an unmatched one counting 1.0
(the worst possible value), so missing an instance is penalised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

MATCHING_RULE = ("per image, predictions with score >= {threshold} are matched greedily to ground truths of the "
                 "same class by decreasing mask IoU (pairs with IoU > 0 only; each used once); mean IoU averages "
                 "the matched pairs; the Hausdorff distance, normalised by the image diagonal, averages over all "
                 "ground-truth instances with 1.0 for an unmatched one")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary (H, W) masks."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask_iou: shapes differ {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def iou_matrix(gt_masks: np.ndarray, pred_masks: np.ndarray) -> np.ndarray:
    """IoU of every pair: (G, H, W), (P, H, W) binary -> (G, P) float64."""
    g = np.asarray(gt_masks, bool).reshape(len(gt_masks), -1).astype(np.float64)  # (G, HW)
    p = np.asarray(pred_masks, bool).reshape(len(pred_masks), -1).astype(np.float64)  # (P, HW)
    if g.shape[0] == 0 or p.shape[0] == 0:
        return np.zeros((g.shape[0], p.shape[0]))
    if g.shape[1] != p.shape[1]:
        raise ValueError(f"iou_matrix: mask sizes differ {gt_masks.shape[1:]} vs {pred_masks.shape[1:]}")
    intersection = g @ p.T  # (G, P)
    union = g.sum(1)[:, None] + p.sum(1)[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def directed_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """h(A, B) in pixels: how far the farthest pixel of A is from B. Both masks non-empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"directed_hausdorff: shapes differ {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        raise ValueError("directed_hausdorff: both masks need at least one pixel")
    # distanceTransform gives each pixel's distance to the nearest zero pixel: make B the zeros.
    distance_to_b = cv2.distanceTransform(np.where(b, 0, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return float(distance_to_b[a].max())


def hausdorff_distance(a: np.ndarray, b: np.ndarray) -> float:
    """HD(A, B) = max(h(A, B), h(B, A)) in pixels."""
    return max(directed_hausdorff(a, b), directed_hausdorff(b, a))


def normalized_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """HD(A, B) divided by the image diagonal; 1.0 when either mask is empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() or not b.any():
        return 1.0
    height, width = a.shape
    return hausdorff_distance(a, b) / math.hypot(height, width)


def match_instances(gt_masks: np.ndarray, gt_labels: Sequence[int], pred_masks: np.ndarray,
                    pred_labels: Sequence[int], pred_scores: Sequence[float], score_threshold: float = 0.5,
                    min_iou: float = 0.0) -> list[tuple[int, int, float]]:
    """Greedy same-class matching by IoU (module doc). Returns (gt index, pred index, IoU) triples."""
    gt_labels, pred_labels = np.asarray(gt_labels), np.asarray(pred_labels)
    pred_scores = np.asarray(pred_scores, dtype=np.float64)
    keep = np.flatnonzero(pred_scores >= score_threshold)
    if len(gt_masks) == 0 or keep.size == 0:
        return []
    ious = iou_matrix(gt_masks, np.asarray(pred_masks)[keep])  # (G, kept)
    same_class = gt_labels[:, None] == pred_labels[keep][None, :]
    candidates = [(ious[g, k], pred_scores[keep[k]], g, keep[k])
                  for g, k in zip(*np.nonzero(same_class & (ious > min_iou)))]
    # Highest IoU first; ties by higher score, then lower gt / prediction index.
    candidates.sort(key=lambda c: (-c[0], -c[1], c[2], c[3]))
    used_gt, used_pred, matches = set(), set(), []
    for iou, _, g, p in candidates:
        if g in used_gt or p in used_pred:
            continue
        used_gt.add(int(g))
        used_pred.add(int(p))
        matches.append((int(g), int(p), float(iou)))
    return matches


@dataclass
class InstanceAccumulator:
    """Collects matched IoUs and per-ground-truth normalised Hausdorff distances over images."""

    score_threshold: float = 0.5
    min_iou: float = 0.0
    ious: list[float] = field(default_factory=list)
    hausdorff: list[float] = field(default_factory=list)
    n_gt: int = 0
    n_pred: int = 0

    def add(self, gt_masks: np.ndarray, gt_labels: Sequence[int], pred_masks: np.ndarray,
            pred_labels: Sequence[int], pred_scores: Sequence[float]) -> None:
        """One image: gt_masks (G, H, W), pred_masks (P, H, W) binary, labels, scores (P,)."""
        matches = match_instances(gt_masks, gt_labels, pred_masks, pred_labels, pred_scores,
                                  self.score_threshold, self.min_iou)
        self.n_gt += len(gt_masks)
        self.n_pred += int(np.sum(np.asarray(pred_scores) >= self.score_threshold))
        matched = {g: p for g, p, _ in matches}
        self.ious.extend(iou for _, _, iou in matches)
        for g in range(len(gt_masks)):
            self.hausdorff.append(normalized_hausdorff(gt_masks[g], pred_masks[matched[g]])
                                  if g in matched else 1.0)

    def result(self) -> dict[str, float | int]:
        """mean_iou over matched pairs (NaN when nothing matched), mean_hausdorff over all ground
        truths (NaN without ground truth), counts, and the rule's parameters."""
        return {
            "mean_iou": float(np.mean(self.ious)) if self.ious else float("nan"),
            "mean_hausdorff": float(np.mean(self.hausdorff)) if self.hausdorff else float("nan"),
            "n_gt": self.n_gt, "n_pred_above_threshold": self.n_pred, "n_matched": len(self.ious),
            "score_threshold": self.score_threshold, "min_iou": self.min_iou,
        }
