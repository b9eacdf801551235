"""`caption(images, model, …)`: what a model says about your own images, in Japanese by default.

Images are files or directories (searched recursively for image suffixes) or PIL images. Every file
is checked before the model loads (`probe_image`: a regular non-empty file, an image header, an
acceptable size), then opened with the decompression-bomb guard on and downscaled to `max_side`;
files that cannot be read are listed as skipped with the reason. Only when no image can be read is it
an error: one line, before the model loads where the check finds it, and no run directory. With
`out_dir` the run checkpoints to `captions.jsonl` (rerunning resumes) and ends by writing
`gallery.html`: one self-contained page (thumbnails embedded as data URIs) with each thumbnail beside
its caption, for inspection by eye.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from eval.decoding import GenerationSettings
from eval.generation import generate
from eval.images import (
    MAX_SIDE,
    UnreadableImage,
    list_images,
    open_image,
    probe_image,
    thumbnail_data_uri,
)
from eval.model_loading import describe_model, load_model
from eval.outputs import Checkpoint, check_resumable, dumps, has_items, write_atomic
from eval.prompts import get_template, template_text
from vlm_merge.errors import VlmMergeError
from vlm_merge.io.outputs import RunDir

DEFAULT_CAPTION_PROMPT = "この画像を日本語で詳しく説明してください。"
DEFAULT_CAPTION_SETTINGS = GenerationSettings(max_new_tokens=256)
CAPTIONS_FILE = "captions.jsonl"
SKIPPED_FILE = "skipped.json"
GALLERY_FILE = "gallery.html"
CHUNK = 64  # images decoded at a time


@dataclass
class CaptionResult:
    captions: list[dict]  # {"image", "caption", "width", "height", "tokens"} in input order
    skipped: list[dict] = field(default_factory=list)  # {"image", "reason"}
    out_dir: Path | None = None


def _sources(images: Sequence[str | Path | Image.Image]) -> list[tuple[str, Path | Image.Image]]:
    """(name, source) pairs: directories expanded, PIL images named image-<i>."""
    out: list[tuple[str, Path | Image.Image]] = []
    paths: list[str | Path] = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            out.append((f"image-{i}", im))
        else:
            paths.append(im)
    out += [(str(p), p) for p in (list_images(paths) if paths else [])]
    if not out:
        raise VlmMergeError("no images to caption")
    return out


def _probe(sources: list[tuple[str, Path | Image.Image]]) -> dict[str, str]:
    """Image files that cannot be read, by name -> why (`probe_image`: header and size, nothing decoded)."""
    unreadable = {}
    for name, source in sources:
        if isinstance(source, Path):
            try:
                probe_image(source)
            except UnreadableImage as e:
                unreadable[name] = str(e)
    return unreadable


def _open(source: Path | Image.Image, max_side: int) -> Image.Image:
    if isinstance(source, Image.Image):
        image = source.convert("RGB")
        if max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return image
    return open_image(source, max_side=max_side)


def caption(
    images: Sequence[str | Path | Image.Image],
    model,
    processor=None,
    *,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    template: str = "chat",
    settings: GenerationSettings = DEFAULT_CAPTION_SETTINGS,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    force: bool = False,
    max_side: int = MAX_SIDE,
    model_name: str | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> CaptionResult:
    """Caption every image with `prompt` (Japanese by default); skip unreadable ones; optional gallery.

    Every cheap check (`out_dir`, the image files, a resume's settings) runs before the model loads."""
    paths = [x for x in (model, *images) if isinstance(x, (str, Path))]
    run = RunDir(out_dir, force, paths) if out_dir else None  # checked now, created after the other checks
    if not isinstance(model, (str, Path)) and processor is None:
        raise VlmMergeError("caption(images, model, …) with a model object needs processor=")
    sources = _sources(images)
    unreadable = _probe(sources)  # before the model loads: no image that can be read is one error now
    if len(unreadable) == len(sources):
        first = next(iter(unreadable.values()))
        raise VlmMergeError(first if len(sources) == 1 else f"none of the {len(sources)} images can be read (first: {first})")
    tmpl = get_template(template)
    if run is not None and not force:  # a resume with other settings fails now, not after loading the model
        named = {"name_or_path": str(model)} if isinstance(model, (str, Path)) else {}
        check_resumable(run.target, CAPTIONS_FILE, {"prompt": prompt, "template": {"name": tmpl.name},
                                                    "generation": settings.as_dict(), "max_side": max_side, "model": named})
    if isinstance(model, (str, Path)):
        model, processor = load_model(model, device=device, dtype=dtype, cache_dir=cache_dir, progress=progress)
    info = {
        "model": describe_model(model, model_name),
        "prompt": prompt,
        "template": {"name": tmpl.name, "text": template_text(processor, tmpl)},
        "generation": settings.as_dict(),
        "max_side": max_side,
    }
    config = {k: v for k, v in info.items() if k != "model"}
    config["model"] = {k: info["model"][k] for k in ("name_or_path", "class", "dtype", "config_sha256")}
    with run.open(has_items(CAPTIONS_FILE)) if run else nullcontext() as run_path:
        checkpoint = Checkpoint(run_path, CAPTIONS_FILE, "image", config) if run else None
        done: dict[str, dict] = dict(checkpoint.done) if checkpoint else {}
        skipped = [{"image": name, "reason": reason} for name, reason in unreadable.items() if name not in done]
        todo = [(name, src) for name, src in sources if name not in done and name not in unreadable]
        for start in range(0, len(todo), CHUNK):
            batch_names, batch_images = [], []
            for name, src in todo[start : start + CHUNK]:
                try:
                    batch_images.append(_open(src, max_side))
                    batch_names.append(name)
                except UnreadableImage as e:
                    skipped.append({"image": name, "reason": str(e)})

            def record(indices: list[int], gens, names=batch_names, ims=batch_images) -> None:
                rows = [{"image": names[i], "caption": g.text, "width": ims[i].width, "height": ims[i].height,
                         "tokens": len(g.token_ids)} for i, g in zip(indices, gens)]
                if checkpoint is not None:
                    checkpoint.append(rows)
                done.update((r["image"], r) for r in rows)

            if batch_images:
                generate(model, processor, batch_images, [prompt] * len(batch_images), template=tmpl, settings=settings,
                         batch_size=batch_size, progress=progress, on_batch=record)
        captions = [done[name] for name, _ in sources if name in done]
        if not captions:  # raised inside the run: a new run dir with nothing in it goes again
            raise VlmMergeError(f"none of the {len(sources)} images could be decoded (first: {skipped[0]['reason']})")
        if checkpoint is not None:
            checkpoint.finish(captions)
            write_atomic(checkpoint.dir / SKIPPED_FILE, dumps(skipped))
            sources_by_name = dict(sources)
            write_atomic(checkpoint.dir / GALLERY_FILE, gallery_html(captions, skipped, info, sources_by_name, max_side))
    return CaptionResult(captions=captions, skipped=skipped, out_dir=run.target if run else None)


GALLERY_CSS = """
body{font-family:system-ui,"Hiragino Sans","Noto Sans CJK JP",sans-serif;margin:24px;background:#fafafa;color:#222}
header p{margin:2px 0;color:#555;font-size:14px}
.item{display:flex;gap:16px;align-items:flex-start;background:#fff;border:1px solid #ddd;border-radius:8px;
padding:12px;margin:12px 0}
.item img{flex:none;max-width:320px;max-height:320px;border-radius:4px;background:#eee}
.name{font-family:monospace;font-size:12px;color:#666;word-break:break-all}
.caption{font-size:16px;line-height:1.6;white-space:pre-wrap;margin:6px 0 0}
.skipped li{font-family:monospace;font-size:12px;color:#a00}
"""
GALLERY_SCRIPT = """
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll(".item img")];
  document.body.dataset.thumbnails = imgs.length;
  document.body.dataset.thumbnailsDecoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def gallery_html(
    captions: list[dict], skipped: list[dict], info: dict, sources: dict[str, Path | Image.Image], max_side: int
) -> str:
    """A self-contained HTML page: each image's thumbnail beside its caption, then the skipped files."""
    esc = html.escape
    items = []
    for c in captions:
        try:
            uri = thumbnail_data_uri(_open(sources[c["image"]], max_side)) if c["image"] in sources else ""
        except UnreadableImage:
            uri = ""  # changed on disk since it was captioned
        items.append(
            f'<figure class="item"><img src="{uri}" alt="{esc(c["image"])}">'
            f'<figcaption><div class="name">{esc(c["image"])} · {c["width"]}×{c["height"]}</div>'
            f'<p class="caption">{esc(c["caption"]) or "<em>(empty)</em>"}</p></figcaption></figure>'
        )
    skipped_html = "".join(f"<li>{esc(s['reason'])}</li>" for s in skipped)  # the reason names the file
    g = info["generation"]
    return (
        '<!doctype html>\n<html lang="ja"><head><meta charset="utf-8">'
        f"<title>Captions · {esc(info['model']['name'])}</title><style>{GALLERY_CSS}</style></head>\n<body>\n"
        f"<header><h1>Captions · {esc(info['model']['name'])}</h1>"
        f"<p>model: {esc(info['model']['name_or_path'])} ({esc(info['model']['class'])}, {esc(info['model']['dtype'])})</p>"
        f"<p>prompt: {esc(info['prompt'])} · template: {esc(info['template']['name'])} · max_new_tokens "
        f"{g['max_new_tokens']}, beams {g['num_beams']}, repetition_penalty {g['repetition_penalty']}</p>"
        f"<p>{len(captions)} captioned, {len(skipped)} skipped</p></header>\n"
        f'<main>{"".join(items)}</main>\n'
        + (f'<section class="skipped"><h2>Skipped</h2><ul>{skipped_html}</ul></section>\n' if skipped else "")
        + f"<script>{GALLERY_SCRIPT}</script>\n</body></html>\n"
    )

