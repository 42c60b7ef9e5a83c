"""Portrait checks: unreadable and oversized images, orientation, colour modes, the face warning."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.validation import MAX_PORTRAIT_SIDE, ValidationError, validate_portrait
from app.validation import face as face_module


def assert_no_server_path(message: str, *dirs: Path) -> None:
    for d in dirs:
        assert str(d) not in message
    assert not re.search(r"(^|[\s'\"(])/[\w.-]+/", message), f"message names a path: {message}"


def png_bytes(array: np.ndarray, **save_args: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save_args)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but which holds no pixel data: opening it must not decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def smooth_gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 90)], -1
    ).astype(np.uint8)


def test_real_portrait_decodes_exactly_and_has_a_face(examples_dir: Path) -> None:
    path = examples_dir / "fashion_blogger.jpg"
    check = validate_portrait(path)
    np.testing.assert_array_equal(check.image, np.asarray(Image.open(path).convert("RGB")))
    assert check.image.shape == (720, 400, 3) and check.image.dtype == np.uint8
    assert check.face_found is True and check.warnings == []


def test_path_as_string_and_bytes_give_the_same_image(examples_dir: Path) -> None:
    path = examples_dir / "man.png"
    from_str = validate_portrait(str(path))
    from_bytes = validate_portrait(path.read_bytes())
    np.testing.assert_array_equal(from_str.image, from_bytes.image)
    assert from_str.image.shape == (768, 1344, 3) and from_str.face_found is True


@pytest.mark.parametrize("payload", [b"definitely not an image", b"", b"GIF89a" + b"\x00" * 10])
def test_non_image_bytes_are_refused(payload: bytes) -> None:
    with pytest.raises(ValidationError, match="not a readable image. Supported formats: JPEG, PNG"):
        validate_portrait(payload)


def test_non_image_file_is_refused_without_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "portrait.jpg"
    path.write_text("hello")
    with pytest.raises(ValidationError) as err:
        validate_portrait(path)
    assert "not a readable image" in str(err.value)
    assert_no_server_path(str(err.value), tmp_path)


def test_missing_file_and_no_input(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as err:
        validate_portrait(tmp_path / "gone.png")
    assert "could not be found" in str(err.value)
    assert_no_server_path(str(err.value), tmp_path)
    with pytest.raises(ValidationError, match="Please provide a portrait"):
        validate_portrait(None)


def test_truncated_jpeg_is_refused(examples_dir: Path) -> None:
    data = (examples_dir / "fashion_blogger.jpg").read_bytes()
    with pytest.raises(ValidationError, match="truncated or corrupt"):
        validate_portrait(data[: len(data) * 6 // 10])


def test_pixel_cap_is_enforced_before_decoding() -> None:
    """48 MP claimed in the header, no pixel data: refused on the header alone with the numbers."""
    with pytest.raises(ValidationError) as err:
        validate_portrait(png_header_only(8000, 6000))
    assert "8000×6000 pixels (48.0 MP); the limit is 40.0 MP" in str(err.value)


def test_decompression_bomb_is_refused() -> None:
    with pytest.raises(ValidationError, match="far too large"):
        validate_portrait(png_header_only(20000, 20000))


def test_large_image_is_downscaled_with_a_warning() -> None:
    check = validate_portrait(png_bytes(smooth_gradient(2000, 3000)))
    assert check.image.shape == (1365, MAX_PORTRAIT_SIDE, 3)
    assert any("downscaled from 3000×2000 to 2048×1365" in w for w in check.warnings)
    # Downscaling a linear ramp keeps it linear: the middle column still holds the middle value.
    assert abs(int(check.image[700, 1024, 0]) - 127) <= 2


def test_lower_caps_are_configurable() -> None:
    with pytest.raises(ValidationError, match="the limit is 0.5 MP"):
        validate_portrait(png_bytes(smooth_gradient(600, 900)), max_pixels=500_000)
    check = validate_portrait(png_bytes(smooth_gradient(600, 900)), max_side=300)
    assert check.image.shape == (200, 300, 3)


def test_tiny_image_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 64 pixels on each side"):
        validate_portrait(png_bytes(smooth_gradient(40, 200)))


@pytest.mark.parametrize(("fmt", "tolerance"), [("PNG", 0.0), ("JPEG", 3.0)])
def test_exif_orientation_is_applied(fmt: str, tolerance: float) -> None:
    """Orientation 6 means 'rotate 90° clockwise to display': the stored left edge becomes the top."""
    stored = np.full((120, 240, 3), 30, dtype=np.uint8)
    stored[:, :60] = (230, 40, 40)  # a red band along the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    check = validate_portrait(buf.getvalue())
    expected = np.rot90(stored, k=-1)
    assert check.image.shape == expected.shape == (240, 120, 3)
    assert np.abs(check.image.astype(int) - expected.astype(int)).mean() <= tolerance
    assert check.image[:60, :, 0].mean() > 200  # red on top


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((100, 100, 4), dtype=np.uint8)
    rgba[:, :50] = (10, 200, 30, 0)  # fully transparent: its colour must not show
    rgba[:, 50:75] = (0, 0, 0, 255)  # opaque black
    rgba[:, 75:] = (0, 0, 0, 128)  # half-transparent black over white
    check = validate_portrait(png_bytes(rgba))
    assert (check.image[:, :50] == 255).all()
    assert (check.image[:, 50:75] == 0).all()
    assert np.abs(check.image[:, 75:].astype(int) - 127).max() <= 1


def test_greyscale_becomes_three_equal_channels() -> None:
    grey = smooth_gradient(100, 120)[..., 0]
    check = validate_portrait(png_bytes(grey))
    for channel in range(3):
        np.testing.assert_array_equal(check.image[..., channel], grey)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    grey16 = np.array([[0, 32768, 65535]] * 80, dtype=np.uint16).repeat(30, axis=1)
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    check = validate_portrait(buf.getvalue())
    assert check.image[0, [0, 30, 60], 0].tolist() == [0, 128, 255]


def test_no_face_warns_but_keeps_the_image() -> None:
    check = validate_portrait(png_bytes(smooth_gradient(300, 300)))
    assert check.face_found is False
    assert check.image.shape == (300, 300, 3)
    assert any("No face was found" in w and "still be used" in w for w in check.warnings)


def test_without_any_face_detector_the_check_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(face_module, "_hog_detector", lambda: None)
    monkeypatch.setattr(face_module, "_face_cascade", lambda: None)  # OpenCV 5, or no OpenCV
    check = validate_portrait(png_bytes(smooth_gradient(300, 300)))
    assert check.face_found is None and check.warnings == []
