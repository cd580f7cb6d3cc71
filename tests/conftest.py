"""Test-wide setup: never touch the network, keep torch single-threaded and deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread, also in the CLI subprocesses the tests start: the tiny models' ops take microseconds,
# and on a loaded 2-core machine OpenMP's spinning threads make them 30x slower (measured: 0.11 s vs 3.2 s
# for one tiny LLaVA generate).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def llava576():
    """A tiny LLaVA-1.5-shaped model (576 patches, 32 layers), one sample's inputs and its stock decoder input."""
    from helpers import llava576_case

    return llava576_case()


@pytest.fixture(scope="module")
def tiny_llava():
    from clse_exp import load_model

    return load_model("tiny_llava", "cpu")
