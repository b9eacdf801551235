"""torch's intra-op thread count for one block of work, restored after it (merges, searches, zoo builds)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` (None: unchanged) inside the block, restored after it
    (also whatever code inside the block set it to)."""
    was = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(was)
