"""Image encode/decode on the CPU: the formats the contract allows, and guarded decoding."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from handlers.errors import InvalidInput
from klein_facts.jobs import DEFAULT_QUALITY, OutputFormat

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# PNG compress_level 1: ~2.7x faster than Pillow's default 6 on a textured 1024x1024 image
# for ~15% larger files; upload bandwidth is cheaper than a CPU stall (see BENCHMARKS.md).
PNG_COMPRESS_LEVEL = 1
# WebP method 2 (of 0..6): about half the time of Pillow's default 4 at the same size, quality 90.
WEBP_METHOD = 2
# Input images are decoded only as the formats the contract speaks (its output formats): every
# other Pillow plugin (dozens, some rarely exercised: PSD, EPS via Ghostscript, TGA, ...) is
# untrusted-input attack surface that no job needs.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


def encode_image(
    image: Image.Image, fmt: OutputFormat = "png", quality: int | None = None
) -> tuple[bytes, str]:
    """Encode to bytes; returns (data, content_type)."""
    buf = io.BytesIO()
    q = DEFAULT_QUALITY if quality is None else quality
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=q, optimize=False)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=q, method=WEBP_METHOD)
    else:  # pragma: no cover - the contract's Literal forbids it
        raise ValueError(f"unsupported output format {fmt!r}")
    return buf.getvalue(), CONTENT_TYPES[fmt]


def decode_image(data: bytes, *, max_pixels: int, field: str = "image") -> Image.Image:
    """Decode untrusted bytes (PNG, JPEG or WebP) into an RGB image.

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb (a tiny file declaring a huge canvas) costs nothing.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
            width, height = probe.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"{field}: image is {width}x{height} ({width * height} pixels), more than the "
                    f"{max_pixels} pixels allowed"
                )
            probe.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"{field}: image rejected as a decompression bomb ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow signals "not an image / truncated" with these (UnidentifiedImageError is an OSError).
        raise InvalidInput(
            f"{field}: content is not a decodable PNG, JPEG or WebP image ({type(exc).__name__})"
        ) from exc
    return probe.convert("RGB")
