"""Evaluation: FID/KID, the Mask R-CNN benchmark, COCOeval wrapper, IoU, Hausdorff, diversity,
the paper's tables, and speed benchmarks of inference against the reference implementations
(those of a training step are train.speed)."""
