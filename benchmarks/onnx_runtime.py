"""onnxruntime CPU latency of an LRPET-compressed ResNet-50 against the dense one.

torchvision ResNet-50 (``build_model("tv_resnet50")``, 1000 classes, random weights:
latency does not depend on their values), every conv projected and decomposed at
``--rank-ratio`` (0.38, as the presets use), both exported with
:func:`lrpet_lightning.core.export.export_onnx` (dynamic batch, checked against PyTorch)
and run in onnxruntime at 224x224 for each ``--batch-sizes``. The two sessions run
interleaved, one run of each per round, so that load from other processes hits both alike;
the ratio printed is the median over rounds of compact/dense. The target of issue 16 is
a ratio <= 0.50 at batch 1.

Run:  python benchmarks/onnx_runtime.py [--batch-sizes 1 16] [--rounds 20] [--threads 2]
      [--allow-spinning]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from lrpet_lightning import compression_report, decompose_, project_low_rank_
from lrpet_lightning.core.export import export_onnx
from lrpet_lightning.models import build_model

SIZE = 224


def dense_and_compact(rank_ratio: float) -> tuple[nn.Module, nn.Module]:
    """(dense, compact) ResNet-50 in eval mode; compact = projected then decomposed."""
    torch.manual_seed(0)
    dense = build_model("tv_resnet50", num_classes=1000).eval()
    compact = copy.deepcopy(dense)
    x = torch.randn(2, 3, SIZE, SIZE)
    project_low_rank_(compact, rank_ratio=rank_ratio, example_inputs=x)
    decompose_(compact, rank_ratio=rank_ratio)
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


def interleaved(sessions: list[ort.InferenceSession], x: np.ndarray,
                rounds: int) -> list[list[float]]:
    """Wall time of each session per round (after two warm-up runs each)."""
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, feed in zip(sessions, feeds, strict=True):
        s.run(None, feed)
        s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (s, feed) in enumerate(zip(sessions, feeds, strict=True)):
            start = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-ratio", type=float, default=0.38)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allow-spinning", action="store_true",
                        help="onnxruntime's default spin-waiting threads (off: a shared machine)")
    parser.add_argument("--keep", default=None, help="folder for the .onnx files (default: a "
                                                      "temporary one, removed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, compact = dense_and_compact(args.rank_ratio)
    report = compression_report(dense, compact, torch.randn(1, 3, SIZE, SIZE))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        x = torch.randn(1, 3, SIZE, SIZE)
        files = [export_onnx(m, x, folder / f"{name}.onnx")
                 for name, m in (("dense", dense), ("compact", compact))]
        sizes = [f.stat().st_size / 2**20 for f in files]
        sessions = [session(f, args.threads, args.allow_spinning) for f in files]
        print(f"torchvision ResNet-50, rank_ratio {args.rank_ratio}, onnxruntime "
              f"{ort.__version__}, CPU, {args.threads} thread(s), spinning "
              f"{'on' if args.allow_spinning else 'off'}, load average "
              f"{os.getloadavg()[0]:.1f} at the start")
        print(f"  FLOPs ratio compact/dense {report.compact_flops / report.dense_flops:.3f}; "
              f"file sizes dense {sizes[0]:.1f} MiB, compact {sizes[1]:.1f} MiB")
        for batch in args.batch_sizes:
            xb = np.random.default_rng(0).standard_normal(
                (batch, 3, SIZE, SIZE), dtype=np.float32)
            t_dense, t_compact = interleaved(sessions, xb, args.rounds)
            ratio = statistics.median(c / d for c, d in zip(t_compact, t_dense, strict=True))
            print(f"  batch {batch:3d}: dense {statistics.median(t_dense) * 1e3:8.1f} ms, "
                  f"compact {statistics.median(t_compact) * 1e3:8.1f} ms (medians), "
                  f"median ratio compact/dense {ratio:.3f}; load average "
                  f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
