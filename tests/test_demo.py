"""`vlm-merge demo --quick` on the shipped miniature zoo: the report's files, its numbers re-derived from the
predictions it wrote, valid PNG plots, a gallery and report pages whose images exist, one-line errors."""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import error_line
from vlm_merge.cli import main
from vlm_merge.world import SHIPPED_ZOO, datasets, evaluate
from vlm_merge.world.demo import QUICK
from vlm_merge.world.report import CONTROLS, MERGES, SANITY, headline, verdict

pytestmark = pytest.mark.skipif(not (SHIPPED_ZOO / "zoo.json").exists(), reason="no prebuilt zoo under assets/")
MODELS = (SANITY, *CONTROLS, *MERGES)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "report"
    assert main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def rec(report) -> dict:
    return json.loads((report / "report.json").read_text(encoding="utf-8"))


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "a":
            self.links.append(dict(attrs).get("href", ""))


def _parse(path: Path) -> _Images:
    p = _Images()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_report_files_exist(report, rec, capsys):
    for name in ("report.md", "report.html", "report.json", "gallery/gallery.html", "gallery/captions.jsonl",
                 "search/best_recipe.yaml", "search/model/config.json", "models/chat-vector/config.json",
                 "models/ja-shell/config.json", *rec["plots"].values()):
        assert (report / name).is_file(), name
    assert set(rec["models"]) == set(MODELS)
    for m in rec["models"].values():
        assert (report / m["predictions"]).is_file()
    assert not list(report.parent.glob(".report.tmp-*")), "the temporary directory was left behind"
    assert rec["quick"] and rec["settings"] == {**rec["settings"], "test_questions": QUICK.test_questions}
    md = (report / "report.md").read_text(encoding="utf-8")
    assert rec["headline"] in md and f"first {QUICK.test_questions} questions" in md and "greedy" in md.lower()


def test_numbers_are_the_predictions_rescored(report, rec):
    """Every number in report.json follows from predictions/<model>.jsonl and the zoo's test rows."""
    zoo_rows = {s: datasets.read_rows(SHIPPED_ZOO / "data" / f"{s}.jsonl")[: QUICK.test_questions] for s in ("ja-test", "en-test")}
    content = {}
    for name, m in rec["models"].items():
        preds = [json.loads(x) for x in (report / m["predictions"]).read_text(encoding="utf-8").splitlines()]
        rows = zoo_rows[m["test_set"]]
        assert [p["question_id"] for p in preds] == [r["question_id"] for r in rows]
        sc = evaluate.score(rows, [p["prediction"] for p in preds], rouge=m["rouge_l"] is not None)
        assert m["n"] == len(rows) == QUICK.test_questions
        assert m["content_accuracy"] == pytest.approx(sc.content.mean(), abs=1e-12)
        assert m["exact_match"] == pytest.approx(sc.exact.mean(), abs=1e-12)
        assert m["content_ci"] == pytest.approx(list(evaluate.bootstrap_ci(sc.content)), abs=1e-12)
        assert m["exact_ci"] == pytest.approx(list(evaluate.bootstrap_ci(sc.exact)), abs=1e-12)
        assert [p["content"] for p in preds] == sc.content.tolist()
        if m["rouge_l"] is not None:
            assert m["rouge_l"] == pytest.approx(sc.rouge_l.mean(), abs=1e-9)
        content[name] = sc.content
    for model, per_control in rec["comparisons"].items():
        for control, d in per_control.items():
            assert d == pytest.approx(evaluate.paired_bootstrap(content[model], content[control]), abs=1e-12)
            assert verdict(model, control, d) in rec["claims"]
    assert rec["headline"] == headline(rec["comparisons"], rec["models"])
    ja = [n for n in MODELS if n != SANITY]
    assert rec["best_model"] in ja and rec["models"][rec["best_model"]]["content_accuracy"] == max(
        rec["models"][n]["content_accuracy"] for n in ja)
    assert np.isfinite(rec["search"]["best_fitness"]) and rec["search"]["evaluations"] == QUICK.popsize * QUICK.generations


def test_the_report_says_which_genes_the_search_held_and_why(report, rec):
    """The shipped zoo's VLM delta is in layers 0-1 only, so the layer 2-3 genes are held, each with its reason."""
    held, md = rec["search"]["held_genes"], (report / "report.md").read_text(encoding="utf-8")
    assert held and set(held).isdisjoint(rec["search"]["gene_names"])
    assert all(why.startswith("sets only tensors where every model equals the base (") for why in held.values())
    assert f"{', '.join(held)} held at x0 (sets only tensors where every model equals the base)" in md


def test_plots_are_valid_pngs(report, rec):
    for rel in rec["plots"].values():
        data = (report / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", rel
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 200
            assert np.unique(np.asarray(im.convert("L"))).size > 10, f"{rel} looks blank"


def test_gallery_and_pages_reference_existing_images(report, rec):
    gallery = _parse(report / "gallery" / "gallery.html")
    assert len(gallery.imgs) == rec["gallery"]["images"] == QUICK.gallery_images
    captions = [json.loads(x) for x in (report / "gallery" / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    # the prompt is the count question the test set asks most often (the zoo's own wording)
    counts = Counter(r["question"] for r in datasets.read_rows(SHIPPED_ZOO / "data" / "ja-test.jsonl")[: QUICK.test_questions]
                     if r["qtype"].startswith("count_"))
    assert counts[rec["gallery"]["prompt"]] == max(counts.values())
    assert f"prompt: {rec['gallery']['prompt']}" in (report / "gallery" / "gallery.html").read_text(encoding="utf-8")
    for img, cap in zip(gallery.imgs, captions):
        assert Path(img["alt"]).is_file() and img["alt"] == cap["image"]  # the captioned test image
        head, _, b64 = img["src"].partition(",")
        assert head.startswith("data:image/")
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            im.verify()
    page = _parse(report / "report.html")
    srcs = [i["src"] for i in page.imgs]
    assert set(rec["plots"].values()) <= set(srcs) and len(srcs) == len(rec["plots"]) + len(rec["samples"])
    for src in srcs:
        assert (report / src).is_file(), src
    assert "gallery/gallery.html" in page.links
    md = (report / "report.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)]+)\)", md):
        assert (report / target).is_file(), target


def test_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--zoo", str(tmp_path / "nowhere"), "--quick"]) == 2
    assert "no zoo.json" in error_line(capsys) and not out.exists()
    out.mkdir()
    assert main(["demo", "--out", str(out), "--quick"]) == 2
    assert "--force" in error_line(capsys)


def test_headline_states_the_margin_over_the_closer_control_with_its_ci():
    """The one-sentence verdict: a merge that beats both controls is reported with its difference and CI
    against the control it beats by the least (not as a bound it does not have); otherwise, no help."""
    d = lambda diff, lo, hi: {"diff": diff, "low": lo, "high": hi}  # noqa: E731
    summaries = {c: {"n": 1000, "content_accuracy": a} for c, a in zip(CONTROLS, (0.40, 0.49))}
    vs = {"chat-vector": {CONTROLS[0]: d(0.134, 0.104, 0.163), CONTROLS[1]: d(0.040, 0.023, 0.057)},
          "evolved": {CONTROLS[0]: d(0.02, -0.01, 0.05), CONTROLS[1]: d(0.03, 0.01, 0.05)}}
    text = headline(vs, summaries)
    assert text.startswith("Merging helps on these 1000 Japanese test questions: chat-vector beats both controls")
    assert f"chat-vector by +4.0 points over {CONTROLS[1]} (95% CI [+2.3, +5.7])" in text and "evolved" not in text
    vs["chat-vector"][CONTROLS[1]] = d(0.01, -0.005, 0.025)
    assert headline(vs, summaries).startswith("Merging does not help on these 1000 Japanese test questions")
