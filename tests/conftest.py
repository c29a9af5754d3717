"""Shared offline fixtures. Every test runs without network: hub calls fail fast instead of retrying."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import shutil  # noqa: E402

# PythonTool refuses to run model code without bubblewrap. CI (.ci/run) installs it and requires the sandbox;
# on a machine without it the README's test command still runs: the tests' code comes from scripted generators and
# tiny models, so they use the named weaker level, and the hostile sandbox suite skips with its reason.
if shutil.which("bwrap") is None and os.environ.get("APPO_REQUIRE_SANDBOX_TESTS") != "1":
    os.environ.setdefault("APPO_PYTHON_ISOLATION", "none")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ARPO_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arpo"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (~420 tokens) with TRL's Qwen2.5 chat template, eos <|im_end|>, pad <|endoftext|>."""
    from trl_appo.testing import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh random ~32k-parameter Qwen2 causal LM for each test (tests may train it)."""
    from trl_appo.testing import build_tiny_model

    return build_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def arpo_data_dir():
    """The paper's data in ../shared/data/arpo (reference copy); tests skip with a reason where it is absent."""
    if not (ARPO_DATA / "valid.parquet").exists():
        pytest.skip(f"ARPO reference data not found at {ARPO_DATA} (only present on project machines)")
    return ARPO_DATA


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
