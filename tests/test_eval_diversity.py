"""Diversity metrics: MI against a direct histogram computation, L2, grouping by condition."""
import json
import math
import warnings

import cv2
import numpy as np
import pytest

from data.coco import new_coco, save_coco
from eval.diversity import (DiversityConfig, diversity_scores, load_groups, main, mutual_information, preprocess,
                            rms_l2, select_groups)


def _mi_histogram2d(a, b, bins):
    joint, _, _ = np.histogram2d(a.ravel().astype(float), b.ravel().astype(float), bins=bins, range=[[0, 256], [0, 256]])
    p = joint / joint.sum()
    px, py = p.sum(1), p.sum(0)
    total = 0.0
    for u in range(bins):
        for v in range(bins):
            if p[u, v] > 0:
                total += p[u, v] * math.log(p[u, v] / (px[u] * py[v]))
    return total


@pytest.mark.parametrize("bins", [8, 32])
def test_mutual_information_matches_direct_histogram(bins):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    b = np.clip(a.astype(int) // 2 + rng.integers(0, 128, (64, 64)), 0, 255).astype(np.uint8)  # dependent on a
    assert mutual_information(a, b, bins) == pytest.approx(_mi_histogram2d(a, b, bins), rel=1e-10)
    # MI(a, a) is the entropy of a's histogram; bounded by log(bins)
    hist = np.bincount(a.ravel().astype(int) * bins // 256, minlength=bins) / a.size
    entropy = -np.sum(hist[hist > 0] * np.log(hist[hist > 0]))
    assert mutual_information(a, a, bins) == pytest.approx(entropy, rel=1e-12)
    assert entropy <= math.log(bins) + 1e-12


def test_rms_l2():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    want = np.linalg.norm(a.astype(float) - b.astype(float)) / 16.0
    assert rms_l2(a, b) == pytest.approx(want, rel=1e-12)
    assert rms_l2(a, a) == 0.0


def _write_grouped(tmp_path, conditions=3, per=4, identical=False):
    """A COCO sample set whose images carry condition_id (+ sample_index), and its folder twin."""
    rng = np.random.default_rng(2)
    coco = new_coco(["crack"])
    for c in range(conditions):
        base = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        for s in range(per):
            img = base if identical else rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            path = tmp_path / "flat" / f"c{c}_s{s}.png"
            path.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(path), img)
            (tmp_path / "folders" / f"cond{c}").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp_path / "folders" / f"cond{c}" / f"{s}.png"), img)
            coco["images"].append({"id": len(coco["images"]) + 1, "file_name": str(path), "height": 40, "width": 40,
                                   "condition_id": c, "sample_index": per - 1 - s})
    save_coco(coco, tmp_path / "samples.json")
    return tmp_path / "samples.json", tmp_path / "folders"


def test_grouping_selection_and_identical_samples(tmp_path):
    coco_path, folder = _write_grouped(tmp_path, identical=True)
    groups = load_groups(coco_path)
    assert sorted(groups) == ["0", "1", "2"] and len(groups["1"]) == 4
    assert groups["0"][0].name == "c0_s3.png"  # ordered by sample_index
    assert sorted(load_groups(folder)) == ["cond0", "cond1", "cond2"]
    chosen = select_groups(groups, 2, 3, seed=5)
    assert len(chosen) == 2 and all(len(p) == 3 for _, p in chosen)
    assert chosen == select_groups(groups, 2, 3, seed=5)
    with pytest.raises(ValueError, match="needs 4 conditions"):
        select_groups(groups, 4, 3)
    result = diversity_scores(chosen, size=32, bins=16, progress=False)
    assert result.mean_l2 == 0.0 and result.pairs == 2 * 3
    a = preprocess(chosen[0][1][0], 32)
    assert result.mean_mi == pytest.approx(np.mean([mutual_information(preprocess(p[0], 32), preprocess(p[0], 32), 16)
                                                    for _, p in chosen]))
    assert a.shape == (32, 32) and a.dtype == np.uint8


def test_missing_condition_key_is_an_error(tmp_path):
    coco = new_coco(["crack"])
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    coco["images"].append({"id": 1, "file_name": str(tmp_path / "a.png"), "height": 8, "width": 8})
    save_coco(coco, tmp_path / "s.json")
    with pytest.raises(ValueError, match="condition_id"):
        load_groups(tmp_path / "s.json")


def test_cli_main_with_distance(tmp_path):
    coco_path, folder = _write_grouped(tmp_path, conditions=3, per=3)
    out = tmp_path / "div.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = main(DiversityConfig(samples=str(coco_path), real=str(folder), conditions=2, per_condition=3,
                                      size=32, feature_extractor="pixels", out=str(out)))
    assert report["diversity"]["mean_l2"] > 20  # independent noise (softened by grayscale + area resize)
    assert report["distance"]["label"] == "FD-pixels" and report["distance"]["n_fake"] == 6
    assert json.loads(out.read_text())["diversity"]["conditions"] == 2
