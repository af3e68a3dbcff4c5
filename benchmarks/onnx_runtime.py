"""onnxruntime CPU latency of an LRPET-compressed ResNet-50 against the dense one.

torchvision ResNet-50 (``build_model("tv_resnet50")``, 1000 classes, random weights:
latency does not depend on their values), every conv projected and decomposed at
``--rank-ratio`` (0.38, as the presets use; each rank rounded to a multiple of each
``--rank-multiples``, one compact model each), all exported with
:func:`lrpet_lightning.core.export.export_onnx` (dynamic batch, checked against PyTorch)
(factorized ranks zero-padded to multiples of 8 in the file, as ``export_onnx`` does by
default; the first compact model also unpadded) and run in onnxruntime — with
``--openvino`` also in OpenVINO's CPU plugin, in f32 and in its default precision (bf16
where the CPU has bf16 units) — at 224x224 for each ``--batch-sizes``. The
models run interleaved, one run of each per round, so that load from other processes hits
all alike; each ratio printed is the median over rounds of compact/dense. ``--torch-pruning``
adds Torch-Pruning's models (L2 global, ``round_to=8`` and ``16``) at the first compact
model's FLOPs. The target of issue 16 is a ratio <= 0.50 at batch 1 in both runtimes.

Run:  python benchmarks/onnx_runtime.py [--batch-sizes 1 16] [--rounds 20] [--threads 2]
      [--rank-multiples 1 16] [--target-flops-reduction 0.535] [--torch-pruning]
      [--openvino] [--allow-spinning]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from lrpet_lightning import decompose_, project_low_rank_, solve_ranks
from lrpet_lightning.core.export import export_onnx
from lrpet_lightning.core.inference import pad_ranks
from lrpet_lightning.core.report import count_flops
from lrpet_lightning.models import build_model

SIZE = 224


def dense_and_compact(rank_ratio: float, rank_multiple: int = 1,
                      target_flops_reduction: float | None = None
                      ) -> tuple[nn.Module, nn.Module]:
    """(dense, compact) ResNet-50 in eval mode; compact = projected then decomposed, at
    ``rank_ratio`` or, when given, at the ranks ``solve_ranks`` finds for the budget."""
    torch.manual_seed(0)
    dense = build_model("tv_resnet50", num_classes=1000).eval()
    compact = copy.deepcopy(dense)
    x = torch.randn(2, 3, SIZE, SIZE)
    if target_flops_reduction is None:
        ranks = {"rank_ratio": rank_ratio, "rank_multiple": rank_multiple}
    else:
        ranks = {"ranks": solve_ranks(dense, x[:1], rank_multiple=rank_multiple,
                                      target_flops_reduction=target_flops_reduction).ranks}
    project_low_rank_(compact, example_inputs=x, **ranks)
    decompose_(compact, **ranks)
    return dense, compact.eval()


def session(path: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        # Idle intra-op threads spin-wait by default: on a machine whose cores other
        # processes keep busy, they steal the time slices the working threads need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(runs: list[Callable[[], object]], rounds: int) -> list[list[float]]:
    """Wall time of each run per round (after two warm-up calls each)."""
    for run in runs:
        run()
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            times[i].append(time.perf_counter() - start)
    return times


def ort_run(s: ort.InferenceSession, x: np.ndarray) -> Callable[[], object]:
    feed = {s.get_inputs()[0].name: x}
    return lambda: s.run(None, feed)


def openvino_models(files: list[Path], threads: int, precision: str | None) -> list[Any]:
    """Each ONNX file compiled by OpenVINO for its CPU plugin (latency hint, ``threads``);
    ``precision`` ``"f32"``, or ``None`` for OpenVINO's default (bf16 on CPUs with bf16
    units, such as AMX)."""
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return [core.compile_model(os.fspath(f), "CPU", config) for f in files]


def ov_run(compiled: Any, x: np.ndarray) -> Callable[[], object]:
    request = compiled.create_infer_request()
    return lambda: request.infer([x])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-ratio", type=float, default=0.38)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target-flops-reduction", type=float, default=None,
                        help="solve the ranks for this budget instead of --rank-ratio")
    parser.add_argument("--rank-multiples", type=int, nargs="+", default=[1],
                        help="one compact model with ranks rounded to each multiple")
    parser.add_argument("--torch-pruning", action="store_true",
                        help="also Torch-Pruning's models (L2 global, round_to=8 and 16) at "
                             "the first compact model's FLOPs (needs the bench extra)")
    parser.add_argument("--openvino", action="store_true",
                        help="also time the same files in OpenVINO's CPU plugin (pip install "
                             "openvino)")
    parser.add_argument("--allow-spinning", action="store_true",
                        help="onnxruntime's default spin-waiting threads (off: a shared machine)")
    parser.add_argument("--keep", default=None, help="folder for the .onnx files (default: a "
                                                      "temporary one, removed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {}
    for multiple in args.rank_multiples:
        dense, models[f"compact, rank_multiple={multiple}"] = dense_and_compact(
            args.rank_ratio, multiple, args.target_flops_reduction)
    x = torch.randn(1, 3, SIZE, SIZE)
    first = next(iter(models))  # the first compact model: Torch-Pruning's FLOPs target
    if args.torch_pruning:
        import torch_pruning as tp
        from vs_torch_pruning import matched_torch_pruned

        target = count_flops(models[first], x)[""]
        for round_to in (8, 16):
            models[f"torch-pruning L2 global round_to={round_to}"] = matched_torch_pruned(
                tp, dense, target, x, round_to=round_to)
    dense_flops = count_flops(dense, x)[""]
    # FLOPs of what runs: the file's ranks, padded to multiples of 8 as export_onnx does
    flops = {name: count_flops(pad_ranks(m), x)[""] / dense_flops for name, m in models.items()}
    flops[f"{first}, exported unpadded"] = count_flops(models[first], x)[""] / dense_flops
    models = {"dense": dense, **models}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        files = {name: export_onnx(m, x, folder / f"model{i}.onnx")
                 for i, (name, m) in enumerate(models.items())}
        # The first compact model also as it is, to show what export_onnx's padding buys.
        files[f"{first}, exported unpadded"] = export_onnx(
            models[first], x, folder / "unpadded.onnx", rank_multiple=1)
        sessions = [session(f, args.threads, args.allow_spinning) for f in files.values()]
        compiled, openvino_version = {}, None
        if args.openvino:
            import openvino

            openvino_version = openvino.__version__.split("-")[0]
            compiled = {label: openvino_models(list(files.values()), args.threads, precision)
                        for label, precision in (("f32", "f32"),
                                                 ("its default precision", None))}
        ranks = (f"rank_ratio {args.rank_ratio}" if args.target_flops_reduction is None
                 else f"target_flops_reduction {args.target_flops_reduction}")
        print(f"torchvision ResNet-50, {ranks}, onnxruntime "
              f"{ort.__version__}, CPU, {args.threads} thread(s), spinning "
              f"{'on' if args.allow_spinning else 'off'}, load average "
              f"{os.getloadavg()[0]:.1f} at the start")
        for name, f in files.items():
            ratio = "" if name == "dense" else (
                f", FLOPs ratio {flops[name]:.3f}")
            print(f"  {name}: file {f.stat().st_size / 2**20:.1f} MiB{ratio}")
        for batch in args.batch_sizes:
            xb = np.random.default_rng(0).standard_normal(
                (batch, 3, SIZE, SIZE), dtype=np.float32)
            runtimes = {"onnxruntime": [ort_run(s, xb) for s in sessions]}
            for precision, models_ in compiled.items():
                runtimes[f"OpenVINO {openvino_version}, {precision}"] = [
                    ov_run(c, xb) for c in models_]
            for runtime, runs in runtimes.items():
                times = interleaved(runs, args.rounds)
                print(f"  batch {batch:3d}, {runtime}: dense "
                      f"{statistics.median(times[0]) * 1e3:8.1f} ms (median); load average "
                      f"{os.getloadavg()[0]:.1f}")
                for name, t in zip(list(files)[1:], times[1:], strict=True):
                    ratio = statistics.median(c / d for c, d in zip(t, times[0], strict=True))
                    print(f"    {name}: {statistics.median(t) * 1e3:8.1f} ms, "
                          f"median ratio to dense {ratio:.3f}")

if __name__ == "__main__":
    main()
