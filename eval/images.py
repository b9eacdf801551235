"""Opening users' image files safely, and thumbnails for HTML.

Pillow's decompression-bomb guard stays on: a file that declares more than 2 x `Image.MAX_IMAGE_PIXELS`
pixels (about 179 MP) is refused before it is decoded. Larger-than-needed images are decoded at a
reduced scale where the format allows it (JPEG `draft`) and downscaled to `max_side`; truncated or
unreadable files raise `UnreadableImage` (a `VlmMergeError`) naming the file and the reason.
"""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from vlm_merge.errors import VlmMergeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_SIDE = 2048  # the largest LLaVA-NeXT grid is 1344 px on a side; nothing needs more


class UnreadableImage(VlmMergeError):
    """An image file that cannot be decoded (missing, truncated, not an image, or a decompression bomb)."""


def open_image(source: str | Path | bytes, max_side: int | None = None, name: str | None = None) -> Image.Image:
    """Decode `source` (a path or encoded bytes) into an upright RGB image, at most `max_side` px on a side."""
    label = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    try:
        with warnings.catch_warnings():
            # between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; such photos are read at reduced scale
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                if max_side is not None:
                    im.draft("RGB", (max_side, max_side))
                im.load()
                image = ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"{label}: refused by the decompression-bomb guard ({e})") from None
    except FileNotFoundError:
        raise UnreadableImage(f"{label}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError and truncation are OSErrors
        raise UnreadableImage(f"{label}: not a readable image ({e})") from None
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def list_images(paths: list[str | Path]) -> list[Path]:
    """Files given directly plus the image files (by suffix) inside given directories, in sorted order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise VlmMergeError(f"{p}: no such file or directory")
    if not found:
        raise VlmMergeError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return found


def thumbnail_data_uri(image: Image.Image, size: int = 320) -> str:
    """A JPEG thumbnail (longest side `size`) as a data: URI, so an HTML page needs no other files."""
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
