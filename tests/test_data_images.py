"""data.images: every input kind reads as 8-bit RGB; masks keep their stored values."""
import numpy as np
import pytest
from PIL import Image

from data.files import atomic_path, write_image_atomic, write_json_atomic
from data.images import ImageReadError, image_size, image_to_tensor, read_image, read_mask, tensor_to_image


def test_exif_orientation_is_applied(tmp_path):
    # A 2x4 (h x w) image, left half white; EXIF orientation 6 = rotate 90 degrees clockwise.
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[:, :2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    for suffix in (".jpg", ".png"):
        path = tmp_path / f"rotated{suffix}"
        Image.fromarray(pixels).save(path, exif=exif, quality=100)
        image = read_image(path)
        assert image.shape == (4, 2, 3) and image.dtype == np.uint8
        assert image_size(path) == (4, 2)
        # After a clockwise turn the white left half is on top.
        assert image[:2].mean() > 200 and image[2:].mean() < 55


def test_grayscale_rgba_palette_16bit_read_as_rgb(tmp_path):
    Image.fromarray(np.full((3, 5), 77, np.uint8), mode="L").save(tmp_path / "gray.png")
    rgba = np.zeros((3, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    pal = Image.fromarray(np.array([[0, 1, 2, 1, 0]] * 3, np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    pal.save(tmp_path / "palette.png")
    Image.fromarray(np.full((3, 5), 40000, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((3, 5), 200, np.uint8), mode="L").save(tmp_path / "gray.jpg", quality=100)

    for name in ("gray.png", "rgba.png", "palette.png", "deep.png", "gray.jpg"):
        image = read_image(tmp_path / name)
        assert image.shape == (3, 5, 3) and image.dtype == np.uint8, name
    assert np.all(read_image(tmp_path / "gray.png") == 77)
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [10, 20, 30]  # alpha dropped, RGB order
    assert read_image(tmp_path / "palette.png")[0, :3].tolist() == [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    assert np.all(read_image(tmp_path / "deep.png") == 40000 >> 8)
    assert abs(int(read_image(tmp_path / "gray.jpg").mean()) - 200) <= 1


def test_read_mask_keeps_values_and_palette_indices(tmp_path):
    pal = Image.fromarray(np.array([[0, 1, 2, 1]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    pal.save(tmp_path / "index.png")
    assert read_mask(tmp_path / "index.png").tolist() == [[0, 1, 2, 1]]
    Image.fromarray(np.array([[0, 3, 255]], np.uint8), mode="L").save(tmp_path / "gray.png")
    assert read_mask(tmp_path / "gray.png").tolist() == [[0, 3, 255]]
    colour = np.zeros((1, 2, 3), np.uint8)
    colour[0, 1] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    mask = read_mask(tmp_path / "colour.png")
    assert mask.shape == (1, 2, 3) and mask[0, 1].tolist() == [255, 0, 0]


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="nothere.png: file not found"):
        read_image(tmp_path / "nothere.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="broken.png: cannot decode"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.jpg: file is empty"):
        read_mask(tmp_path / "empty.jpg")


def test_atomic_writes_leave_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    write_image_atomic(tmp_path / "x.png", np.full((4, 4, 3), 9, np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    assert np.all(read_image(tmp_path / "x.png") == 9)


def test_tensor_round_trip():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 2, 3) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(tensor_to_image(tensor), image)
