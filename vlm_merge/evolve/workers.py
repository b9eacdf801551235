"""Where a generation's candidates are scored: `LocalPool` (this process) or `RayPool` (N Ray actors).

Both hold `Evaluator`s (`vlm_merge.evolve.fitness`) and answer `map(jobs)` with one `Scored` per job,
in order; a job is a recipe (as a mapping) and the question ids to score it on (None: every question).
"""

from __future__ import annotations

from pathlib import Path

from vlm_merge.errors import VlmMergeError
from vlm_merge.evolve.config import EvolveConfig, config_from_dict
from vlm_merge.evolve.fitness import Evaluator, Scored


def _ray_actor_class():
    """The Ray actor class (made on first use: Ray is imported only with `workers > 0`): an `Evaluator` in a process."""
    import ray

    @ray.remote
    class EvaluatorActor:
        def __init__(self, config: dict, base_dir: str | None, scaffold: str) -> None:
            self.ev = Evaluator(config_from_dict(config, base_dir), scaffold)

        def score(self, recipe: dict, question_ids):
            return self.ev.score(recipe, question_ids)

        def inert_genes(self):
            return self.ev.inert_genes()

    return EvaluatorActor


class RayPool:
    """`n` Ray actors, each an `Evaluator` with its own resident sources; candidates run round-robin."""

    def __init__(self, config: EvolveConfig, scaffold: Path, n: int) -> None:
        try:
            import ray
        except ImportError:
            raise VlmMergeError("workers > 0 needs Ray: pip install 'vlm-merge[evolve]'") from None
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(num_cpus=max(n, 1), include_dashboard=False, log_to_driver=False, configure_logging=False)
        gpu = config.device.startswith("cuda") or (config.device == "auto" and _cuda())
        actor = _ray_actor_class().options(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1)
        self.actors = [actor.remote(config.to_dict(), None, str(scaffold)) for _ in range(n)]

    def inert_genes(self) -> dict[str, str]:
        return self.ray.get(self.actors[0].inert_genes.remote())

    def map(self, jobs: list[tuple[dict, list[str] | None]]) -> list[Scored]:
        futures = [self.actors[i % len(self.actors)].score.remote(r, q) for i, (r, q) in enumerate(jobs)]
        try:
            return self.ray.get(futures)
        except self.ray.exceptions.RayError as e:
            raise VlmMergeError(f"a Ray worker failed: {str(e).splitlines()[0]}") from None

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self._started:
            self.ray.shutdown()


class LocalPool:
    """One `Evaluator` in this process; candidates run one after another."""

    def __init__(self, config: EvolveConfig, scaffold: Path, questions=None) -> None:
        self.ev = Evaluator(config, scaffold, questions=questions)

    def inert_genes(self) -> dict[str, str]:
        return self.ev.inert_genes()

    def map(self, jobs: list[tuple[dict, list[str] | None]]) -> list[Scored]:
        return [self.ev.score(r, q) for r, q in jobs]

    def close(self) -> None:
        pass


def _cuda() -> bool:
    """Whether torch sees a CUDA device (then each Ray actor takes one GPU)."""
    import torch

    return torch.cuda.is_available()
