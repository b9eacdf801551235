"""Correctness of a contender's output against a float32 reference.

For a few sampled language-model tensors (layer 0 q_proj, last layer
down_proj, embed_tokens, lm_head, final norm) the reference is
``dtype(f32(ja) + scale * (f32(vlm_llm) - f32(en)))`` computed from the inputs
(dtype: the preset's, bf16 or fp16). Where the VLM has more vocabulary rows
than the bases (llava-hf: <image>, <pad>, padding to 64), the reference covers
the bases' rows; the VLM's added-token rows must be carried over bit for bit,
and an output with fewer rows than the VLM is *incomplete* (the merged LLM
would have lost the image token). The error of an element is ``|got - want|``
in ulps (of the dtype) of ``max(|want|, rms)``
(rms of the reference tensor): ulps of the value itself, except that values
smaller than the tensor's typical magnitude are measured in ulps at that
magnitude, so that cancellation near zero (bf16 intermediate arithmetic, as in
mergekit) is not reported as thousands of ulps. Also reported: the fraction of
elements that are not bit-identical.

Verdicts: ``exact`` (bit-identical), ``ok`` (<= 1 ulp: a different float32
evaluation order), ``approx`` (<= 4 ulps: intermediate rounding), ``incomplete``
(values within 1 ulp but rows or keys missing), else ``WRONG``. Every expected LM key must be present whatever the key
layout (LlamaForCausalLM, llava-hf 4.x or 5.x); for VLM outputs every vision
tower / projector key must be present and the sampled ones bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import ClipShape, LlamaShape, canonical_key, load_tensor, weight_map
from bench.presets import Preset

VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
OK_ULPS = 1.0  # one rounding step apart: a different (still float32) evaluation order
APPROX_ULPS = 4.0  # bf16 intermediate rounding


@dataclass(frozen=True)
class Reference:
    """Where the inputs are and what the merge should have computed.

    ``vlm`` supplies the VLM's language-model tensors: the VLM itself or its standalone LLM
    (``vlm_llm``) when the VLM is not on disk (vision checks then need the VLM)."""

    en_base: Path
    ja_base: Path
    vlm: Path
    preset: Preset
    scale: float = 1.0

    @property
    def llama(self) -> LlamaShape:
        return self.preset.llama

    @property
    def clip(self) -> ClipShape:
        return self.preset.clip

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.preset.dtype)

    def added_rows(self) -> list[int]:
        """The VLM's added-token rows (image, pad) beyond the bases' vocabulary."""
        p = self.preset
        ids = [p.image_token_index, p.pad_token_index]
        return [i for i in ids if i is not None and p.llama.vocab <= i < p.vlm_vocab_rows]

    def sample_keys(self) -> list[str]:
        last = self.llama.layers - 1
        return [
            "model.layers.0.self_attn.q_proj.weight",
            f"model.layers.{last}.mlp.down_proj.weight",
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
        ]

    def vision_sample_keys(self) -> list[str]:
        return [
            "multi_modal_projector.linear_1.weight",
            "multi_modal_projector.linear_2.bias",
            f"vision_tower.vision_model.encoder.layers.{self.clip.layers - 1}.mlp.fc1.weight",
        ]

    def vlm_tensor(self, llama_key: str) -> torch.Tensor:
        vlm_map = {canonical_key(k)[1]: (p, k) for k, p in weight_map(self.vlm).items()}
        return load_tensor(*vlm_map[llama_key])

    def expected(self, llama_key: str) -> torch.Tensor:
        """The merged tensor over the bases' rows."""
        en = load_tensor(weight_map(self.en_base)[llama_key], llama_key).float()
        ja = load_tensor(weight_map(self.ja_base)[llama_key], llama_key).float()
        vl = self.vlm_tensor(llama_key)[: en.shape[0]].float()
        return ja.add_(vl.sub_(en), alpha=self.scale).to(self.dtype)


@dataclass
class TensorError:
    """How far one sampled tensor is from the reference."""

    max_ulps: float
    mismatch_frac: float
    max_abs: float


@dataclass
class Correctness:
    """Outcome of checking one output directory."""

    status: str  # "exact" | "ok" | "approx" | "incomplete" | "WRONG" | "n/a"
    max_ulps: float | None = None
    mismatch_frac: float | None = None
    per_tensor: dict[str, TensorError] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # wrong values, or (incomplete) missing rows/keys

    @property
    def passed(self) -> bool:
        return self.status in ("exact", "ok")

    def summary(self) -> str:
        if self.status == "n/a":
            return "n/a"
        parts = [self.status]
        if self.max_ulps is not None and self.status != "exact":
            parts.append(f"max {self.max_ulps:.2g} ulp, {100 * (1 - self.mismatch_frac):.1f}% bit-exact")
        parts += self.problems[:2]
        return ", ".join(parts)


def ulp(mag: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at magnitude ``mag`` (bf16: 8 significant bits, fp16: 11)."""
    _, exp = torch.frexp(mag)  # mag = m * 2**exp, m in [0.5, 1)
    return torch.ldexp(torch.full_like(mag, torch.finfo(dtype).eps), exp - 1)


def tensor_error(got: torch.Tensor, want: torch.Tensor) -> TensorError:
    g, w = got.float(), want.float()
    rms = max(float(w.pow(2).mean().sqrt()), 1e-30)
    diff = (g - w).abs()
    ulps = diff / ulp(w.abs().clamp_min(rms), want.dtype)
    return TensorError(float(ulps.max()), float((g != w).float().mean()), float(diff.max()))


def _verdict(errors: list[TensorError], problems: list[str], gaps: list[str]) -> str:
    if problems or not errors:
        return "WRONG"
    worst = max(e.max_ulps for e in errors)
    if gaps:
        return "incomplete" if worst <= OK_ULPS else "WRONG"
    if worst == 0:
        return "exact"
    if worst <= OK_ULPS:
        return "ok"
    return "approx" if worst <= APPROX_ULPS else "WRONG"


def check_output(out_dir: Path, ref: Reference, with_vision: bool) -> Correctness:
    """Compare ``out_dir`` with the reference; never raises on bad output."""
    try:
        out_map = weight_map(out_dir)
    except (OSError, ValueError, KeyError) as exc:
        return Correctness("WRONG", problems=[f"unreadable output: {exc}"])
    if not out_map:
        return Correctness("WRONG", problems=["no safetensors in output"])
    by_canon = {canonical_key(k)[1]: (p, k) for k, p in out_map.items()}
    problems: list[str] = []
    gaps: list[str] = []
    missing_lm = [k for k in ref.llama.tensor_shapes() if k not in by_canon]
    if missing_lm:
        gaps.append(f"{len(missing_lm)} LM tensors missing (e.g. {missing_lm[0]})")
    errors: dict[str, TensorError] = {}
    for key in ref.sample_keys():
        if key not in by_canon:
            continue
        got = load_tensor(*by_canon[key])
        want = ref.expected(key)
        if got.dtype != ref.dtype or got.shape[1:] != want.shape[1:] or got.shape[0] < want.shape[0]:
            problems.append(f"{key}: {got.dtype} {tuple(got.shape)} != {ref.dtype} {tuple(want.shape)}")
            continue
        errors[key] = tensor_error(got[: want.shape[0]], want)
        if key in VOCAB_KEYS and ref.preset.vlm_vocab_rows > want.shape[0]:
            problems_, gaps_ = _check_added_rows(key, got, ref)
            problems += problems_
            gaps += gaps_
    if with_vision:
        problems += _check_vision(by_canon, ref)
    values = list(errors.values())
    return Correctness(
        _verdict(values, problems, gaps),
        max((e.max_ulps for e in values), default=None),
        max((e.mismatch_frac for e in values), default=None),
        errors,
        problems + gaps,
    )


def _check_added_rows(key: str, got: torch.Tensor, ref: Reference) -> tuple[list[str], list[str]]:
    """(problems, gaps) of the rows past the bases' vocabulary: the VLM's added-token rows must be
    there, equal to the VLM's."""
    rows = ref.preset.vlm_vocab_rows
    if got.shape[0] < rows:
        return [], [f"{key}: {got.shape[0]} rows, the VLM has {rows} (its <image>/<pad> rows are lost)"]
    vlm = ref.vlm_tensor(key)
    bad = [i for i in ref.added_rows() if not torch.equal(got[i], vlm[i])]
    return [f"{key}: added-token rows {bad} differ from the VLM's"] if bad else [], []


def _check_vision(by_canon: dict[str, tuple[Path, str]], ref: Reference) -> list[str]:
    expected = ref.clip.tensor_shapes(ref.llama.hidden)
    missing = [k for k in expected if k not in by_canon]
    if missing:
        return [f"{len(missing)} vision/projector tensors missing (e.g. {missing[0]})"]
    vlm_map = {canonical_key(k)[1]: (p, k) for k, p in weight_map(ref.vlm).items()}
    return [
        f"{key} differs from the input VLM"
        for key in ref.vision_sample_keys()
        if not torch.equal(load_tensor(*by_canon[key]), load_tensor(*vlm_map[key]))
    ]
