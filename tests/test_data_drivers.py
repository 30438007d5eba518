"""data.drivers, data.palette, data.drivers_sheet."""
import numpy as np
import pytest
import torch

from data.coco import new_coco, save_coco
from data.drivers import DriverConfig, render_driver, topological_driver, topology_map
from data.drivers_sheet import DriversSheetConfig, main as sheet_main
from data.files import write_image_atomic
from data.images import read_image
from data.masks import mask_to_rle
from data.palette import BASE_PALETTE, PALETTE, class_color


def textured(seed=0, size=(48, 64)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)


def test_range_topology_level_and_exact_paint():
    image = textured()
    first = np.zeros((48, 64), bool)
    first[5:20, 5:30] = True
    second = np.zeros((48, 64), bool)
    second[10:25, 20:40] = True  # overlaps the first: drawn over it
    driver = topological_driver(image, [(first, 1), (second, 3)])
    assert driver.dtype == torch.float32 and driver.shape == (3, 48, 64)
    assert driver.min() >= 0 and driver.max() <= 1
    painted = first | second
    topology = driver[:, torch.from_numpy(~painted)]
    assert topology.max() <= 50 / 255 + 1e-7
    assert torch.equal(topology[0], topology[1]) and torch.equal(topology[1], topology[2])  # grey
    red = torch.tensor(PALETTE[1], dtype=torch.float32) / 255
    blue = torch.tensor(PALETTE[3], dtype=torch.float32) / 255
    assert torch.equal(driver[:, torch.from_numpy(second)], blue[:, None].expand(3, int(second.sum())))
    only_first = first & ~second
    assert torch.equal(driver[:, torch.from_numpy(only_first)], red[:, None].expand(3, int(only_first.sum())))
    # the reverse order puts the first mask on top
    reverse = topological_driver(image, [(second, 3), (first, 1)])
    assert torch.equal(reverse[:, torch.from_numpy(first)], red[:, None].expand(3, int(first.sum())))


def test_deterministic_label_map_and_uint8_agree():
    image = textured(1)
    labels = np.zeros((48, 64), np.uint8)
    labels[30:40, 10:50] = 2
    a = topological_driver(image, labels)
    b = topological_driver(image.copy(), labels.copy())
    assert torch.equal(a, b)
    as_uint8 = render_driver(image, labels)
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (48, 64, 3)
    assert torch.equal(torch.from_numpy(as_uint8).permute(2, 0, 1).float() / 255, a)


def test_defective_and_defect_free_drivers_share_the_procedure():
    # Same surface, one with a dark defect: outside a neighbourhood of the defect the topology
    # maps agree, and under the mask the paint hides what the defect did to the map.
    rng = np.random.default_rng(2)
    free = np.clip(128 + rng.normal(0, 20, (64, 64)), 0, 255).astype(np.uint8)
    defective = free.copy()
    mask = np.zeros((64, 64), bool)
    mask[28:36, 10:54] = True
    defective[mask] = 20
    d_free = render_driver(np.dstack([free] * 3), [(mask, 2)])
    d_def = render_driver(np.dstack([defective] * 3), [(mask, 2)])
    assert np.array_equal(d_free[mask], d_def[mask])
    far = np.ones((64, 64), bool)
    far[28 - 24:36 + 24, :] = False
    assert np.array_equal(d_free[far], d_def[far])
    # without masks the driver is the pure topology map, grey, <= 50
    plain = render_driver(np.dstack([free] * 3))
    assert plain.max() <= 50 and np.array_equal(plain[..., 0], topology_map(free))


def test_inpaint_defects_removes_the_halo():
    # A 512 px texture with a 5 px dark line (the measurement): the default driver of the
    # defective image differs from the defect-free surface's around the paint (the halo); with
    # inpaint_defects it differs only within the inpainting's reach of the mask.
    rng = np.random.default_rng(3)
    free = np.clip(128 + 25 * np.sin(np.arange(512) / 9.0)[None, :] + rng.normal(0, 12, (512, 512)),
                   0, 255).astype(np.uint8)
    defective = free.copy()
    mask = np.zeros((512, 512), bool)
    mask[250:255, 60:450] = True
    defective[mask] = 10
    rgb = lambda grey: np.dstack([grey] * 3)  # noqa: E731
    instances = [(mask, 1)]
    outside = ~mask
    halo = (render_driver(rgb(defective), instances) != render_driver(rgb(free), instances)).any(axis=2) & outside
    on = DriverConfig(inpaint_defects=True)
    after = (render_driver(rgb(defective), instances, on) != render_driver(rgb(free), instances, on)).any(axis=2)
    assert halo.sum() > 2000  # thousands of pixels change around the line without the option
    assert (after & outside).sum() < halo.sum() / 10
    # defect-free images with no instances: the option changes nothing
    assert np.array_equal(render_driver(rgb(free), None, on), render_driver(rgb(free)))
    with pytest.raises(ValueError, match="inpaint_radius"):
        DriverConfig(inpaint_radius=0)


def test_parameters_are_named_and_checked():
    image = textured(3)
    level = topology_map(image, DriverConfig(background_level=30, upsample="nearest"))
    assert set(np.unique(level)) <= {0, 30}
    assert not np.array_equal(topology_map(image, DriverConfig(block_size=5)), topology_map(image, DriverConfig(block_size=21)))
    assert render_driver(image, None, downscale=1).shape == (48, 64, 3)  # keyword overrides
    with pytest.raises(ValueError, match="block_size must be odd"):
        DriverConfig(block_size=4)
    with pytest.raises(ValueError, match="threshold_method"):
        DriverConfig(threshold_method="otsu")
    with pytest.raises(ValueError, match="category id 300"):
        render_driver(image, [(np.ones((48, 64), bool), 300)])


def test_palette_is_fixed_distinct_and_not_grey():
    assert class_color(1) == (255, 0, 0) and class_color(2) == (0, 255, 0) and class_color(3) == (0, 0, 255)
    assert PALETTE[1:13] == BASE_PALETTE
    assert len(set(PALETTE)) == 256
    assert all(max(c) > 50 for c in PALETTE[1:])
    with pytest.raises(ValueError, match="ids run 1..255"):
        class_color(0)


def test_drivers_sheet_cli(tmp_path):
    coco = new_coco(["crack"])
    for i in range(3):
        path = tmp_path / f"{i}.png"
        write_image_atomic(path, textured(i, (40, 30)))
        coco["images"].append({"id": i + 1, "file_name": str(path), "height": 40, "width": 30})
        mask = np.zeros((40, 30), np.uint8)
        mask[5:10, 5:25] = 1
        coco["annotations"].append({"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": mask_to_rle(mask)})
    save_coco(coco, tmp_path / "coco.json")
    out = sheet_main(DriversSheetConfig(data=str(tmp_path / "coco.json"), out=str(tmp_path / "sheet.png"),
                                        num=3, columns=2, tile=32))
    sheet = read_image(out)
    assert sheet.shape == (2 * (32 + 4) + 4, 2 * (2 * 32 + 4 + 4) + 4, 3)
    assert (sheet == PALETTE[1]).all(axis=2).any()  # red paint visible
