"""benchmarks/accuracy_digits.py still runs: two variants, one seed, a few batches (seconds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy_digits.py"


def _load():
    spec = importlib.util.spec_from_file_location("accuracy_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_accuracy_digits_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    records = bench.main(["--variants", "lrpet", "svd_ft", "thin_init", "--seeds", "0",
                          "--levels", "92", "--epochs", "2", "--limit-train-batches", "2",
                          "--jobs", "1"])
    assert sorted(r["variant"] for r in records) == ["lrpet", "svd_ft", "thin_init"]
    for r in records:
        assert 0.0 <= r["test_acc"] <= 1.0
        # All variants end at the same ranks, hence the same FLOPs (rank_ratio 0.08: 92.4 %).
        assert r["flops_reduction"] == pytest.approx(0.924, abs=0.005)
    table = capsys.readouterr().out
    assert "| ~92 % (rank_ratio 0.08) | lrpet |" in table
    assert "| ~92 % (rank_ratio 0.08) | svd_ft |" in table
    assert "| ~92 % (rank_ratio 0.08) | thin_init |" in table


def test_levels_give_the_documented_reductions() -> None:
    bench = _load()
    assert bench.uniform_reduction(bench.LEVELS["80"], 16)[0] == pytest.approx(0.791, abs=0.001)
    assert bench.uniform_reduction(bench.LEVELS["92"], 16)[0] == pytest.approx(0.924, abs=0.001)
