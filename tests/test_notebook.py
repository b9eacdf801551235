"""notebooks/quickstart.ipynb runs from top to bottom (a copy, in a fresh kernel, in a temporary directory),
prints what it promises, and is stored with its outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbclient  # the test extra: nbclient, nbformat, ipykernel (a missing one fails, never skips)
import nbformat
import pytest

from vlm_merge.world import SHIPPED_ZOO

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
pytestmark = pytest.mark.skipif(not (SHIPPED_ZOO / "zoo.json").exists(), reason="no prebuilt zoo under assets/")


def _text(nb) -> str:
    """Everything the code cells printed or displayed (stdout, stderr, text and HTML)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                parts += [out.data.get("text/plain", ""), out.data.get("text/html", "")]
            elif out.output_type == "error":
                parts.append(f"ERROR {out.ename}: {out.evalue}")
    return "\n".join(parts)


def _check(text: str) -> None:
    for promised in ("vision_tower", "projector", "language_model", "chosen scale:", "content_accuracy",
                     "chat-vector - ja-shell:", "verdict:", "gallery:", 'src="data:image/'):
        assert promised in text, promised


def test_stored_notebook_has_its_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code) and all(c.outputs for c in code)
    text = _text(nb)
    assert "ERROR" not in text and "Traceback" not in text
    _check(text)


def test_notebook_executes_without_errors(tmp_path):
    copy = tmp_path / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})  # one torch thread; work dir here
    text = _text(nb)
    assert "ERROR" not in text and "Traceback" not in text
    _check(text)
    assert len(list(tmp_path.glob("vlm-merge-quickstart-*/captions/gallery.html"))) == 1
