"""data.augment, data.perturb, data.pairing, data.prompts: seeded, aligned, valid."""
import json
import pickle

import cv2
import numpy as np
import pytest
import torch

from data.augment import AugmentConfig, AugmentRunConfig, augment_image, augment_variant, augment_variants, main as augment_main
from data.coco import load_coco, new_coco, save_coco
from data.files import write_image_atomic
from data.images import read_image
from data.masks import mask_to_rle
from data.pairing import PairingConfig, SadfPairs
from data.palette import PALETTE
from data.perturb import PerturbConfig, perturb_mask, place_mask, sample_instance
from data.prompts import PromptConfig, make_prompt
from data.resize import resize_and_crop
from data.seeding import derive_seed

GEOMETRY_ONLY = AugmentConfig(noise_std=(0.0, 0.0), contrast=(1.0, 1.0), brightness=(0.0, 0.0), border="constant",
                              rotation=30.0, translate=0.1, hflip_p=0.5, vflip_p=0.5)


def square_scene(size=64):
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    cv2.rectangle(mask, (20, 24), (40, 44), 1, -1)
    image[mask == 1] = 255
    return image, mask


def test_augmentation_is_seeded_and_keeps_masks_aligned():
    image, mask = square_scene()
    for seed in range(8):
        out, (warped,) = augment_image(image, seed, GEOMETRY_ONLY, [mask])
        assert out.shape == image.shape and warped.shape == mask.shape and warped.dtype == np.uint8
        assert set(np.unique(warped)) <= {0, 1}  # nearest neighbour: no new values
        inside = cv2.erode(warped, np.ones((3, 3), np.uint8)) == 1
        outside = cv2.dilate(warped, np.ones((3, 3), np.uint8)) == 0
        assert inside.any() and out[inside].min() > 200 and out[outside].max() < 55
    a = augment_variants(image, 5, AugmentConfig(variants=3), masks=mask)
    b = augment_variants(image, 5, AugmentConfig(variants=3), masks=mask)
    assert len(a) == 3
    for (ia, ma), (ib, mb) in zip(a, b):
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    assert not np.array_equal(a[0][0], a[1][0])
    alone = augment_variant(image, 5, 2, AugmentConfig(variants=3), masks=mask)
    assert np.array_equal(alone[0], a[2][0]) and np.array_equal(alone[1], a[2][1])  # one variant rebuilt alone


def test_derive_seed_is_stable():
    assert derive_seed(0, "pair", 3) == derive_seed(0, "pair", 3)
    assert derive_seed(0, "pair", 3) != derive_seed(0, "pair", 4) != derive_seed(1, "pair", 3)
    assert derive_seed(0, "pair", 3) == 161566848179602472  # sha256-based: fixed across processes and runs


def test_perturbation_is_seeded_and_valid():
    crack = np.zeros((30, 30), np.uint8)
    cv2.line(crack, (2, 3), (25, 20), 1, 2)
    a = perturb_mask(crack, np.random.default_rng(0))
    b = perturb_mask(crack, np.random.default_rng(0))
    assert np.array_equal(a, b) and a.any()
    assert not np.array_equal(a, perturb_mask(crack, np.random.default_rng(1)))
    assert a[0].any() and a[-1].any() and a[:, 0].any() and a[:, -1].any()  # tight crop
    frame = (48, 40)
    occupied = np.zeros(frame, bool)
    occupied[:, :10] = True
    for seed in range(10):
        full = sample_instance(crack, frame, np.random.default_rng(seed), PerturbConfig(min_area=20), occupied=occupied)
        assert full is not None and full.shape == frame and full.sum() >= 20
        assert not np.any(full[occupied])
    # an instance bigger than the frame, or out of it, is rejected
    assert place_mask(np.ones((50, 5), np.uint8), frame, np.random.default_rng(0)) is None
    assert place_mask(np.ones((10, 10), np.uint8), frame, np.random.default_rng(0), center=(2.0, 2.0)) is None
    assert sample_instance(np.ones((60, 60), np.uint8), frame, np.random.default_rng(0)) is None


def test_prompts():
    assert make_prompt([]) == "an image of a sks"
    assert make_prompt(["blowhole"]) == "an image of a sks with a blowhole crack"
    assert make_prompt(["blowhole", "crack", "blowhole"]) == "an image of a sks with a blowhole and crack defect"
    assert make_prompt(["a", "b", "c"]) == "an image of a sks with a a, b and c defect"
    assert make_prompt(["crack"]) == "an image of a sks with a crack"  # not "crack crack"
    assert make_prompt(["blowhole", "crack"]) == "an image of a sks with a blowhole and crack defect"
    custom = PromptConfig(token="zwx", template="photo of {token} showing {classes}")
    assert make_prompt(["fray"], custom) == "photo of zwx showing fray"


@pytest.fixture
def datasets(tmp_path):
    rng = np.random.default_rng(0)
    free, annotated = new_coco([]), new_coco(["crack", "blowhole"])
    for i in range(2):
        path = tmp_path / f"free{i}.png"
        write_image_atomic(path, rng.integers(60, 200, (80, 96, 3), dtype=np.uint8))
        free["images"].append({"id": i + 1, "file_name": str(path), "height": 80, "width": 96})
    for i in range(3):
        path = tmp_path / f"defect{i}.png"
        write_image_atomic(path, rng.integers(60, 200, (40, 40, 3), dtype=np.uint8))
        annotated["images"].append({"id": i + 1, "file_name": str(path), "height": 40, "width": 40})
        for j, cid in enumerate((1, 2) if i == 0 else (i,)):
            mask = np.zeros((40, 40), np.uint8)
            if cid == 1:
                cv2.line(mask, (5 + 10 * j, 5), (15 + 10 * j, 30), 1, 2)
            else:
                cv2.circle(mask, (25, 25), 4, 1, -1)
            annotated["annotations"].append({"id": len(annotated["annotations"]) + 1, "image_id": i + 1,
                                             "category_id": cid, "segmentation": mask_to_rle(mask)})
    return free, annotated


def test_pairs_are_seeded_valid_and_rebuildable(datasets):
    free, annotated = datasets
    config = PairingConfig(resolution=64, variants=3)
    pairs = SadfPairs(free, annotated, config, seed=7)
    assert len(pairs) == 6
    built = [pairs[p] for p in range(len(pairs))]
    again = SadfPairs(free, annotated, config, seed=7)
    for pair in built:
        alone = again.build(pair.pair_id)  # a fresh builder, one pair only
        assert np.array_equal(alone.image, pair.image) and torch.equal(alone.driver, pair.driver)
        assert alone.prompt == pair.prompt and len(alone.instances) == len(pair.instances)
        assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(alone.instances, pair.instances))
        assert pair.image.shape == (64, 64, 3) and pair.driver.shape == (3, 64, 64)
        assert pair.instances, "every pair keeps at least one instance here"
        occupied = np.zeros((64, 64), bool)
        for mask, cid in pair.instances:
            assert mask.shape == (64, 64) and mask.sum() >= config.perturb.min_area
            assert not np.any(occupied & (mask != 0))  # no overlaps by default
            occupied |= mask != 0
        # the driver paints exactly the label map's pixels with the palette colours
        labels = pair.label_map()
        for cid in np.unique(labels[labels > 0]):
            colour = torch.tensor(PALETTE[cid], dtype=torch.float32)[:, None] / 255
            assert torch.equal(pair.driver[:, torch.from_numpy(labels == cid)], colour.expand(3, int((labels == cid).sum())))
        names = [{1: "crack", 2: "blowhole"}[c] for c in sorted({c for _, c in pair.instances})]
        assert pair.prompt == make_prompt(names)
        anns = pair.annotations(image_id=5, first_annotation_id=10)
        assert [a["id"] for a in anns] == list(range(10, 10 + len(anns)))
        assert all(a["area"] == m.sum() for a, (m, _) in zip(anns, pair.instances))
    copied = pickle.loads(pickle.dumps(pairs))  # DataLoader workers get a pickled builder
    assert torch.equal(copied.build(4).driver, built[4].driver)
    assert [p.variant for p in built] == [0, 1, 2, 0, 1, 2]
    assert not np.array_equal(built[0].image, built[1].image)
    # Pair p is variant p % V of free image (p // V) % N (images in id order), as data/pairing.py
    # documents: rebuilt here from the free image file, the resize and the variant's seed.
    by_id = sorted(free["images"], key=lambda img: img["id"])
    assert len(by_id) == 2
    for p, pair in enumerate(built):
        source = by_id[(p // 3) % len(by_id)]
        assert pair.source_file == source["file_name"] and pair.variant == p % 3
        resized, _ = resize_and_crop(read_image(source["file_name"]), (64, 64))
        expected, _ = augment_variant(resized, derive_seed(7, source["id"]), p % 3, config.augment)
        assert np.array_equal(pair.image, expected), p
    other = SadfPairs(free, annotated, config, seed=8).build(0)
    assert not torch.equal(other.driver, built[0].driver)


def test_instances_mode_and_category_filter(datasets):
    free, annotated = datasets
    pairs = SadfPairs(free, annotated, PairingConfig(resolution=None, variants=0, draw="instances",
                                                     instances=(2, 2), category_ids=(1,)), seed=0)
    assert len(pairs) == 2
    for pair in pairs:
        assert pair.image.shape == (80, 96, 3) and pair.variant == -1
        assert {c for _, c in pair.instances} == {1} and 1 <= len(pair.instances) <= 2
        assert pair.prompt == "an image of a sks with a crack"
    with pytest.raises(ValueError, match="multiples of 64"):
        PairingConfig(resolution=100)


def test_offline_augmentation_cli_writes_then_resumes(datasets, tmp_path):
    free, _ = datasets
    save_coco(free, tmp_path / "free.json")
    cfg = AugmentRunConfig(data=str(tmp_path / "free.json"), out=str(tmp_path / "aug"), variants=2, seed=3)
    out = augment_main(cfg)
    assert len(out["images"]) == 4 and out["annotations"] == []
    coco = load_coco(tmp_path / "aug" / "annotations.json", progress=False)
    files = sorted(p.name for p in (tmp_path / "aug" / "images").iterdir())
    assert files == ["free0_id1_v0.png", "free0_id1_v1.png", "free1_id2_v0.png", "free1_id2_v1.png"]
    assert [img["variant"] for img in coco["images"]] == [0, 1, 0, 1]
    before = (tmp_path / "aug" / "images" / files[0]).read_bytes()
    augment_main(cfg)  # a rerun keeps the finished files
    assert (tmp_path / "aug" / "images" / files[0]).read_bytes() == before
    with pytest.raises(ValueError, match="other settings"):
        augment_main(AugmentRunConfig(data=cfg.data, out=cfg.out, variants=2, seed=4))
    assert json.loads((tmp_path / "aug" / "augment_config.json").read_text())["seed"] == 3
