"""Determinism for random methods: per-tensor seeds and the generators drawn from."""

from __future__ import annotations

import hashlib

import torch


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed, stable across processes and platforms:

        s = int.from_bytes(sha256(f"{seed}:{name}")[:8], "big") mod 2**63

    (never Python's `hash()`, which is salted per process).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator seeded with `seed` (a given generator is returned as is, and advances)."""
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        raise ValueError("seed: None; random methods need a seed or a torch.Generator (see tensor_seed)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: {seed!r} is not an int")
    return torch.Generator(device="cpu").manual_seed(seed)
