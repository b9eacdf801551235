"""Evaluation of image-text-to-text models: batched generation (benchmarks and metrics build on it)."""

from eval.generation import generate_answers

__all__ = ["generate_answers"]
