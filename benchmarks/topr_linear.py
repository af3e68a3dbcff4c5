"""Top-r projection of large Linear layers (ViT-B/L MLP shapes) against a full SVD.

For each shape (768x3072, 3072x768, 1024x4096, 4096x1024) at rank ratio 0.25, one LRPET
projection (energy transfer, no BN) of a weight in the ``trained`` state (the previous
projection, rank r, plus a 5 % random change — every projection after the first) or, with
``--states init``, at random init (no gap at the cut: "subspace" falls back to "gram").
Compares, measured side by side (interleaved, best of ``--repeats``):

* the reference: a full ``torch.svd`` in float32, truncation with energy transfer, rebuild;
* ``project_matrix`` with ``svd_method`` "subspace" (top-r), "gram32" and "gram";

and prints each one's speed-up over the reference and its relative error
``||W - W*||_F / ||W*||_F`` against the same projection with a float64 full SVD.
Issue target: "subspace" >= 10x faster than the full SVD within 1e-5.

Run:  python benchmarks/topr_linear.py [--rank-ratio 0.25] [--repeats 3] [--threads N]
          [--states trained init]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from lrpet_lightning.core.linalg import project_matrix, rank_from_ratio

SHAPES = ((768, 3072), (3072, 768), (1024, 4096), (4096, 1024))
TARGET_SPEEDUP = 10.0
TARGET_REL_ERR = 1e-5
TRAINED_CHANGE = 0.05


def reference(M: torch.Tensor, r: int) -> torch.Tensor:
    """Full float32 ``torch.svd``, energy transfer, rebuild (the reference code's way)."""
    U, S, V = torch.svd(M)
    alpha = S.square().sum() / S[:r].square().sum()
    return (U[:, :r] * (S[:r] * alpha.sqrt())) @ V[:, :r].T


def weight(rows: int, cols: int, r: int, state: str) -> torch.Tensor:
    """A float32 weight in ``state`` (seeded)."""
    generator = torch.Generator().manual_seed(rows * 7 + cols)
    W = torch.randn(rows, cols, generator=generator, dtype=torch.float64) / cols**0.5
    if state == "trained":
        W = project_matrix(W, r, svd_method="exact").matrix
        noise = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        W = W + noise * (TRAINED_CHANGE * W.norm() / noise.norm())
    return W.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--states", nargs="+", choices=("trained", "init"), default=["trained"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"Linear projection, rank_ratio {args.rank_ratio}; torch {torch.__version__}, CPU, "
          f"{torch.get_num_threads()} thread(s), load average {load}; best of "
          f"{args.repeats}, interleaved")
    print(f"{'state':8s} {'shape':>10s} {'method':28s} {'seconds':>8s} {'speed-up':>9s} "
          f"{'rel err':>9s}")
    verdicts = []
    for state in args.states:
        for rows, cols in SHAPES:
            r = rank_from_ratio(min(rows, cols), args.rank_ratio)
            M = weight(rows, cols, r, state)
            truth = project_matrix(M.double(), r, svd_method="exact").matrix
            runs: dict[str, Callable[[], torch.Tensor]] = {
                "full torch.svd f32": lambda M=M, r=r: reference(M, r),
            }
            for method in ("subspace", "gram32", "gram"):
                runs[f'project_matrix "{method}"'] = (
                    lambda M=M, r=r, method=method: project_matrix(M, r, svd_method=method).matrix)
            best = {label: float("inf") for label in runs}
            out: dict[str, torch.Tensor] = {}
            for _ in range(args.repeats):
                for label, run in runs.items():
                    start = time.perf_counter()
                    out[label] = run()
                    best[label] = min(best[label], time.perf_counter() - start)
            ref = best["full torch.svd f32"]
            for label in runs:
                err = float((out[label].double() - truth).norm() / truth.norm())
                print(f"{state:8s} {f'{rows}x{cols}':>10s} {label:28s} {best[label]:8.3f} "
                      f"{ref / best[label]:8.2f}x {err:9.2e}")
                if label == 'project_matrix "subspace"':
                    met = ref / best[label] >= TARGET_SPEEDUP and err <= TARGET_REL_ERR
                    verdicts.append(f"{state} {rows}x{cols}: subspace {ref / best[label]:.1f}x, "
                                    f"error {err:.1e} (target >= {TARGET_SPEEDUP:g}x within "
                                    f"{TARGET_REL_ERR:g}: {'MET' if met else 'NOT MET'})")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
