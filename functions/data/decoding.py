"""Image files of any mode and bit depth as 8-bit RGB, and pixel arrays of any numeric type as uint8; a file that
cannot be read that way is one UserError naming it.

8-bit images (RGB, L, P, RGBA, CMYK, ...) convert as PIL's convert("RGB") always did. 16-bit greyscale ("I;16",
"I;16B", ...) keeps its high byte (value >> 8), as PIL itself reduces 16-bit colour PNGs. "I" (32-bit integer, how
PIL opens some 16-bit greyscale files) is read as 16-bit and refused when its values leave 0..65535. Floating-point
pixels ("F", float arrays) must be finite and lie in [0, 1] (scaled by 255) or else in [0, 255]; they are rounded
to the nearest integer. Anything else is refused: no guessed scale trains on a black or white dataset.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from functions.core.errors import UserError

SIXTEEN_BIT_MAX = 65535


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none), at most 160 characters: the reason
    part of a UserError."""
    return (" ".join(str(error).split()) or type(error).__name__)[:160]


def float_pixels_to_uint8(values: np.ndarray, source: str) -> np.ndarray:
    """Float pixels in [0, 1] (scaled by 255) or else in [0, 255], rounded to uint8; a UserError naming `source`
    for non-finite values or values outside both ranges."""
    if not np.isfinite(values).all():
        raise UserError(f"{source} holds pixel values that are not finite (NaN or infinity); the file is damaged")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise UserError(f"{source} holds floating-point pixels from {low:g} to {high:g}, outside [0, 1] and [0, 255]; "
                        "save it as 8-bit images")
    return np.rint(values * 255.0 if high <= 1.0 else values).astype(np.uint8)


def integer_pixels_to_uint8(values: np.ndarray, source: str) -> np.ndarray:
    """Integer pixels in 0..255 as uint8 (the same numbers); a UserError naming `source` for any value outside."""
    if values.size and (int(values.min()) < 0 or int(values.max()) > 255):
        raise UserError(f"{source} holds pixel values from {int(values.min())} to {int(values.max())}, outside "
                        "0..255; save it as 8-bit images")
    return values.astype(np.uint8)


def _sixteen_bit_to_rgb(image: Any, path: Path) -> Any:
    """A 16-bit greyscale ("I;16*") or 32-bit integer ("I") image as 8-bit RGB, keeping each value's high byte."""
    from PIL import Image

    values = np.asarray(image)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > SIXTEEN_BIT_MAX:
        raise UserError(f"{path} is a {image.mode} image with values from {low} to {high}, outside 16-bit 0..65535; "
                        "save it as an 8-bit or 16-bit image")
    return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8)).convert("RGB")


def _float_to_rgb(image: Any, path: Path) -> Any:
    """A floating-point ("F") image as 8-bit RGB (see float_pixels_to_uint8)."""
    from PIL import Image

    return Image.fromarray(float_pixels_to_uint8(np.asarray(image), str(path))).convert("RGB")


def _to_rgb(image: Any, path: Path) -> Any:
    """An opened image of any mode as 8-bit RGB."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return _sixteen_bit_to_rgb(image, path)
    if image.mode == "F":
        return _float_to_rgb(image, path)
    return image.convert("RGB")


def open_rgb(path: Path) -> Any:
    """The image in `path` as 8-bit RGB (a PIL image); a UserError naming the file when it cannot be decoded, is
    larger than PIL's decompression-bomb limit, or holds pixels of a mode or range that has no 8-bit reading."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Above Image.MAX_IMAGE_PIXELS PIL only warns; such an image in a dataset is a bomb or a mistake.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return _to_rgb(image, path)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UserError(f"{path} is too large to decode safely ({one_line(error)}); shrink or remove the "
                        "file") from None
    except Exception as error:  # noqa: BLE001 - PIL's plugins raise many kinds of errors on a damaged file
        raise UserError(f"cannot decode {path} ({one_line(error)}); the file is damaged or not an image: remove or "
                        "replace it") from None


def read_bytes(path: Path, fix: str = "remove or replace the file") -> np.ndarray:
    """A file's bytes as uint8; a UserError naming the file (and saying `fix`) when it cannot be read."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror or one_line(error)}); {fix}") from None
