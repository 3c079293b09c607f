"""Image files of every mode and bit depth as 8-bit RGB (8-bit ones exactly as PIL converts them), and one line
naming the file for anything that has no 8-bit reading: damaged files, decompression bombs, out-of-range pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from functions.core.errors import UserError
from functions.data.decoding import float_pixels_to_uint8, read_bytes
from functions.data.image_folder import ImageFiles

RAMP = np.arange(16 * 16, dtype=np.uint32).reshape(16, 16)  # a distinct value per pixel


def decoded(path: Path) -> np.ndarray:
    """The image as an image folder reads it at its own size (16 pixels: no resizing)."""
    return ImageFiles([path], 16).decode(0)


@pytest.mark.parametrize("mode, name", [("RGB", "a.png"), ("RGB", "a.jpg"), ("L", "a.png"), ("P", "a.png"),
                                        ("RGBA", "a.png"), ("CMYK", "a.jpg"), ("1", "a.bmp"), ("LA", "a.png")])
def test_eight_bit_images_decode_exactly_as_pil_converts_them(tmp_path: Path, mode: str, name: str) -> None:
    rgb = np.stack([RAMP % 256, (RAMP * 7) % 256, (RAMP * 13) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).convert(mode).save(tmp_path / name)
    with Image.open(tmp_path / name) as image:
        expected = np.asarray(image.convert("RGB"))
    assert np.array_equal(decoded(tmp_path / name), expected)


def test_sixteen_bit_greyscale_keeps_its_high_byte(tmp_path: Path) -> None:
    values = (RAMP * 257).astype(np.uint16)  # 0..65535 in steps of 257: high byte = RAMP
    Image.fromarray(values).save(tmp_path / "deep.png")
    Image.fromarray(values.byteswap().view(values.dtype.newbyteorder())).save(tmp_path / "deep.tif")  # I;16B
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "int.tif")  # "I"
    for name, mode in (("deep.png", "I;16"), ("deep.tif", "I;16B"), ("int.tif", "I")):
        with Image.open(tmp_path / name) as image:
            assert image.mode == mode
        pixels = decoded(tmp_path / name)
        assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3)
        assert np.array_equal(pixels[..., 0], RAMP.astype(np.uint8)) and (pixels[..., 0] == pixels[..., 2]).all()


def test_a_32_bit_image_beyond_16_bits_is_refused(tmp_path: Path) -> None:
    Image.fromarray(RAMP.astype(np.int32) - 5).save(tmp_path / "signed.tif")
    with pytest.raises(UserError, match=r"signed.tif is a I image with values from -5 to 250, outside 16-bit"):
        decoded(tmp_path / "signed.tif")


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_images_in_unit_or_byte_range_are_scaled(tmp_path: Path, scale: float) -> None:
    values = (RAMP / 255.0 * scale).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "float.tif")
    pixels = decoded(tmp_path / "float.tif")
    assert np.array_equal(pixels[..., 1], np.rint(values.astype(np.float64) * (255.0 / scale)).astype(np.uint8))
    assert pixels.max() == 255


@pytest.mark.parametrize("value, reason", [(np.nan, "not finite"), (1e6, "from 0 to 1e\\+06, outside")])
def test_float_images_outside_both_ranges_are_refused(tmp_path: Path, value: float, reason: str) -> None:
    values = np.zeros((16, 16), dtype=np.float32)
    values[3, 4] = value
    Image.fromarray(values).save(tmp_path / "float.tif")
    with pytest.raises(UserError, match=f"float.tif holds .*{reason}") as error:
        decoded(tmp_path / "float.tif")
    assert "\n" not in str(error.value)


def test_float_arrays_round_to_the_nearest_value() -> None:
    assert float_pixels_to_uint8(np.array([0.0, 0.5, 1.0]), "x").tolist() == [0, 128, 255]
    assert float_pixels_to_uint8(np.array([0.0, 12.6, 255.0]), "x").tolist() == [0, 13, 255]


@pytest.mark.parametrize("limit, kind", [(100, "error"), (200, "warning")])
def test_decompression_bombs_are_one_line(tmp_path: Path, monkeypatch, limit: int, kind: str) -> None:
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "bomb.png")
    # 256 pixels: past twice the limit PIL raises, past the limit it only warns.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(UserError, match=r"bomb.png is too large to decode safely .*shrink or remove") as error:
        decoded(tmp_path / "bomb.png")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a\x10\x00"])
def test_truncated_or_foreign_files_are_one_line(tmp_path: Path, content: bytes) -> None:
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    (tmp_path / "odd.png").write_bytes(content)
    for name in ("cut.jpg", "odd.png"):
        with pytest.raises(UserError, match=f"cannot decode .*{name}") as error:
            decoded(tmp_path / name)
        assert "\n" not in str(error.value)


def test_unreadable_bytes_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(UserError, match="cannot read .*folder.jpg"):
        read_bytes(tmp_path / "folder.jpg")
