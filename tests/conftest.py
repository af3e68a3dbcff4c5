"""Shared test settings: every test in its own working directory, one intra-op thread; the
``cfg_tiny`` fixture (a whole app run in seconds)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Trainers without a logger write (checkpoints, the compression report) into the
    # working directory: keep that out of the repository.
    monkeypatch.chdir(tmp_path)
    # The test models are tiny: intra-op threads gain nothing, and on a busy 2-core machine
    # their spin-waits made small fits 10-100x slower (measured: 3 fits 0.2 s vs 16 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg_tiny(tmp_path: Path):
    """The shipped default config (ResNet-20 on digits, LRPET, checkpoints) writing into
    ``tmp_path``, trimmed to a run of seconds: ``train(cfg_tiny)`` is a whole run."""
    from helpers import TINY_RUN, compose

    return compose(f"output_dir={tmp_path}", *TINY_RUN)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA; CI has none, so they are skipped there."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
