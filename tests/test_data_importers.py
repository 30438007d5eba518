"""data.importers on generated fixtures: mask folders, class-index masks, LabelMe, image folders."""
import json

import cv2
import numpy as np
import pytest

from data.coco import load_coco
from data.files import write_image_atomic
from data.importers import (DatasetImportError, ImportConfig, import_class_folders, import_class_index,
                            import_image_folder, import_labelme, main)
from data.masks import rle_to_mask, segmentation_to_mask


def write_gray(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def make_mask_folders(root):
    """MT-like layout: MT_<Class>/Imgs/<name>.jpg + same-name .png masks (anti-aliased)."""
    rng = np.random.default_rng(0)
    crack = np.zeros((20, 24), np.uint8)
    for i in range(10):  # a one-pixel diagonal crack: 8-connected, but 10 pieces under 4-connectivity
        crack[2 + i, 3 + i] = 255
    crack[15:18, 18:21] = 255   # a separate 3x3 blob
    crack[14, 18:21] = 100       # anti-aliased rim below the threshold
    crack[0, 23] = 200           # a one-pixel speck above it
    write_gray(root / "MT_Crack" / "Imgs" / "c1.jpg", rng.integers(0, 255, (20, 24), dtype=np.uint8))
    write_gray(root / "MT_Crack" / "Imgs" / "c1.png", crack)
    hole = np.zeros((20, 24), np.uint8)
    cv2.circle(hole, (10, 10), 4, 255, -1)
    write_gray(root / "MT_Blowhole" / "Imgs" / "b1.jpg", rng.integers(0, 255, (20, 24), dtype=np.uint8))
    write_gray(root / "MT_Blowhole" / "Imgs" / "b1.png", hole)
    write_gray(root / "MT_Free" / "Imgs" / "f1.jpg", rng.integers(0, 255, (20, 24), dtype=np.uint8))
    write_gray(root / "MT_Free" / "Imgs" / "f1.png", np.zeros((20, 24), np.uint8))
    write_gray(root / "notes" / "x.jpg", np.zeros((4, 4), np.uint8))  # no MT_ prefix: ignored
    return crack, hole


def test_class_folders_connectivity_threshold_min_area(tmp_path):
    crack, hole = make_mask_folders(tmp_path)
    coco = import_class_folders(tmp_path, class_regex="MT_(.+)", exclude_classes=["free"], progress=False)
    assert [c["name"] for c in coco["categories"]] == ["blowhole", "crack"]
    assert len(coco["images"]) == 2
    crack_image = next(i for i in coco["images"] if i["file_name"].endswith("c1.jpg"))
    anns = [a for a in coco["annotations"] if a["image_id"] == crack_image["id"]]
    assert sorted(a["area"] for a in anns) == [1, 9, 10]  # speck, blob, diagonal crack (8-connected)
    union = np.zeros((20, 24), np.uint8)
    for a in anns:
        union |= rle_to_mask(a["segmentation"])
    assert np.array_equal(union, (crack > 127).astype(np.uint8))
    four = import_class_folders(tmp_path, class_regex="MT_(.+)", exclude_classes=["free"], connectivity=4,
                                min_area=1, progress=False)
    assert sum(a["image_id"] == crack_image["id"] for a in four["annotations"]) == 12
    big = import_class_folders(tmp_path, class_regex="MT_(.+)", exclude_classes=["free"], min_area=5, progress=False)
    assert sorted(a["area"] for a in big["annotations"] if a["image_id"] == crack_image["id"]) == [9, 10]
    blow = next(a for a in coco["annotations"] if a["category_id"] == 1)
    assert np.array_equal(rle_to_mask(blow["segmentation"]), (hole > 127).astype(np.uint8))


def test_free_classes_and_image_folder_have_no_annotations(tmp_path):
    make_mask_folders(tmp_path)
    coco = import_class_folders(tmp_path, class_regex="MT_(.+)", free_classes=["free"], progress=False)
    assert [c["name"] for c in coco["categories"]] == ["blowhole", "crack"] and len(coco["images"]) == 3
    free_image = next(i for i in coco["images"] if i["file_name"].endswith("f1.jpg"))
    assert not any(a["image_id"] == free_image["id"] for a in coco["annotations"])
    free = import_image_folder(tmp_path / "MT_Free" / "Imgs", image_exts=[".jpg"], progress=False)
    assert len(free["images"]) == 1 and free["annotations"] == [] and free["images"][0]["height"] == 20


def test_polygon_output_and_cli_round_trip(tmp_path):
    crack, _ = make_mask_folders(tmp_path / "in")
    out = tmp_path / "out" / "coco.json"
    main(ImportConfig(format="class-folders", root=str(tmp_path / "in"), out=str(out), class_regex="MT_(.+)",
                      exclude_classes=("free",), segmentation="polygon", stats_json=str(tmp_path / "stats.json")))
    coco = load_coco(out, progress=False)
    assert all(isinstance(a["segmentation"], list) for a in coco["annotations"])
    crack_image = next(i for i in coco["images"] if i["file_name"].endswith("c1.jpg"))
    union = np.zeros((20, 24), np.uint8)
    for a in coco["annotations"]:
        if a["image_id"] == crack_image["id"]:
            union |= segmentation_to_mask(a["segmentation"], 20, 24)
    assert np.array_equal(union, (crack > 127).astype(np.uint8))  # polygons along pixel edges are exact
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["categories"]["crack"]["instances"] == 3


def test_bad_input_leaves_no_output(tmp_path):
    make_mask_folders(tmp_path / "in")
    (tmp_path / "in" / "MT_Crack" / "Imgs" / "c1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out" / "coco.json"
    with pytest.raises(DatasetImportError, match=r"mask of .*c1.jpg: .*c1.png: cannot decode"):
        main(ImportConfig(root=str(tmp_path / "in"), out=str(out), class_regex="MT_(.+)", exclude_classes=("free",)))
    assert not out.exists()
    assert not list(tmp_path.rglob("*.tmp"))
    # a missing mask names the image and the expected mask path
    (tmp_path / "in" / "MT_Crack" / "Imgs" / "c1.png").unlink()
    with pytest.raises(DatasetImportError, match=r"c1.jpg: no mask file at .*c1.png"):
        import_class_folders(tmp_path / "in", class_regex="MT_(.+)", exclude_classes=["free"], progress=False)
    # a mask of the wrong size names both files
    write_gray(tmp_path / "in" / "MT_Crack" / "Imgs" / "c1.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetImportError, match=r"c1.png: mask is 5x5 .* its image .*c1.jpg is 24x20"):
        import_class_folders(tmp_path / "in", class_regex="MT_(.+)", exclude_classes=["free"], progress=False)
    assert not out.exists()


def test_class_index_masks(tmp_path):
    mask = np.zeros((16, 16), np.uint8)
    mask[1:4, 1:4] = 1
    mask[10:12, 10:15] = 2
    mask[8, 1:16] = 2
    mask[14:16, 0:2] = 255  # ignored
    write_image_atomic(tmp_path / "images" / "a.png", np.full((16, 16, 3), 90, np.uint8))
    write_gray(tmp_path / "masks" / "a.png", mask)
    coco = import_class_index(tmp_path / "images", ["crack", "blowhole"], progress=False)
    got = sorted((a["category_id"], a["area"]) for a in coco["annotations"])
    assert got == [(1, 9.0), (2, 10.0), (2, 15.0)]
    mask[0, 0] = 3
    write_gray(tmp_path / "masks" / "a.png", mask)
    with pytest.raises(DatasetImportError, match=r"a.png: mask values \[3\] have no class"):
        import_class_index(tmp_path / "images", ["crack", "blowhole"], progress=False)


def test_labelme(tmp_path):
    write_image_atomic(tmp_path / "one.png", np.zeros((20, 30, 3), np.uint8))
    doc = {"imagePath": "one.png", "imageHeight": 20, "imageWidth": 30, "shapes": [
        {"label": "crack", "points": [[2, 2], [10, 2], [10, 8]], "shape_type": "polygon", "group_id": 1},
        {"label": "crack", "points": [[12, 2], [16, 2], [16, 6]], "shape_type": "polygon", "group_id": 1},
        {"label": "blowhole", "points": [[20, 10], [25, 15]], "shape_type": "rectangle"},
        {"label": "crack", "points": [[0, 19], [29, 19]], "shape_type": "line"},
        {"label": "blowhole", "points": [[5, 15]], "shape_type": "point"},
    ]}
    (tmp_path / "one.json").write_text(json.dumps(doc))
    coco = import_labelme(tmp_path, progress=False)
    assert [c["name"] for c in coco["categories"]] == ["blowhole", "crack"]
    assert len(coco["annotations"]) == 2  # grouped crack polygons merge; line and point carry no area
    rect = next(a for a in coco["annotations"] if a["category_id"] == 1)
    assert rect["bbox"] == [20.0, 10.0, 5.0, 5.0] and rect["area"] == 25
    with_lines = import_labelme(tmp_path, line_width=1, progress=False)
    assert len(with_lines["annotations"]) == 3
    doc["shapes"][0]["points"] = [[1, 1], [5, 5]]
    (tmp_path / "one.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetImportError, match=r"one.json: shape 0 \('crack'\): polygon with 2 points"):
        import_labelme(tmp_path, progress=False)
