"""Benchmarks for vlm-merge (not tests: they measure, they do not assert).

Run ``.venv/bin/python -m bench.chat_vector`` (or ``make bench``); see
``bench/README.md`` for what is measured and how.
"""
