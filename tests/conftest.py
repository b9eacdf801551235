"""Shared fixtures: one tiny fixture zoo per test session (every real layout, random weights)."""

from __future__ import annotations

import os

import pytest

# The fused GPU kernel (vlm_merge.engine.fused) is tested on the CPU by Triton's interpreter, which must be
# chosen before anything imports triton (torch and transformers may). Nothing runs the kernel unless
# asked to (`ResidentMerger.open(..., fused=True)`); on the CPU the default stays tensor by tensor.
os.environ.setdefault("TRITON_INTERPRET", "1")
# No test reaches the Hugging Face Hub: ids resolve from local caches (huggingface_hub reads this at import);
# tests/test_hub.py switches it off where a local server plays the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlm_merge.testing import FixtureZoo, build_fixture_zoo


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run faster and with steadier timings on one thread on this 2-core VM."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> FixtureZoo:
    return build_fixture_zoo(tmp_path_factory.mktemp("zoo"), seed=0)


def family_of(zoo: FixtureZoo, vlm: str) -> tuple:
    fam = zoo.vlm_family[vlm]
    return zoo.llms[f"en-{fam}"], zoo.llms[f"ja-{fam}"]


def error_line(capsys) -> str:
    """The single `vlm-merge: error:` line a failed command printed (and no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("vlm-merge: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]
