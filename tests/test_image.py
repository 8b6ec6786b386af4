import cv2
import numpy as np
import pytest

from hiad_runtime.image import ImageError, decode, load_image, resize_image


def _png(array) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def test_gray_rgba_and_16bit_are_converted(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = decode(_png(gray))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and (out[:, :, 1] == gray).all()

    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 200, 10, 0  # blue, red, fully transparent
    out = decode(_png(bgra))
    assert out.shape == (4, 4, 3) and (out[0, 0] == [10, 0, 200]).all()  # RGB order, alpha dropped

    deep = np.full((5, 5), 65535, np.uint16)
    deep[0, 0] = 257 * 100
    out = decode(_png(deep))
    assert out.dtype == np.uint8 and out[1, 1, 0] == 255 and out[0, 0, 0] == 100


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="broken.png"):
        load_image(bad)
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_resize_policy():
    img = np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    assert resize_image(img, (32, 64)) is img
    small = resize_image(img, (16, 32))
    np.testing.assert_array_equal(small, cv2.resize(img, (16, 32), interpolation=cv2.INTER_AREA))
    assert resize_image(img, (64, 128)).shape == (128, 64, 3)
