"""Turning what a user passes as an image (path, bytes, data URL, array, PIL image) into RGB PIL."""
from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..format.errors import InputError


def load_image(image, max_pixels: int | None = None) -> Image.Image:
    """`image` as RGB; one of more than `max_pixels` pixels is refused before it is decoded."""
    if isinstance(image, Image.Image):
        _check_size(image.width, image.height, max_pixels)
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise InputError(f"image array must be uint8 (H, W, 3) with H, W > 0, got {image.dtype} {image.shape}")
        _check_size(image.shape[1], image.shape[0], max_pixels)
        return Image.fromarray(image)
    if isinstance(image, str) and image.startswith("data:image/"):
        try:
            image = base64.b64decode(image.split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            raise InputError("malformed data:image URL") from None
    name = ""  # the file, to name it in errors
    if isinstance(image, (str, Path)):
        path = Path(image)
        name = f" {path}"
        if not path.is_file():
            raise InputError(f"image not found: {path}")
        try:
            image = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read image {path}: {e.strerror}") from None
    if isinstance(image, (bytes, bytearray)):
        try:
            with warnings.catch_warnings():  # Pillow warns of sizes we refuse below anyway
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(image))  # reads the header only
            with img:
                _check_size(*img.size, max_pixels)
                img.load()
                return img.convert("RGB")
        except UnidentifiedImageError:  # its message names a BytesIO object, not the file
            raise InputError(f"unreadable image{name}: not a format Pillow can read") from None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"unreadable image{name}: {e}") from None
    raise InputError(f"unsupported image type {type(image).__name__}")


def _check_size(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(f"image is {width}x{height} ({width * height / 1e6:.1f} MP), above this engine's limit of "
                         f"{max_pixels / 1e6:g} MP (max_image_pixels): send it resized")
