"""data.datasets (concept + condition phases) and data.demo."""
import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.coco import load_coco
from data.datasets import ConceptDataset, ConditionDataset, collate
from data.demo import DemoConfig, generate_defective, make_demo_dataset
from data.masks import connected_instances, rle_to_mask
from data.palette import PALETTE
from data.resize import check_resolution, resize_and_crop
from data.seeding import rng_for


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(DemoConfig(out=str(out), seed=0, size=96, num_defective=6, num_free=4), progress=False)
    return out


def test_demo_is_deterministic_and_valid(tmp_path):
    # Its build time is a benchmark (python -m eval.speed demo-data), not an assertion: a loaded
    # machine would fail a wall-clock bound.
    a, free = make_demo_dataset(DemoConfig(out=str(tmp_path / "a"), seed=3), progress=False)
    b, _ = make_demo_dataset(DemoConfig(out=str(tmp_path / "b"), seed=3), progress=False)
    assert [x["segmentation"] for x in a["annotations"]] == [x["segmentation"] for x in b["annotations"]]
    assert (tmp_path / "a" / "images" / "defect_0005.png").read_bytes() == (tmp_path / "b" / "images" / "defect_0005.png").read_bytes()
    assert (tmp_path / "a" / "free" / "free_0003.png").read_bytes() == (tmp_path / "b" / "free" / "free_0003.png").read_bytes()
    c, _ = make_demo_dataset(DemoConfig(out=str(tmp_path / "c"), seed=4, num_defective=4, num_free=1), progress=False)
    assert [x["segmentation"] for x in c["annotations"]] != [x["segmentation"] for x in a["annotations"][:len(c["annotations"])]]
    coco = load_coco(tmp_path / "a" / "annotations.json", progress=False)
    assert len(coco["images"]) == 24 and len(free["images"]) == 24
    assert {cat["name"] for cat in coco["categories"]} == {"crack", "blowhole", "scratch"}
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3}
    for ann in coco["annotations"]:  # each defect is one 8-connected instance
        assert len(connected_instances(rle_to_mask(ann["segmentation"]), 8)) == 1
    image, instances = generate_defective(rng_for(3, "defect", 5), 128)
    assert np.array_equal(image, coco_image(coco, 6))
    assert all(m.shape == (128, 128) for m, _ in instances)


def coco_image(coco, image_id):
    from data.images import read_image
    return read_image(next(i for i in coco["images"] if i["id"] == image_id)["file_name"])


def test_resolution_must_be_multiple_of_64():
    assert check_resolution(512) == (512, 512) and check_resolution((64, 128)) == (64, 128)
    with pytest.raises(ValueError, match="multiples of 64"):
        check_resolution(100)
    with pytest.raises(ValueError, match="multiples of 64"):
        ConceptDataset(["x.png"], resolution=96)


def test_resize_and_crop_keeps_masks_aligned():
    image = np.zeros((90, 150, 3), np.uint8)
    mask = np.zeros((90, 150), np.uint8)
    mask[30:60, 100:130] = 2
    image[mask == 2] = 255
    out, out_mask = resize_and_crop(image, (64, 64), mask, offset=(0.5, 1.0))
    assert out.shape == (64, 64, 3) and out_mask.shape == (64, 64) and set(np.unique(out_mask)) == {0, 2}
    # interior pixels agree exactly; only a few pixels of the anti-aliased rim may disagree
    inside = cv2.erode((out_mask == 2).astype(np.uint8), np.ones((3, 3), np.uint8)) == 1
    outside = cv2.dilate((out_mask == 2).astype(np.uint8), np.ones((3, 3), np.uint8)) == 0
    assert out[inside].min() == 255 and out[outside].max() == 0
    assert np.count_nonzero((out[:, :, 0] >= 128) != (out_mask == 2)) <= 8


def test_concept_dataset(demo):
    data = load_coco(demo / "free.json", progress=False)
    ds = ConceptDataset(data, resolution=64, hflip=True, crop="random")
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["prompt"] == "an image of a sks"
    torch.manual_seed(1)
    first = ds[2]["image"]
    torch.manual_seed(1)
    assert torch.equal(first, ds[2]["image"])


def test_condition_dataset_flips_image_driver_masks_together(demo):
    data = load_coco(demo / "annotations.json", progress=False)
    plain = ConditionDataset(data, resolution=64, return_masks=True)
    flipping = ConditionDataset(data, resolution=64, return_masks=True, hflip=True)
    flipped_seen = False
    for index in range(len(data["images"])):
        base = plain[index]
        assert base["driver"].shape == (3, 64, 64) and 0 <= base["driver"].min() and base["driver"].max() <= 1
        assert base["image"].min() >= -1 and base["image"].max() <= 1
        labels = base["masks"].numpy()
        for cid in np.unique(labels[labels > 0]):  # paint sits exactly on the masks
            colour = torch.tensor(PALETTE[cid], dtype=torch.float32)[:, None] / 255
            region = torch.from_numpy(labels == cid)
            assert torch.equal(base["driver"][:, region], colour.expand(3, int(region.sum())))
        assert base["instance_masks"].shape[0] == base["category_ids"].shape[0]
        assert base["prompt"].startswith("an image of a sks with a")
        for _ in range(4):
            item = flipping[index]
            if torch.equal(item["image"], base["image"].flip(-1)):
                flipped_seen = True
                assert torch.equal(item["driver"], base["driver"].flip(-1))
                assert torch.equal(item["masks"], base["masks"].flip(-1))
            else:
                assert torch.equal(item["image"], base["image"]) and torch.equal(item["driver"], base["driver"])
    assert flipped_seen
    batch = next(iter(DataLoader(plain, batch_size=3, collate_fn=collate)))
    assert batch["image"].shape == (3, 3, 64, 64) and batch["driver"].shape == (3, 3, 64, 64)
    assert batch["masks"].shape == (3, 64, 64) and len(batch["prompt"]) == 3 and len(batch["instance_masks"]) == 3


def test_condition_dataset_defect_free_images(demo):
    data = load_coco(demo / "free.json", progress=False)
    item = ConditionDataset(data, resolution=64)[0]
    assert item["prompt"] == "an image of a sks" and item["driver"].max() <= 50 / 255 + 1e-7
