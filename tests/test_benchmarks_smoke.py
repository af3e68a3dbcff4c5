"""benchmarks/accuracy_digits.py still runs: two variants, one seed, a few batches (seconds);
benchmarks/vs_torch_pruning.py --quick (about 30 s idle, minutes under load; slow);
benchmarks/bn_recalibration.py on a tiny run (seconds)."""

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
        # (prepare_for_inference may make layers dense where that is faster: more FLOPs)
        if name.startswith("torch-pruning") or ("rank_multiple" in name and "factorized" in name):
            assert f == pytest.approx(ours, rel=0.005), name
    assert "target: prepare_for_inference <= torch-pruning's best" in capsys.readouterr().out


def test_bn_recalibration_rescores_as_the_app_would(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # The script's "after" figure of a run trained without recalibration is the test top-1
    # the app reports for the same run with bn_recalibration=3; its "as saved", the run's
    # (to float32 metric precision, far below one image of 359).
    from helpers import TINY_RUN, compose

    from lrpet_lightning.app.train import train

    run = [o for o in TINY_RUN if "limit_test_batches" not in o]  # the whole test split
    plain = train(compose(f"output_dir={tmp_path / 'sweep' / 'plain'}", *run))
    recal = train(compose(f"output_dir={tmp_path / 'recal'}", *run, "bn_recalibration=3"))
    spec = importlib.util.spec_from_file_location(
        "bn_recalibration", SCRIPT.parent / "bn_recalibration.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([str(tmp_path / "sweep"), "--batches", "3",
                       "--json", str(tmp_path / "rows.json")]) == 0
    [row] = __import__("json").loads((tmp_path / "rows.json").read_text())
    assert row["test_acc_saved"] == pytest.approx(plain["test_acc"], abs=1e-6)
    assert row["test_acc_recalibrated"] == pytest.approx(recal["test_acc"], abs=1e-6)
    assert row["batches"] == 3 and "sweep / lrpet | 57.48 % | 0 |" in capsys.readouterr().out
    assert bench.main([str(tmp_path / "recal" / "csv")]) == 2  # nothing there: said, exit 2
