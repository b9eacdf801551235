"""Decoding settings shared by generation, protocols and captioning (no torch import here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vlm_merge.errors import VlmMergeError


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings (always deterministic: greedy when num_beams == 1, else beam search)."""

    max_new_tokens: int = 32
    num_beams: int = 1
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # > 0 suppresses EOS until then (benchmarks force a fixed answer length)

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "num_beams": self.num_beams >= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "min_new_tokens": 0 <= self.min_new_tokens <= self.max_new_tokens,
        }
        for name, ok in checks.items():
            if not ok:
                raise VlmMergeError(f"generation setting {name}={getattr(self, name)!r} is out of range")

    def as_dict(self) -> dict:
        return asdict(self)

    def generate_kwargs(self) -> dict:
        return {
            "do_sample": False,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens or None,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
            "use_cache": True,
        }
