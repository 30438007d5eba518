"""Evaluation: FID/KID, the Mask R-CNN benchmark, COCOeval wrapper, IoU, Hausdorff, diversity,
the paper's tables, and speed benchmarks against the reference implementations."""
