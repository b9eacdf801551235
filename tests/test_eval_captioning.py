"""Captioning your own images: unreadable, truncated and bomb files are skipped (listed, not fatal),
huge ones downscaled, runs resume, and the HTML gallery renders in a real headless browser."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from PIL import Image

from eval.captioning import (
    CAPTIONS_FILE,
    DEFAULT_CAPTION_PROMPT,
    GALLERY_FILE,
    SKIPPED_FILE,
    caption,
)
from eval.images import open_image
from eval.model_loading import load_model
from eval.outputs import read_jsonl
from tests.conftest import error_line
from vlm_merge.cli import main
from vlm_merge.errors import VlmMergeError

CHROMIUM = "/usr/bin/chromium"  # Debian package `chromium`


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    Image.new("RGB", (120, 80), (210, 20, 20)).save(d / "red.jpg", quality=95)
    (d / "more").mkdir()
    Image.new("RGB", (60, 90), (20, 20, 210)).save(d / "more" / "blue.png")
    Image.new("RGB", (3200, 1800), (20, 160, 20)).save(d / "more" / "huge.jpg", quality=40)
    whole = (d / "red.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (d / "notes.png").write_bytes(b"these are notes, not a picture")
    # a PNG header declaring 20000 x 20000 pixels: refused by the guard before anything is decoded
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                                 + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    (d / "readme.txt").write_text("not listed: no image suffix")
    return d


def test_caption_skips_bad_files_and_downscales(zoo, photos, tmp_path, monkeypatch):
    model, processor = load_model(zoo.vlms["llava-hf-llama"], device="cpu")
    result = caption([photos], model, processor, out_dir=tmp_path / "cap", progress=False, batch_size=2)
    names = [Path(c["image"]).name for c in result.captions]
    assert names == ["blue.png", "huge.jpg", "red.jpg"]  # sorted, recursive; readme.txt ignored
    reasons = {Path(s["image"]).name: s["reason"] for s in result.skipped}
    assert set(reasons) == {"bomb.png", "notes.png", "truncated.jpg"}
    assert "decompression-bomb guard" in reasons["bomb.png"] and "not a readable image" in reasons["notes.png"]
    huge = next(c for c in result.captions if c["image"].endswith("huge.jpg"))
    assert (huge["width"], huge["height"]) == (2048, 1152)
    assert all(c["caption"] == c["caption"].strip() and c["tokens"] > 0 for c in result.captions)
    assert read_jsonl(tmp_path / "cap" / CAPTIONS_FILE) == result.captions
    assert json.loads((tmp_path / "cap" / SKIPPED_FILE).read_text()) == result.skipped
    run = json.loads((tmp_path / "cap" / "run.json").read_text())
    assert run["prompt"] == DEFAULT_CAPTION_PROMPT and "日本語" in DEFAULT_CAPTION_PROMPT

    # rerun: everything already captioned is kept, nothing generated again
    def no_generation(**kwargs):
        raise AssertionError("an image captioned before was captioned again")

    monkeypatch.setattr(model, "generate", no_generation)
    again = caption([photos], model, processor, out_dir=tmp_path / "cap", progress=False)
    assert again.captions == result.captions and len(again.skipped) == 3
    with pytest.raises(VlmMergeError, match="different prompt"):
        caption([photos], str(zoo.vlms["llava-hf-llama"]), out_dir=tmp_path / "cap", prompt="何色？", progress=False)


def test_open_image_reports_and_downscales(photos):
    with pytest.raises(VlmMergeError, match="bomb.png: refused by the decompression-bomb guard"):
        open_image(photos / "bomb.png")
    with pytest.raises(VlmMergeError, match="truncated.jpg: not a readable image"):
        open_image(photos / "truncated.jpg")
    with pytest.raises(VlmMergeError, match="missing.jpg: no such file"):
        open_image(photos / "missing.jpg")
    assert open_image(photos / "more" / "huge.jpg", max_side=500).size == (500, 281)
    assert Image.MAX_IMAGE_PIXELS is not None  # the guard stays on


def test_caption_cli_and_gallery_in_a_headless_browser(zoo, photos, tmp_path, capsys):
    out = tmp_path / "gallery"
    assert main(["caption", "--model", str(zoo.vlms["llava-next-hf-mistral"]), str(photos / "red.jpg"),
                 str(photos / "more"), str(photos / "notes.png"), "--out", str(out), "--max-new-tokens", "8",
                 "--quiet", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "3 images captioned, 1 skipped" in printed and "notes.png" in printed
    page = (out / GALLERY_FILE).read_text(encoding="utf-8")
    assert page.count('<figure class="item">') == 3 and "notes.png" in page
    assert "src=\"data:image/jpeg;base64," in page and "http" not in page.split("<main>")[1]  # self-contained
    for c in read_jsonl(out / CAPTIONS_FILE):
        assert __import__("html").escape(c["caption"]) in page

    # only unreadable files: one line, before the model loads, and no run directory left behind
    assert main(["caption", "--model", str(zoo.vlms["llava-next-hf-mistral"]), str(photos / "notes.png"),
                 str(photos / "truncated.jpg"), "--out", str(tmp_path / "none"), "--quiet", "--device", "cpu"]) == 2
    assert "none of the 2 images can be read (first: " in error_line(capsys)
    assert not (tmp_path / "none").exists()

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian: apt-get install chromium); the gallery was not rendered")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", (out / GALLERY_FILE).as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-thumbnails="3"' in dom and 'data-thumbnails-decoded="3"' in dom  # every thumbnail decoded
    shot = tmp_path / "gallery.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1000,900", f"--screenshot={shot}", (out / GALLERY_FILE).as_uri()],
                   capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 900)
    colours = image.getcolors(1 << 20)
    assert colours is not None and len(colours) > 20  # not a blank page
    red = sum(n for n, (r, g, b) in colours if r > 180 and g < 60 and b < 60)
    blue = sum(n for n, (r, g, b) in colours if b > 180 and r < 60 and g < 60)
    assert red > 2000 and blue > 2000  # the red and blue thumbnails are on screen
    shutil.rmtree(tmp_path / "chromium", ignore_errors=True)
