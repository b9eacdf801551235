"""The search: CMA-ES (`cma`) in ask/tell form over genomes in [0, 1]^n, rebuilt on resume without pickling.

Also the questions each generation is scored on (`subsets`: all, a random subset, or successive
halving's nested rungs) and the Ctrl-C guard around the steps that must not be cut short.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve.config import EvolveConfig
from vlm_merge.evolve.rundir import LOG_FILE


class _Randn:
    """cma's `randn` option: normal draws from our own numpy Generator (its state is checkpointed as data)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """A block a Ctrl-C does not cut short: SIGINT is held back and raised as KeyboardInterrupt once it ends.

    Around CMA-ES's ask/tell (cma has bare `except:` clauses that would swallow a KeyboardInterrupt and fail
    later) and the checkpoint write (so the checkpoint on disk is the generation the message names).
    Outside the main thread, where no handler can be set, the block runs as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


class Search:
    """CMA-ES over genomes in [0, 1]^n and what rebuilds it without pickling: its seed, the fitness values
    told each generation (`told`, cma minimises) and its normal draws' generator (`randn`).

    `state()` is plain data for the checkpoint; `Search.replay` re-runs ask/tell from the seed with the
    told values and gets the same object back (the candidates are not merged or evaluated again)."""

    def __init__(self, config: EvolveConfig, x0: list[float]) -> None:
        import cma

        self.randn = _Randn(config.cmaes.seed)
        opts = {"bounds": [0.0, 1.0], "seed": float("nan"), "randn": self.randn, "verbose": -9, "verb_log": 0, "verb_disp": 0}
        if config.cmaes.popsize is not None:
            opts["popsize"] = config.cmaes.popsize
        self.es = cma.CMAEvolutionStrategy(x0, config.cmaes.sigma0, opts)
        self.told: list[list[float]] = []

    @property
    def popsize(self) -> int:
        """Candidates per generation (cma's default for the number of genes unless `cmaes.popsize`)."""
        return self.es.popsize

    def stop(self) -> dict:
        """cma's termination conditions met (empty: go on)."""
        return self.es.stop()

    def ask(self) -> list[list[float]]:
        """The next generation's genomes (floats, as logged)."""
        return [[float(v) for v in x] for x in self.es.ask()]

    def tell(self, xs: Sequence[Sequence[float]], values: Sequence[float]) -> None:
        """Update CMA-ES with the values (lower is better) of the genomes `ask` gave."""
        values = [float(v) for v in values]
        self.es.tell([np.asarray(x) for x in xs], values)
        self.told.append(values)

    def state(self) -> dict:
        """The search as plain data for the checkpoint: the told values and the generator's state."""
        return {"told": self.told, "randn_state": self.randn.rng.bit_generator.state}

    @classmethod
    def replay(cls, config: EvolveConfig, x0: list[float], state: Any, logged: Mapping[int, list[list[float]]], where: str) -> Search:
        """The search after the generations in `state` (from `state()`): ask/tell re-run with the told values.

        Each replayed generation must ask for the genomes `logged` holds for it (by generation number) and
        the replay must end at the stored generator state; otherwise `VlmMergeError` (`where`: the file)."""
        bad = f"{where}: the CMA-ES state"
        told = state.get("told") if isinstance(state, dict) else None
        if not isinstance(told, list) or not all(isinstance(v, list) and all(_is_number(f) for f in v) for v in told):
            raise VlmMergeError(f"{bad} is not a list of told fitness lists; start a new run")
        search = cls(config, x0)
        for gen_no, values in enumerate(told, 1):
            search.stop()  # as the search loop does before each ask (it may update cma's bookkeeping)
            xs = search.ask()
            want = logged.get(gen_no)
            if want is None or len(values) != len(xs) or not _same_genomes(want, xs):
                raise VlmMergeError(f"{bad} does not replay to the candidates {LOG_FILE} holds for generation {gen_no} "
                                    "(another cma/numpy version, or an edited file); start a new run")
            search.tell(xs, values)
        if search.randn.rng.bit_generator.state != state.get("randn_state"):
            raise VlmMergeError(f"{bad}: its random generator does not replay to the stored state "
                                "(another cma/numpy version, or an edited file); start a new run")
        return search


REPLAY_ATOL = 1e-9  # a replayed genome may differ from the logged one by this much (another machine's LAPACK)


def _is_number(v: Any) -> bool:
    """Whether `v` (read from a file) is a finite number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same_genomes(logged: Sequence[Any], asked: list[list[float]]) -> bool:
    """Whether `logged` (read from a file: anything) are the genomes `asked`, to within `REPLAY_ATOL`."""
    return (len(logged) == len(asked)
            and all(isinstance(x, list) and len(x) == len(y) and all(map(_is_number, x)) for x, y in zip(logged, asked))
            and all(abs(a - b) <= REPLAY_ATOL for x, y in zip(logged, asked) for a, b in zip(x, y)))


def subsets(config: EvolveConfig, pool: list[str], generation: int) -> list[list[str]] | None:
    """Question ids per rung (one rung for `random`), or None for the whole pool."""
    sub = config.fitness.subset
    if sub.mode == "none" or sub.size >= len(pool):
        return None
    rng = np.random.default_rng([config.cmaes.seed, generation])
    order = [pool[i] for i in rng.permutation(len(pool))]
    if sub.mode == "random":
        chosen = set(order[: sub.size])
        return [[q for q in pool if q in chosen]]
    sizes, s = [], sub.size
    while s < len(pool):
        sizes.append(s)
        s *= sub.eta
    sizes.append(len(pool))
    return [[q for q in pool if q in set(order[:n])] for n in sizes]
