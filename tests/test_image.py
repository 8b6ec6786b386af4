from pathlib import Path

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


# -- issue #18: files cut short, names OpenCV cannot take -------------------------------------------
def _encodings(image: np.ndarray) -> dict[str, bytes]:
    """A real image as the files a line meets: PNG 8/16-bit colour and gray, JPEG baseline and progressive."""
    bgr = image[:, :, ::-1]
    deep = bgr.astype(np.uint16) * 257
    return {
        "rgb8.png": _png(bgr),
        "rgb16.png": _png(deep),
        "gray8.png": _png(bgr[:, :, 0]),
        "gray16.png": _png(deep[:, :, 0]),
        "baseline.jpg": cv2.imencode(".jpg", bgr)[1].tobytes(),
        "progressive.jpg": cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
    }


@pytest.fixture(scope="module")
def real_image(test_samples):
    return load_image(test_samples[0].image_path)


def test_a_png_or_jpeg_cut_short_is_refused_by_name_from_bytes_and_files(real_image, tmp_path):
    for name, data in _encodings(real_image).items():
        for cut in (1000, len(data) // 2, len(data) - 1):  # at 1000 bytes OpenCV handed back the untouched buffer
            path = tmp_path / f"cut{cut}_{name}"
            path.write_bytes(data[:cut])
            with pytest.raises(ImageError, match=f"{path.name}: incomplete"):
                load_image(path)
            with pytest.raises(ImageError, match="upload: incomplete"):
                decode(data[:cut], "upload")


def test_complete_files_decode_in_one_buffer_and_may_carry_trailing_data(real_image, tmp_path, monkeypatch):
    buffers = []
    imread = cv2.imread
    monkeypatch.setattr(cv2, "imread", lambda name, *args: buffers.append(args[0]) or imread(name, *args))
    for name, data in _encodings(real_image).items():
        path = tmp_path / name
        path.write_bytes(data + b"\0trailing bytes after the end marker")
        np.testing.assert_array_equal(load_image(path), decode(data))
    assert len(buffers) == 6 and all(isinstance(b, np.ndarray) for b in buffers)  # OpenCV decodes into a given buffer
    np.testing.assert_array_equal(load_image(tmp_path / "rgb8.png"), real_image)


def test_a_file_name_that_is_not_utf8_is_read(real_image, tmp_path):
    """OpenCV's binding crashed the process (SIGSEGV) on such a name: it is loaded in a child process."""
    import os
    import subprocess
    import sys

    name = os.path.join(os.fsencode(tmp_path), b"module_\xff.png")
    with open(name, "wb") as f:
        f.write(_png(real_image[:, :, ::-1]))
    script = "import sys; from hiad_runtime.image import load_image; print(load_image(sys.argv[1]).sum())"
    run = subprocess.run(
        [sys.executable, "-c", script, name],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == int(real_image.sum())


def test_default_pixel_budget_is_one_rule():
    from hiad_runtime.image import MAX_PIXELS_FACTOR, default_max_pixels

    assert default_max_pixels((2048, 1024)) == MAX_PIXELS_FACTOR * 2048 * 1024 == 4 * 2048 * 1024
