"""Vocabulary alignment by token string, for embeddings and lm_head across tokenizers.

The output model uses the *target* tokenizer (the Japanese base's), plus the VLM's image token and
pad token when the target lacks them. Every other source's rows are matched to the output rows by
token string; a row with no counterpart in a source gets no contribution from it (its task vector is
zero there: both of its sides are given the target's row), so it keeps the target's value.

Row-count conventions follow llava-hf: when the VLM's embedding has more rows than its tokenizer has
tokens (32064 for 32002 tokens), the output is padded the same way, to a multiple of the largest power
of two (<= 64) that divides the VLM's row count. Rows that belong to no token (padding, tokens new to
the output) are filled with the mean of the target's rows, as transformers' LLaVA conversion does.

`tokenizer_source: union` (mergekit's): the output's vocabulary is the target's plus every other source's
tokens it lacks, appended in source order (as mergekit's union tokenizer adds them to the base's); an
appended token's row is the row of the first source that has it, in every source's aligned rows, so every
task vector is zero there and the merge keeps that row. (mergekit fills a source's missing row the same
way when one source has the token, and with the mean of the sources that have it otherwise.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm_merge.errors import VlmMergeError

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_PAD_TOKEN = "<pad>"
VLM_ROWS = "vlm"  # the role of added image / pad token rows: the VLM's language model
ZERO = "\0zero"  # the "role" of an all-zero row (mergekit's `kind: zero`)


@dataclass(frozen=True)
class TokenSource:
    """Where one token's row comes from when the recipe says so (mergekit's `tokenizer.tokens`): row `row` of
    source `role` (role ZERO: zeros); `force`: even where every source has the token."""

    role: str
    row: int | None = None
    force: bool = False


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer in `path`, or None when the checkpoint ships none."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((path / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # original-LLaVA configs make transformers warn about their model_type
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VlmMergeError(f"{path}: cannot load its tokenizer ({first[:160]})") from None
    finally:
        hf_logging.set_verbosity(level)


@dataclass(frozen=True)
class RowMap:
    """Output rows `out` take rows `src` of one source tensor."""

    out: torch.Tensor
    src: torch.Tensor

    @property
    def is_prefix_identity(self) -> bool:
        n = len(self.out)
        return bool(n == 0 or (torch.equal(self.out, self.src) and int(self.out[-1]) == n - 1))


@dataclass(frozen=True)
class AddedToken:
    """A token the target's tokenizer lacks: output row `out_row` takes row `row` of source `role`."""

    token: str
    out_row: int
    row: int | None  # the source row to copy, or None (filled with the target's mean row)
    role: str = VLM_ROWS  # "vlm" (image / pad tokens) or the union source the token comes from


@dataclass(frozen=True)
class VocabPlan:
    """How the vocabulary dimension of the output relates to each source's rows."""

    out_rows: int
    target_rows: int  # rows [0, target_rows) come from the target (Japanese base)
    pairs: dict[str, RowMap]  # role -> output rows that role contributes to (for task vectors)
    added: tuple[AddedToken, ...] = ()
    image_token: str | None = None
    image_token_id: int | None = None
    pad_token: str | None = None
    pad_token_id: int | None = None
    tokens_added_to_tokenizer: tuple[str, ...] = ()  # special tokens (image, pad), after the union tokens
    union_tokens: tuple[str, ...] = ()  # the other sources' tokens (tokenizer_source: union), in row order
    notes: tuple[str, ...] = ()

    @property
    def is_identity(self) -> bool:
        return (
            not self.added
            and self.out_rows == self.target_rows
            and all(m.is_prefix_identity and len(m.out) == self.out_rows for m in self.pairs.values())
        )

    def summary(self) -> str:
        parts = [f"{self.out_rows} output rows ({self.target_rows} from the target)"]
        for role, m in self.pairs.items():
            parts.append(f"{role}: {len(m.out)} rows matched")
        if self.added:
            parts.append("added: " + ", ".join(f"{a.token}->{a.out_row}" for a in self.added))
        return "; ".join(parts)


def match_rows(target_vocab: dict[str, int], target_rows: int, side: VocabSide) -> dict[int, int]:
    """Target row -> row of `side` holding the same token string (rows that exist in both tensors)."""
    vocab = side.vocab or {}
    return {
        tid: vocab[token]
        for token, tid in target_vocab.items()
        if tid < target_rows and token in vocab and vocab[token] < side.rows
    }


def pad_multiple(rows: int, tokens: int) -> int:
    """The row multiple a VLM was padded to: the largest power of two <= 64 dividing `rows` (1 if unpadded)."""
    if rows <= tokens:
        return 1
    m = 64
    while m > 1 and rows % m:
        m //= 2
    return m


@dataclass(frozen=True)
class VocabSide:
    """What the planner needs to know of one source's vocabulary dimension."""

    rows: int  # rows of its embedding tensor
    vocab: dict[str, int] | None  # token string -> id (None: no tokenizer)
    size: int | None = None  # tokenizer length (number of tokens)
    pad_token: str | None = None

    @classmethod
    def of(cls, rows: int, tokenizer) -> VocabSide:
        if tokenizer is None:
            return cls(rows, None)
        return cls(rows, dict(tokenizer.get_vocab()), len(tokenizer), getattr(tokenizer, "pad_token", None))


def plan_vocab(
    *,
    target: VocabSide,
    vlm: VocabSide | None,
    image_token_id: int | None,
    delta_roles: dict[str, VocabSide],
    multiple: int = 1,
    union: dict[str, VocabSide] | None = None,
    token_sources: dict[str, TokenSource] | None = None,
) -> VocabPlan:
    """Plan the output vocabulary.

    `target` is the model the output starts from (the Japanese base). `vlm` supplies the image token
    (and pad token) rows when the target lacks them (None: a plain LLM merge, no tokens are added);
    `image_token_id` is the VLM's image token id
    (None for original LLaVA, which has no image token: `<image>` is then added). `delta_roles` maps
    each role whose rows enter a task vector (e.g. "vlm", "en_base") to its side. Rows are matched by
    token string; a row enters the task vectors only where every delta role has it. With no tokenizers
    rows are matched by position, which is only allowed when every row count is equal. The output row
    count is padded up to `multiple` (see `pad_multiple`). `union` (tokenizer_source: union) maps the
    sources whose tokens the output adds to the target's, in order, to their sides. `token_sources` (mergekit's
    `tokenizer.tokens`) sets the row of a token the target lacks (instead of the first source's that has it), of a
    token some source lacks, and with `force` of any token: its output row is that row, no task vector there.
    """
    sides = [target, *([vlm] if vlm is not None else []), *delta_roles.values()]
    if union and any(s.vocab is None for s in [target, *union.values()]):
        raise VlmMergeError("tokenizer_source: union needs every source's tokenizer; add tokenizer.json / tokenizer.model")
    if any(s.vocab is None for s in sides):
        if len({s.rows for s in sides}) != 1:
            raise VlmMergeError(
                f"vocabulary sizes differ ({target.rows} target rows, "
                + ", ".join(f"{r}: {s.rows}" for r, s in delta_roles.items())
                + ") but a source has no tokenizer files; add tokenizer.json / tokenizer.model so rows can "
                "be matched by token string"
            )
        ident = torch.arange(target.rows)
        return VocabPlan(
            out_rows=target.rows,
            target_rows=target.rows,
            pairs={r: RowMap(ident, ident) for r in delta_roles},
            image_token_id=image_token_id,
            notes=("a source has no tokenizer: rows matched by position (all row counts equal)",),
        )

    target_vocab = target.vocab or {}
    lookups = {role: match_rows(target_vocab, target.rows, side) for role, side in delta_roles.items()}
    common = set.intersection(*(set(m) for m in lookups.values())) if lookups else set()
    common_rows = sorted(common)
    out_idx = torch.tensor(common_rows, dtype=torch.long)
    pairs = {
        role: RowMap(out_idx, torch.tensor([lookup[r] for r in common_rows], dtype=torch.long))
        for role, lookup in lookups.items()
    }

    n_tokens = target.size if target.size is not None else len(target_vocab)
    notes = _unmatched_note(target.rows, n_tokens, len(common_rows))
    specs = token_sources or {}
    joined = [(t, specs[t].role, specs[t].row) if t in specs else (t, role, row) for t, role, row in union_tokens(target_vocab, union or {})]
    missing = sorted(t for t in specs if t not in target_vocab and t not in {j[0] for j in joined})
    if missing:
        raise VlmMergeError(f"tokenizer.tokens: {missing[0]!r} is not in the output's vocabulary; use a token it has "
                            "(or tokenizer source: union to add the models' tokens)")
    # tokens of the target whose row the recipe sets: every forced one, and those some source lacks
    set_rows = {target_vocab[t]: spec for t, spec in specs.items() if t in target_vocab and (spec.force or target_vocab[t] not in common)}
    if set_rows:
        keep = torch.tensor([r not in set_rows for r in common_rows], dtype=torch.bool)
        pairs = {role: RowMap(m.out[keep], m.src[keep]) for role, m in pairs.items()}
    overrides = tuple(AddedToken(t, target_vocab[t], set_rows[target_vocab[t]].row, set_rows[target_vocab[t]].role)
                      for t in specs if t in target_vocab and target_vocab[t] in set_rows)
    if vlm is None and not joined and not overrides:
        return VocabPlan(out_rows=target.rows, target_rows=target.rows, pairs=pairs, pad_token=target.pad_token,
                         pad_token_id=target_vocab.get(target.pad_token) if target.pad_token else None, notes=notes)
    want = list(joined)
    image_token, pad_token = None, target.pad_token
    if vlm is not None:  # tokens the output needs that the target tokenizer lacks: the image token, and a pad token
        vlm_vocab = vlm.vocab or {}
        vlm_inv = {i: t for t, i in vlm_vocab.items()}
        image_token = vlm_inv.get(image_token_id, DEFAULT_IMAGE_TOKEN) if image_token_id is not None else DEFAULT_IMAGE_TOKEN
        pad_token = target.pad_token or vlm.pad_token or DEFAULT_PAD_TOKEN
        have = {token for token, _, _ in want}
        for token in dict.fromkeys((image_token, pad_token)):
            if token not in target_vocab and token not in have:
                row = vlm_vocab.get(token)
                want.append((token, VLM_ROWS, row if row is not None and row < vlm.rows else None))
    added = tuple(AddedToken(tok, n_tokens + i, row, role) for i, (tok, role, row) in enumerate(want))
    needed = max(target.rows, n_tokens + len(added))
    added += overrides
    out_rows = -(-needed // multiple) * multiple
    ids = {**target_vocab, **{a.token: a.out_row for a in added}}
    return VocabPlan(
        out_rows=out_rows,
        target_rows=target.rows,
        pairs=pairs,
        added=added,
        image_token=image_token,
        image_token_id=ids.get(image_token) if image_token is not None else None,
        pad_token=pad_token,
        pad_token_id=ids.get(pad_token) if pad_token is not None else None,
        tokens_added_to_tokenizer=tuple(a.token for a in added[len(joined) : len(want)]),
        union_tokens=tuple(token for token, _, _ in joined),
        notes=notes,
    )


def union_tokens(target_vocab: dict[str, int], union: dict[str, VocabSide]) -> list[tuple[str, str, int]]:
    """(token, role, row) of the tokens the target lacks, in source order then id order: each from the first
    source that has it (ids past a source's embedding rows are not its tokens)."""
    out: dict[str, tuple[str, int]] = {}
    for role, side in union.items():
        for token, row in sorted((side.vocab or {}).items(), key=lambda kv: kv[1]):
            if token not in target_vocab and token not in out and row < side.rows:
                out[token] = (role, row)
    return [(token, role, row) for token, (role, row) in out.items()]


def _unmatched_note(rows: int, tokens: int, matched: int) -> tuple[str, ...]:
    unmatched = min(rows, tokens) - matched
    return (f"{unmatched} target rows have no counterpart in every source and keep the target's values",) if unmatched > 0 else ()


# `target_mean` converts this many bytes of float32 columns at a time.
MEAN_BLOCK_BYTES = 16 << 20


def target_mean(target: torch.Tensor) -> torch.Tensor:
    """The mean of the target's rows in float32, bit for bit as `target.float().mean(dim=0)` computes it
    (tests/test_vocab.py), without a float32 copy of the whole tensor: torch sums each column on its own, so
    blocks of columns (multiples of 64) give the same values. (`mean(dtype=float32)` would copy it whole.)"""
    if target.dtype == torch.float32 or target.dim() != 2 or not target.shape[1]:
        return target.float().mean(dim=0)
    rows, cols = target.shape
    width = max(64, MEAN_BLOCK_BYTES // (4 * max(1, rows)) // 64 * 64)
    return torch.cat([target[:, c : c + width].float().mean(dim=0) for c in range(0, cols, width)])


def needs_mean(plan: VocabPlan, target_rows: int, has_vlm: bool) -> bool:
    """Whether some output row takes the target's mean row (padding, or an added token without a source row)."""
    n = min(plan.target_rows, plan.out_rows, target_rows)
    return plan.out_rows > n or any((a.row is None and a.role != ZERO) or (a.role == VLM_ROWS and not has_vlm) for a in plan.added)


def vocab_rows(
    plan: VocabPlan,
    rows: tuple[int, int],
    target: torch.Tensor,
    target_rows: int,
    mean: torch.Tensor | None,
    source_row: Callable[[str, int], torch.Tensor] | None,
) -> torch.Tensor:
    """Output rows [start, stop) before any task vector (float32): the target's rows, the VLM's rows of added
    tokens and the union's tokens, the target's `mean` row (`target_mean`) for padding and added tokens no
    source has a row for.

    `target` holds the target's rows from `start` on (at least to `stop` or its last row; `target_rows` of them
    in all), `source_row(role, i)` reads row i of a source ("vlm": the VLM; None: no source rows).
    """
    start, stop = rows
    out = torch.empty((stop - start, target.shape[1]), dtype=torch.float32)
    n = min(plan.target_rows, plan.out_rows, target_rows)
    k = max(0, min(stop, n) - start)
    out[:k] = target[:k]
    if stop - start > k:
        assert mean is not None
        out[k:] = mean
    for a in plan.added:
        if start <= a.out_row < stop:
            if a.role == ZERO:
                out[a.out_row - start] = 0.0
            elif a.row is not None and source_row is not None:
                out[a.out_row - start] = source_row(a.role, a.row)
            else:
                assert mean is not None
                out[a.out_row - start] = mean
    return out


def fill_vocab_rows(target: torch.Tensor, plan: VocabPlan, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The output's starting rows (float32): the target's rows, added tokens (`rows`: the whole tensor of each
    source they come from, "vlm" for the VLM), mean-filled padding."""
    mean = target_mean(target) if needs_mean(plan, target.shape[0], VLM_ROWS in rows) else None
    return vocab_rows(plan, (0, plan.out_rows), target, target.shape[0], mean, lambda role, i: rows[role][i])
