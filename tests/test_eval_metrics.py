"""COCOeval wrapper (perfect / empty / hand-computed), IoU, Hausdorff against scipy, matching."""
import math

import numpy as np
import pytest
from scipy.spatial.distance import directed_hausdorff as scipy_directed_hausdorff

from eval.coco_eval import evaluate_coco
from data.masks import mask_to_rle
from eval.instance_metrics import (InstanceAccumulator, directed_hausdorff, hausdorff_distance,
                                   iou_matrix, mask_iou, match_instances, normalized_hausdorff)


def _square(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _gt_dataset():
    """Two 40x40 images, categories 'crack' (3) and 'hole' (7), three instances."""
    masks = {1: _square(40, 40, 2, 2, 12, 12), 2: _square(40, 40, 20, 20, 30, 35), 3: _square(40, 40, 5, 5, 25, 15)}
    anns = [{"id": 1, "image_id": 10, "category_id": 3, "segmentation": mask_to_rle(masks[1])},
            {"id": 2, "image_id": 10, "category_id": 7, "segmentation": mask_to_rle(masks[2])},
            {"id": 3, "image_id": 11, "category_id": 3, "segmentation": mask_to_rle(masks[3])}]
    data = {"images": [{"id": 10, "file_name": "a.png", "height": 40, "width": 40},
                       {"id": 11, "file_name": "b.png", "height": 40, "width": 40}],
            "annotations": anns,
            "categories": [{"id": 3, "name": "crack"}, {"id": 7, "name": "hole"}]}
    return data, masks


def _perfect_detections(data, masks):
    from pycocotools import mask as mask_utils
    dets = []
    for ann in data["annotations"]:
        rle = mask_to_rle(masks[ann["id"]])
        bbox = [float(v) for v in mask_utils.toBbox({**rle, "counts": rle["counts"].encode()})]
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 0.9,
                     "segmentation": rle, "bbox": bbox})
    return dets


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_perfect_predictions_give_map_one_and_none_give_zero(iou_type):
    data, masks = _gt_dataset()
    perfect = evaluate_coco(data, _perfect_detections(data, masks), iou_type)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    assert perfect["per_class"] == {"crack": pytest.approx(1.0), "hole": pytest.approx(1.0)}
    empty = evaluate_coco(data, [], iou_type)
    assert empty["map"] == 0.0 and empty["per_class"] == {"crack": 0.0, "hole": 0.0}


def test_hand_computed_segm_and_bbox_cases():
    # One 10x10 ground truth. Prediction 1: 73 of its pixels (IoU 0.73), score 0.9 -> a true
    # positive at IoU thresholds 0.50..0.70 (5 of 10), a false positive above. Prediction 2: a
    # disjoint square, score 0.8 -> always a false positive, ranked after the true one.
    # At a threshold where prediction 1 matches: precision 1 up to recall 1 -> AP 1 (101/101
    # recall points). Where it does not: AP 0. So mAP = 5/10 = 0.5, AP50 = 1.
    gt = _square(30, 30, 0, 0, 10, 10)
    pred = np.zeros((30, 30), np.uint8)
    pred[0:7, 0:10] = 1
    pred[7, 0:3] = 1  # 70 + 3 = 73 pixels, all inside the ground truth
    data = {"images": [{"id": 1, "file_name": "x.png", "height": 30, "width": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(gt)}],
            "categories": [{"id": 1, "name": "crack"}]}
    dets = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": mask_to_rle(pred)},
            {"image_id": 1, "category_id": 1, "score": 0.8, "segmentation": mask_to_rle(_square(30, 30, 20, 20, 25, 25))}]
    segm = evaluate_coco(data, dets, "segm")
    assert segm["map"] == pytest.approx(0.5) and segm["map50"] == pytest.approx(1.0)
    assert segm["map75"] == pytest.approx(0.0)

    # bbox: two ground truths, one found (IoU 1, score 0.9), one false positive (score 0.95)
    # ranked first. Precision at recall 0.5 is 1/2; recall never exceeds 0.5. Interpolated
    # precision is 0.5 at the 51 recall points 0.00..0.50 and 0 above: AP = 0.5 * 51 / 101.
    data2 = {"images": [{"id": 1, "file_name": "x.png", "height": 30, "width": 30}],
             "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(gt)},
                             {"id": 2, "image_id": 1, "category_id": 1,
                              "segmentation": mask_to_rle(_square(30, 30, 15, 15, 25, 25))}],
             "categories": [{"id": 1, "name": "crack"}]}
    dets2 = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [0.0, 0.0, 10.0, 10.0]},
             {"image_id": 1, "category_id": 1, "score": 0.95, "bbox": [0.0, 20.0, 5.0, 5.0]}]
    bbox = evaluate_coco(data2, dets2, "bbox")
    assert bbox["map"] == pytest.approx(0.5 * 51 / 101) and bbox["map50"] == pytest.approx(0.5 * 51 / 101)


def _random_masks(rng, n, h=37, w=53):
    masks = []
    for _ in range(n):
        m = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 5), rng.integers(0, w - 5)
            m[y:y + rng.integers(1, 12), x:x + rng.integers(1, 15)] = 1
        masks.append(m)
    return masks


def test_hausdorff_matches_scipy_both_ways():
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 12)
    for a, b in zip(masks[::2], masks[1::2]):
        pa, pb = np.argwhere(a).astype(float), np.argwhere(b).astype(float)
        ab, ba = scipy_directed_hausdorff(pa, pb)[0], scipy_directed_hausdorff(pb, pa)[0]
        assert directed_hausdorff(a, b) == pytest.approx(ab, rel=1e-6)
        assert directed_hausdorff(b, a) == pytest.approx(ba, rel=1e-6)
        assert hausdorff_distance(a, b) == pytest.approx(max(ab, ba), rel=1e-6)
        assert normalized_hausdorff(a, b) == pytest.approx(max(ab, ba) / math.hypot(37, 53), rel=1e-6)
    assert normalized_hausdorff(masks[0], np.zeros_like(masks[0])) == 1.0


def test_iou_matches_numpy():
    rng = np.random.default_rng(1)
    gts, preds = np.stack(_random_masks(rng, 4)), np.stack(_random_masks(rng, 3))
    matrix = iou_matrix(gts, preds)
    for g in range(4):
        for p in range(3):
            inter = np.sum((gts[g] > 0) & (preds[p] > 0))
            union = np.sum((gts[g] > 0) | (preds[p] > 0))
            assert matrix[g, p] == pytest.approx(inter / union)
            assert mask_iou(gts[g], preds[p]) == pytest.approx(inter / union)
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0


def test_greedy_matching_and_accumulator():
    g0, g1 = _square(20, 20, 0, 0, 10, 10), _square(20, 20, 10, 10, 20, 20)
    p_good = _square(20, 20, 0, 0, 10, 9)       # IoU 0.9 with g0
    p_wide = _square(20, 20, 0, 0, 10, 12)      # IoU 100/120 with g0
    p_other_class = g1.copy()                   # exact g1 shape, wrong class
    p_low_score = g1.copy()                     # exact g1 shape, below the score threshold
    preds = np.stack([p_wide, p_good, p_other_class, p_low_score])
    matches = match_instances(np.stack([g0, g1]), [1, 1], preds, [1, 1, 2, 1], [0.99, 0.6, 0.9, 0.3])
    assert matches == [(0, 1, pytest.approx(0.9))]
    acc = InstanceAccumulator()
    acc.add(np.stack([g0, g1]), [1, 1], preds, [1, 1, 2, 1], [0.99, 0.6, 0.9, 0.3])
    out = acc.result()
    assert out["mean_iou"] == pytest.approx(0.9) and out["n_matched"] == 1 and out["n_gt"] == 2
    hd = normalized_hausdorff(g0, p_good)
    assert out["mean_hausdorff"] == pytest.approx((hd + 1.0) / 2)  # the missed g1 counts 1.0
    assert out["n_pred_above_threshold"] == 3
