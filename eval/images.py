"""Opening users' image files safely, and thumbnails for HTML.

Pillow's decompression-bomb guard stays on, and an image whose header declares more than
`Image.MAX_IMAGE_PIXELS` pixels (about 89 MP) at the scale it would be decoded is refused before
decoding. Only regular, non-empty files are opened (a FIFO is refused by `os.stat`). Larger-than-needed
images are decoded at a reduced scale where the format allows it (JPEG `draft`) and downscaled to
`max_side`; truncated or unreadable files raise `UnreadableImage` (a `VlmMergeError`) naming the file
and the reason. `probe_image` checks a file the same way without decoding it (before a model loads).
"""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from vlm_merge.errors import VlmMergeError
from vlm_merge.io.safe_load import check_regular_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_SIDE = 2048  # the largest LLaVA-NeXT grid is 1344 px on a side; nothing needs more


class UnreadableImage(VlmMergeError):
    """An image file that cannot be decoded (missing, truncated, not an image, or a decompression bomb)."""


def _check_file(path: Path, label: str) -> None:
    """A regular, non-empty file (checked by `os.stat`, so a FIFO or device is never opened)."""
    try:
        st = check_regular_file(path, "image")
    except VlmMergeError as e:
        raise UnreadableImage(f"{label}: {str(e).removeprefix(f'{path}: ')}") from None  # the path once
    if st.st_size == 0:
        raise UnreadableImage(f"{label}: empty file (0 bytes), not an image")


def _check_pixels(im: Image.Image, label: str) -> None:
    """Refuse, from the header alone, an image that would decode to more than `Image.MAX_IMAGE_PIXELS` pixels."""
    if im.width * im.height > Image.MAX_IMAGE_PIXELS:
        raise UnreadableImage(
            f"{label}: declares {im.width}x{im.height} pixels, more than the {Image.MAX_IMAGE_PIXELS} allowed "
            "(a decompression bomb?); downscale it first"
        )


def probe_image(source: str | Path | bytes, name: str | None = None) -> tuple[int, int]:
    """Check an image file, or encoded image bytes (a parquet benchmark's embedded images), without decoding
    its pixels: a regular non-empty file / non-empty bytes whose header a decoder recognises, of an acceptable
    size. Returns (width, height); raises `UnreadableImage`."""
    if isinstance(source, bytes):
        label = name or "image bytes"
        if not source:
            raise UnreadableImage(f"{label}: empty (0 bytes), not an image")
    else:
        source = Path(source)
        label = name or str(source)
        _check_file(source, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                _check_pixels(im, label)
                return im.size
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"{label}: refused by the decompression-bomb guard ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"{label}: not a readable image ({e})") from None


def open_image(source: str | Path | bytes, max_side: int | None = None, name: str | None = None) -> Image.Image:
    """Decode `source` (a path or encoded bytes) into an upright RGB image, at most `max_side` px on a side."""
    label = name or (str(source) if not isinstance(source, bytes) else "image bytes")
    if not isinstance(source, bytes):
        _check_file(Path(source), label)
    try:
        with warnings.catch_warnings():
            # between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; JPEGs that large are read at reduced scale
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                if max_side is not None:
                    im.draft("RGB", (max_side, max_side))
                _check_pixels(im, label)
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
