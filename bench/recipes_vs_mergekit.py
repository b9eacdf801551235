"""mergekit's example recipes run by vlm-merge and by mergekit 0.1.5 on the same local models, tensor by tensor.

    .venv/bin/python -m bench.recipes_vs_mergekit [--mergekit-python bench/.venv-mergekit/bin/python]

The examples (tests/data/mergekit_examples, verbatim) are pointed at four tiny Llama fixtures sharing one
vocabulary (a base and three fine-tunes, `vlm_merge.testing`), layer ranges at their 2 layers, plus a
`tokenizer_source: union` recipe over an English and a Japanese fixture (different vocabularies). Each
runs twice: with the example's own dtype (mergekit computes in it, vlm-merge in float32 and rounds once)
and with `dtype: float32` (both compute in float32). mergekit runs as `mergekit-yaml` in its own venv.
Prints, per recipe and dtype, the largest |vlm-merge - mergekit| over every tensor, the tensor where it
is, and the largest |mergekit| for scale; embeddings / lm_head apart, their rows matched by token string
(mergekit numbers a union's new tokens in the order `get_vocab()` lists them, vlm-merge in id order).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch

from vlm_merge.engine.merge import merge
from vlm_merge.io.checkpoint import CheckpointReader
from vlm_merge.testing import (
    build_fixture_zoo,
    write_llama_family,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "tests" / "data" / "mergekit_examples"
DEFAULT_MERGEKIT = ROOT / "bench" / ".venv-mergekit" / "bin" / "mergekit-yaml"
LOCAL = {
    "mistralai/Mistral-7B-v0.1": "base", "TheBloke/Llama-2-13B-fp16": "base",
    "mistralai/Mistral-7B-Instruct-v0.2": "a", "psmathur/orca_mini_v3_13b": "a",
    "BioMistral/BioMistral-7B": "b", "garage-bAInd/Platypus2-13B": "b",
    "WizardLM/WizardLM-13B-V1.2": "c", "WizardLM/WizardMath-13B-V1.0": "c",
}  # fmt: skip
RUNNABLE = ("linear", "ties", "bio-merge", "gradient-slerp")
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def fixtures(root: Path) -> dict[str, Path]:
    out = write_llama_family(root)
    zoo = build_fixture_zoo(root / "zoo")
    out["en"], out["ja"] = zoo.llms["en-llama"], zoo.llms["ja-llama"]
    return out


def recipes(models: dict[str, Path]) -> dict[str, str]:
    out = {}
    for name in RUNNABLE:
        text = (EXAMPLES / f"{name}.yml").read_text()
        for hf_id, local in LOCAL.items():
            text = text.replace(hf_id, str(models[local]))
        out[name] = text.replace("[0, 40]", "[0, 2]")
    out["union"] = (f"merge_method: task_arithmetic\nbase_model: {models['en']}\nmodels:\n  - model: {models['ja']}\n"
                    "    parameters: {weight: 0.5}\ntokenizer_source: union\ndtype: float32\n")
    return out


def compare(ours: Path, theirs: Path) -> tuple[float, str, float, float]:
    """(max |diff| outside vocab tensors, where, max |mergekit|, max |diff| of vocab tensors' rows by token)."""
    from transformers import AutoTokenizer

    a, b = CheckpointReader(ours), CheckpointReader(theirs)
    v_a, v_b = (AutoTokenizer.from_pretrained(str(p)).get_vocab() for p in (ours, theirs))
    worst, where, scale, vocab = 0.0, "", 0.0, 0.0
    for key in sorted(set(a.keys()) & set(b.keys())):
        x, y = a.get(key).float(), b.get(key).float()
        if key in VOCAB_KEYS:  # rows matched by token string (mergekit numbers union tokens in get_vocab() order)
            pairs = [(i, v_b[t]) for t, i in v_a.items() if t in v_b and i < x.shape[0] and v_b[t] < y.shape[0]]
            rows_a, rows_b = (torch.tensor(r) for r in zip(*pairs))
            vocab = max(vocab, (x[rows_a] - y[rows_b]).abs().max().item())
            continue
        d = (x - y).abs().max().item()
        scale = max(scale, y.abs().max().item())
        if d >= worst:
            worst, where = d, key
    missing = set(a.keys()) ^ set(b.keys())
    assert not missing, f"tensor names differ: {sorted(missing)[:5]}"
    return worst, where, scale, vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-yaml", type=Path, default=DEFAULT_MERGEKIT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = fixtures(work / "models")
        rows = []
        for name, text in recipes(models).items():
            for dtype in ("own", "float32"):
                if dtype == "float32":
                    text = "\n".join(line for line in text.splitlines() if not line.startswith("dtype:")) + "\ndtype: float32\n"
                cfg = work / f"{name}-{dtype}.yml"
                cfg.write_text(text)
                ours = merge(cfg, work / f"ours-{name}-{dtype}", progress=False)
                theirs = work / f"mk-{name}-{dtype}"
                run = subprocess.run([str(args.mergekit_yaml), str(cfg), str(theirs), "--copy-tokenizer"],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    rows.append((name, dtype, "mergekit failed: " + run.stderr.strip().splitlines()[-1][:100]))
                    continue
                worst, where, scale, vocab = compare(ours, theirs)
                rows.append((name, dtype, f"max|diff| {worst:.3g} at {where} (max|mergekit| {scale:.3g}); vocab rows {vocab:.3g}"))
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main()
