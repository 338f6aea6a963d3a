"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_llama import save_tiny_llama


@pytest.fixture
def single_thread():
    """Run a test on one torch thread, then restore the count.

    Tiny matmuls are dominated by thread start-up on a busy 2-core host (numpy's BLAS and torch's
    pool fight over the cores), and resume workers run on one thread too (same reduction order).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and its tokenizer saved as a model folder (``--model PATH``), built once
    per test module."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
