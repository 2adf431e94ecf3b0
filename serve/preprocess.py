"""Image preprocessing as the manifest records it: decode, convert mode, resize, scale to [0, 1], normalise.

``open`` reads only the header (format and size checks); ``to_array`` decodes, which is CPU work that callers
run in a thread pool unless the image is tiny. Every way a client's bytes can be wrong ends in a 4xx naming
the problem: not an image, truncated, an unsupported format (415) or more pixels than ``max_pixels`` (a
decompression bomb).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from deepserve.serve.errors import BadRequest, ImageTooLarge, UnsupportedMediaType

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# The order Image.open probes FORMATS in (their magic bytes differ): WEBP last, as its plugin is loaded only by
# Pillow's init(), which imports every plugin.
_OPEN_ORDER = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
DEFAULT_MAX_PIXELS = 4096 * 4096
_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}  # PIL.Image.Resampling


@dataclass(frozen=True)
class ImagePreprocessor:
    """Turns encoded image bytes into one normalised ``[C, H, W]`` float32 array."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear"
    """Resampling filter used to resize to ``height x width``."""
    color_mode: str = "RGB"
    """Pillow mode the image is converted to: ``L`` (1 channel) or ``RGB`` (3 channels)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest width x height decoded; bigger images are refused as decompression bombs."""

    @classmethod
    def from_manifest(cls, preprocessing: dict[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePreprocessor:
        """Build from a manifest's ``preprocessing``; raises ``ValueError`` naming the bad key."""
        p = preprocessing
        channels = int(p["channels"])
        color_mode = p.get("color_mode") or ("L" if channels == 1 else "RGB")
        if (color_mode, channels) not in (("L", 1), ("RGB", 3)):
            raise ValueError(f"preprocessing.color_mode {color_mode!r} does not fit channels={channels}")
        resize = str(p.get("resize") or "bilinear").lower()
        if resize not in _FILTERS:
            raise ValueError(f"preprocessing.resize must be one of {sorted(_FILTERS)}, got {resize!r}")
        mean, std = tuple(float(m) for m in p["mean"]), tuple(float(s) for s in p["std"])
        if len(mean) != channels or len(std) != channels or not all(s > 0 for s in std):
            raise ValueError(f"preprocessing.mean/std need {channels} values (std > 0), got {mean} / {std}")
        return cls(channels, int(p["height"]), int(p["width"]), mean, std, resize, color_mode, max_pixels)

    def __post_init__(self) -> None:
        # x_norm = (x / 255 - mean) / std = x * scale + offset, in float32. A pixel is one of 256 byte values,
        # so each channel's results are tabulated once ([C, 256]) and normalising is a lookup per pixel.
        std = np.asarray(self.std, dtype=np.float32)
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        offset = (-np.asarray(self.mean, dtype=np.float32) / std).astype(np.float32)
        table = np.arange(256, dtype=np.float32) * scale[:, None] + offset[:, None]
        object.__setattr__(self, "_table", table)

    def open(self, data: bytes):  # -> PIL.Image.Image, header read, pixels not decoded yet
        """Read the header and check format and size; raises ``BadRequest`` / ``UnsupportedMediaType``."""
        if not data:
            raise BadRequest("image is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                try:  # probing only the supported plugins is faster than trying all of Pillow's
                    image = Image.open(io.BytesIO(data), formats=_OPEN_ORDER)
                except UnidentifiedImageError:  # try every plugin, to name a format we refuse (415)
                    image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadRequest(f"not a decodable image ({len(data)} bytes); send one of {', '.join(FORMATS)}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLarge(f"image refused as a decompression bomb: {e} (this server's limit is "
                                f"{self.max_pixels} pixels, --max-image-pixels)") from None
        if image.format not in FORMATS:
            raise UnsupportedMediaType(f"image format {image.format} is not supported; send one of {', '.join(FORMATS)}")
        width, height = image.size
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"image refused as a decompression bomb: {width}x{height} = {width * height} pixels "
                                f"exceeds the limit of {self.max_pixels} (--max-image-pixels)")
        return image

    def blank_png(self) -> bytes:
        """A blank PNG of the model's size and mode, for warm-up: Pillow imports its format plugins on the first
        image it opens (tens of ms the first burst would otherwise pay)."""
        buffer = io.BytesIO()
        Image.new(self.color_mode, (self.width, self.height)).save(buffer, "PNG")
        return buffer.getvalue()

    def __call__(self, data: bytes) -> np.ndarray:
        """Encoded bytes -> ``[C, H, W]`` float32, ready for the model."""
        return self.to_array(self.open(data))

    def to_array(self, image) -> np.ndarray:
        """An image from ``open`` -> ``[C, H, W]`` float32: decode, convert, resize, normalise."""
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as e:  # Pillow's ways of saying the data is cut or corrupt
            raise BadRequest(f"{image.format} image is truncated or corrupt: {e}") from None
        if image.mode != self.color_mode:
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")  # composite transparency over white, not black
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            image = image.convert(self.color_mode)
        if image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), resample=_FILTERS[self.resize])
        # Mode and size are now color_mode and (width, height): tobytes() is [H, W, C] uint8 (it is also what
        # np.asarray(image) copies, through a slower __array_interface__).
        data = np.frombuffer(image.tobytes(), dtype=np.uint8)
        table: np.ndarray = self._table  # type: ignore[attr-defined]
        if self.channels == 1:
            return table[0].take(data).reshape(1, self.height, self.width)
        pixels = data.reshape(self.height, self.width, self.channels)
        out = np.empty((self.channels, self.height, self.width), dtype=np.float32)
        for c in range(self.channels):  # mode="clip" never clips a uint8 index; it spares "raise"'s buffered copy
            table[c].take(pixels[:, :, c], out=out[c], mode="clip")
        return out
