"""data.coco and data.masks: pixel-exact round trips, validation errors, merge, split, stats."""
import json

import cv2
import numpy as np
import pytest

from data.coco import (CocoError, coco_stats, format_stats, image_label_map, load_coco, merge_coco, new_coco,
                       save_coco, split_coco, subset_coco, to_pycocotools, validate_coco)
from data.files import write_image_atomic
from data.masks import (connected_instances, mask_bbox, mask_to_polygons, mask_to_rle, polygons_to_mask, rle_area,
                        rle_bbox, rle_to_mask)


def random_masks(rng, count, height=24, width=32):
    masks = []
    for _ in range(count):
        mask = np.zeros((height, width), np.uint8)
        kind = rng.integers(3)
        if kind == 0:
            cv2.circle(mask, (int(rng.integers(4, width - 4)), int(rng.integers(4, height - 4))), int(rng.integers(1, 5)), 1, -1)
        elif kind == 1:
            cv2.line(mask, (int(rng.integers(width)), 0), (int(rng.integers(width)), height - 1), 1, 1)
        else:
            mask = (rng.random((height, width)) < 0.2).astype(np.uint8)
            mask[0, 0] = 1
        masks.append(mask)
    return masks


def make_dataset(folder, rng, num_images=6, categories=("crack", "blowhole"), height=24, width=32, per_image=2):
    coco = new_coco(list(categories))
    masks = {}
    for i in range(num_images):
        path = folder / f"img{i}.png"
        write_image_atomic(path, rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        coco["images"].append({"id": i + 1, "file_name": str(path), "height": height, "width": width})
        for mask in random_masks(rng, per_image, height, width):
            rle = mask_to_rle(mask)
            ann_id = len(coco["annotations"]) + 1
            coco["annotations"].append({"id": ann_id, "image_id": i + 1,
                                        "category_id": int(rng.integers(1, len(categories) + 1)),
                                        "segmentation": rle, "area": float(rle_area(rle)),
                                        "bbox": rle_bbox(rle), "iscrowd": 0})
            masks[ann_id] = mask
    return coco, masks


def test_rle_area_bbox_exact():
    mask = np.zeros((7, 9), np.uint8)
    mask[2:5, 3] = 1
    mask[4, 3:8] = 1
    rle = mask_to_rle(mask)
    assert isinstance(rle["counts"], str)
    assert np.array_equal(rle_to_mask(rle), mask)
    assert rle_area(rle) == int(mask.sum()) == 7
    assert rle_bbox(rle) == mask_bbox(mask) == [3.0, 2.0, 5.0, 3.0]


def test_polygons_trace_pixel_edges_exactly():
    rng = np.random.default_rng(0)
    for mask in random_masks(rng, 40):
        if mask.sum() == 0:
            continue
        # Polygons cannot hold holes: compare with the hole-filled mask.
        filled = np.zeros_like(mask)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(filled, contours, -1, 1, -1)
        polygons = mask_to_polygons(mask)
        assert all(len(p) >= 6 for p in polygons)
        assert np.array_equal(polygons_to_mask(polygons, *mask.shape), filled)


def test_round_trip_through_pycocotools_is_pixel_exact(tmp_path):
    rng = np.random.default_rng(1)
    coco, masks = make_dataset(tmp_path, rng)
    # One annotation as polygons (a one-pixel-wide diagonal line), the rest RLE.
    line = np.zeros((24, 32), np.uint8)
    cv2.line(line, (2, 2), (20, 18), 1, 1)
    coco["annotations"].append({"id": 99, "image_id": 1, "category_id": 1, "segmentation": mask_to_polygons(line),
                                "iscrowd": 0})
    masks[99] = line
    save_coco(coco, tmp_path / "coco.json")
    raw = json.loads((tmp_path / "coco.json").read_text())
    assert raw["images"][0]["file_name"] == "img0.png"  # inside the JSON's folder: relative
    save_coco(coco, tmp_path / "sub" / "coco.json")
    raw = json.loads((tmp_path / "sub" / "coco.json").read_text())
    assert raw["images"][0]["file_name"] == str((tmp_path / "img0.png").resolve())  # outside: absolute
    loaded = load_coco(tmp_path / "coco.json", progress=False)
    assert loaded["images"][0]["file_name"] == str((tmp_path / "img0.png").resolve())
    api = to_pycocotools(loaded)
    for ann in api.loadAnns(api.getAnnIds()):
        assert np.array_equal(api.annToMask(ann), masks[ann["id"]]), ann["id"]
        assert ann["area"] == masks[ann["id"]].sum()
    # validation filled the polygon annotation's area and box from its pixels
    poly = next(a for a in loaded["annotations"] if a["id"] == 99)
    assert poly["area"] == line.sum() and poly["bbox"] == mask_bbox(line)
    label = image_label_map(loaded["images"][0], [a for a in loaded["annotations"] if a["image_id"] == 1])
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2}


@pytest.fixture
def valid(tmp_path):
    coco, _ = make_dataset(tmp_path, np.random.default_rng(2), num_images=2, per_image=1)
    return coco


def break_it(coco, how, tmp_path):
    ann = coco["annotations"][0]
    if how == "missing":
        coco["images"][0]["file_name"] = str(tmp_path / "gone.png")
    elif how == "unreadable":
        (tmp_path / "bad.png").write_bytes(b"not an image")
        coco["images"][0]["file_name"] = str(tmp_path / "bad.png")
    elif how == "size":
        coco["images"][0]["width"] = 33
    elif how == "duplicate":
        coco["annotations"].append(dict(ann))
    elif how == "zero_id":
        coco["images"][0]["id"] = 0
    elif how == "short_polygon":
        ann["segmentation"] = [[1, 1, 5, 5]]
    elif how == "empty_segmentation":
        ann["segmentation"] = []
    elif how == "empty_rle":
        ann["segmentation"] = mask_to_rle(np.zeros((24, 32), np.uint8))
    elif how == "zero_box":
        ann["bbox"] = [3, 4, 0, 5]
    elif how == "category":
        ann["category_id"] = 7
    return ann


@pytest.mark.parametrize("how, pattern", [
    ("missing", r"image id=1 \(file .*gone.png\): image file missing or unreadable"),
    ("unreadable", r"image id=1 \(file .*bad.png\): image file missing or unreadable.*cannot decode"),
    ("size", r"image id=1 \(file .*img0.png\): the file is 32x24 .* record says 33x24"),
    ("duplicate", r"duplicate annotation id 1"),
    ("zero_id", r"image id 0; ids must be positive"),
    ("short_polygon", r"annotation id=1 \(image id=1, file .*img0.png\): polygon 0 has 2 points"),
    ("empty_segmentation", r"annotation id=1 .*empty segmentation"),
    ("empty_rle", r"annotation id=1 .*empty segmentation \(0 pixels"),
    ("zero_box", r"annotation id=1 .*zero-area bbox"),
    ("category", r"annotation id=1 .*unknown category_id 7"),
])
def test_validation_errors_name_file_and_record(valid, tmp_path, how, pattern):
    break_it(valid, how, tmp_path)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(valid))
    with pytest.raises(CocoError, match=pattern) as info:
        load_coco(path, progress=False)
    assert str(path) in str(info.value)


def test_rle_size_mismatch_and_bad_json(valid, tmp_path):
    valid["annotations"][0]["segmentation"] = mask_to_rle(np.ones((5, 5), np.uint8))
    with pytest.raises(CocoError, match=r"RLE size \[5, 5\] does not match .* \[24, 32\]"):
        validate_coco(valid, source="mem.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(CocoError, match="x.json: not valid JSON"):
        load_coco(tmp_path / "x.json")


def test_invalid_dataset_is_never_saved(valid, tmp_path):
    valid["annotations"][0]["category_id"] = 42
    with pytest.raises(CocoError):
        save_coco(valid, tmp_path / "out" / "coco.json")
    assert not (tmp_path / "out" / "coco.json").exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_merge_remaps_ids_and_categories(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    real, _ = make_dataset(tmp_path / "a", np.random.default_rng(3), num_images=3, categories=("crack", "blowhole"))
    synth, _ = make_dataset(tmp_path / "b", np.random.default_rng(4), num_images=4, categories=("blowhole", "scratch"))
    merged = merge_coco([real, synth], sources=["real", "synthetic"])
    validate_coco(merged, check_images=True)
    assert [c["name"] for c in merged["categories"]] == ["crack", "blowhole", "scratch"]
    assert [c["id"] for c in merged["categories"]] == [1, 2, 3]
    assert [img["id"] for img in merged["images"]] == list(range(1, 8))
    assert len({a["id"] for a in merged["annotations"]}) == len(merged["annotations"]) == 14
    names = {c["id"]: c["name"] for c in merged["categories"]}
    synth_names = {c["id"]: c["name"] for c in synth["categories"]}
    # every synthetic annotation keeps its image file and its class name
    files = {img["id"]: img["file_name"] for img in merged["images"]}
    for old, new in zip(synth["annotations"], merged["annotations"][6:]):
        old_file = next(i["file_name"] for i in synth["images"] if i["id"] == old["image_id"])
        assert files[new["image_id"]] == old_file
        assert names[new["category_id"]] == synth_names[old["category_id"]]
        assert new["segmentation"] == old["segmentation"]
    assert [img["source"] for img in merged["images"]] == ["real"] * 3 + ["synthetic"] * 4


def test_split_is_seeded_stratified_and_complete(tmp_path):
    coco, _ = make_dataset(tmp_path, np.random.default_rng(5), num_images=40, per_image=1)
    coco["images"].extend({"id": 100 + i, "file_name": f"free{i}.png", "height": 24, "width": 32}
                          for i in range(10))  # defect-free images form their own stratum (not read)
    parts = split_coco(coco, [0.7, 0.2, 0.1], seed=0, names=["train", "val", "test"])
    again = split_coco(coco, [0.7, 0.2, 0.1], seed=0, names=["train", "val", "test"])
    assert parts == again
    assert [len(parts[n]["images"]) for n in ("train", "val", "test")] == [35, 10, 5]
    all_ids = [img["id"] for p in parts.values() for img in p["images"]]
    assert sorted(all_ids) == sorted(img["id"] for img in coco["images"])  # disjoint and complete
    for part in parts.values():
        ids = {img["id"] for img in part["images"]}
        assert all(a["image_id"] in ids for a in part["annotations"])
        validate_coco(part, check_images=False)
    assert sum(len(p["annotations"]) for p in parts.values()) == len(coco["annotations"])
    # each stratum is cut proportionally (within one image)
    empty_in_test = sum(1 for img in parts["test"]["images"] if img["id"] >= 100)
    assert empty_in_test == 1
    assert split_coco(coco, [0.7, 0.2, 0.1], seed=1) != split_coco(coco, [0.7, 0.2, 0.1], seed=0)
    tenth = subset_coco(coco, 0.1, seed=0)
    assert len(tenth["images"]) == 5 and tenth["categories"] == coco["categories"]
    with pytest.raises(ValueError, match="sum to 1"):
        split_coco(coco, [0.5, 0.3])


def test_split_every_class_and_small_subset(tmp_path):
    """defectsynth run's protocol split: exact sizes, disjoint, every class in every split even when
    a rare class would miss one by proportion; the small subset is ceil(f x n) with every class."""
    from data.coco import split_every_class, subset_with_every_class

    coco, _ = make_dataset(tmp_path, np.random.default_rng(5), num_images=40, per_image=1)
    coco["categories"].append({"id": 3, "name": "rare"})
    for ann in coco["annotations"][:3]:  # 3 of 40 images: a proportional 10% split would miss it
        ann["category_id"] = 3
    for seed in range(4):
        parts = split_every_class(coco, [0.8, 0.1, 0.1], seed=seed, names=["train", "val", "test"])
        assert [len(parts[n]["images"]) for n in ("train", "val", "test")] == [32, 4, 4]
        ids = [img["id"] for p in parts.values() for img in p["images"]]
        assert sorted(ids) == sorted(img["id"] for img in coco["images"])
        for name, part in parts.items():
            assert {a["category_id"] for a in part["annotations"]} == {1, 2, 3}, (seed, name)
        small = subset_with_every_class(parts["train"], 0.1, seed=seed)
        assert len(small["images"]) == 4  # ceil(0.1 x 32)
        assert {a["category_id"] for a in small["annotations"]} == {a["category_id"] for a in parts["train"]["annotations"]}
        assert {img["id"] for img in small["images"]} <= {img["id"] for img in parts["train"]["images"]}
    assert split_every_class(coco, [0.8, 0.1, 0.1], seed=0) == split_every_class(coco, [0.8, 0.1, 0.1], seed=0)
    # one image of a new class: it cannot be in every split, and nothing breaks
    coco["annotations"][0]["category_id"] = 4
    coco["categories"].append({"id": 4, "name": "single"})
    parts = split_every_class(coco, [0.8, 0.1, 0.1], seed=0)
    assert sum(len(p["images"]) for p in parts.values()) == 40


def test_stats(tmp_path):
    coco, masks = make_dataset(tmp_path, np.random.default_rng(6), num_images=3)
    coco["images"].append({"id": 9, "file_name": coco["images"][0]["file_name"], "height": 24, "width": 32})
    stats = coco_stats(coco)
    assert stats["images"] == 4 and stats["images_without_annotations"] == 1 and stats["annotations"] == 6
    per_class = sum(c["instances"] for c in stats["categories"].values())
    assert per_class == 6
    assert stats["area"]["max"] == max(m.sum() for m in masks.values())
    assert "| crack |" in format_stats(stats)


def test_connected_instances_connectivity():
    diagonal = np.eye(6, dtype=np.uint8)
    assert len(connected_instances(diagonal, 8)) == 1
    assert len(connected_instances(diagonal, 4)) == 6
    blob = np.zeros((8, 8), np.uint8)
    blob[:3, :3] = 1
    blob[6, 6] = 1
    assert [int(m.sum()) for m in connected_instances(blob, 8, min_area=2)] == [9]
