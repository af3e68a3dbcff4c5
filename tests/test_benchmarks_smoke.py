"""benchmarks/accuracy_digits.py still runs: two variants, one seed, a few batches (seconds);
benchmarks/vs_torch_pruning.py --quick (about 30 s idle, minutes under load; slow)."""

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


def _load_vs_torch_pruning(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("torchvision")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports benchmarks/inference.py
    spec = importlib.util.spec_from_file_location("vs_torch_pruning",
                                                  SCRIPT.parent / "vs_torch_pruning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_vs_torch_pruning_without_torch_pruning_exits_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_vs_torch_pruning(monkeypatch)
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick"])
    assert exit_info.value.code == 2
    assert 'pip install "torch-pruning>=1.6"' in capsys.readouterr().err


@pytest.mark.slow
def test_vs_torch_pruning_quick(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch_pruning")
    bench = _load_vs_torch_pruning(monkeypatch)
    results = bench.main(["--quick"])
    assert list(results) == [1]
    flops = {name: f for name, (f, _) in results[1].items()}
    assert flops["dense  BN folded, channels_last"] == pytest.approx(1.0)
    # Equal FLOPs for all: ours at 53.5 % fewer, Torch-Pruning matched within 0.5 %.
    ours = flops["ours   factorized, channels_last"]
    assert ours == pytest.approx(1 - 0.535, abs=0.005)
    for name, f in flops.items():
        if name.startswith("torch-pruning") or "x8" in name:
            assert f == pytest.approx(ours, rel=0.005), name
    assert "target: prepare_for_inference <= torch-pruning's best" in capsys.readouterr().out
