"""One full LRPET projection pass (BN rectification on) over every conv of ResNet-50.

Compares ``project_layers_`` with the default ``svd_method`` against the reference code's
way: a Python loop that, per layer, rectifies the matrix by its BatchNorm, runs a full
``torch.svd`` in float32, transfers the energy, rebuilds, undoes the rectification with
the regularized inverse and copies the result back. The BN pairs are traced once with an
example input before timing, so only the projection itself is timed. The BatchNorms'
running statistics and gammas are randomized (seeded) so that the rectification is not
a near-identity, as it would be at random init.

Prints, measured side by side in one run (interleaved, best of ``--repeats``):

* the speed-up ``reference time / ours``;
* the largest relative error ``||W - W*||_F / ||W*||_F`` over the 53 convs of ours and of
  the reference loop, where ``W*`` is the same projection computed with a full SVD in float64;
* whether the issue's targets (>= 3x faster, within 1e-5 relative) are met.

Run:  python benchmarks/projection.py [--rank-ratio 0.38] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from svd_backends import _best_times, _convs, _max_rel_err, parse_args  # noqa: E402

from lrpet_lightning.core import LowRankConfig, select_layers, trace_bn_pairs  # noqa: E402
from lrpet_lightning.core.linalg import (  # noqa: E402
    BN_INVERSE_EPS,
    ZERO_LAYER_TOL,
    bn_scale,
    project_matrix,
    weight_to_matrix,
)
from lrpet_lightning.core.transforms import attach_bn_pairs, project_layers_  # noqa: E402
from lrpet_lightning.core.walk import TargetLayer  # noqa: E402

TARGET_SPEEDUP = 3.0
TARGET_REL_ERR = 1e-5


def _planned(model: nn.Module, config: LowRankConfig, bn_names: dict[str, str]) -> list[TargetLayer]:
    """The model's target layers with their BNs attached from an earlier trace (by name)."""
    layers = select_layers(model, config)
    attach_bn_pairs(layers, {conv: (bn, model.get_submodule(bn)) for conv, bn in bn_names.items()})
    return layers


@torch.no_grad()
def reference_projection_(layers: list[TargetLayer]) -> None:
    """The reference code's loop, with BN rectification, all in float32."""
    for layer in layers:
        W = layer.module.weight.data
        M = W.view(W.shape[0], -1)
        r = layer.rank
        bn = layer.bn
        a = None
        if bn is not None:
            a = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1)
            M = M * a
        U, S, V = torch.svd(M)  # the reference code uses the (deprecated) torch.svd
        if S[0] < ZERO_LAYER_TOL:
            continue
        alpha = S.square().sum() / S[:r].square().sum()
        S = torch.cat([S[:r] * alpha.sqrt(), torch.zeros_like(S[r:])])
        M = (U * S) @ V.T
        if a is not None:
            M = M * (a / (a.square() + BN_INVERSE_EPS))
        W.copy_(M.view_as(W))


@torch.no_grad()
def exact_float64(layers: list[TargetLayer]) -> dict[str, torch.Tensor]:
    """The ground truth: ALGORITHM.md §4 with BN rectification, full SVD in float64."""
    out = {}
    for layer in layers:
        W = layer.module.weight
        bn = layer.bn
        scale = None if bn is None else bn_scale(bn.running_var, bn.eps, bn.weight)
        M = weight_to_matrix(W.detach()).double()
        out[layer.name] = project_matrix(M, layer.rank, scale=scale,
                                         svd_method="exact").matrix.reshape(W.shape)
    return out


def main() -> None:
    args = parse_args(__doc__)

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.2, 5.0)
                m.weight.uniform_(0.1, 2.0)
    config = LowRankConfig(rank_ratio=args.rank_ratio)  # default svd_method
    layers = select_layers(model, config)
    pairs = trace_bn_pairs(model, layers, torch.randn(2, 3, 224, 224))
    bn_names = {conv: bn for conv, (bn, _) in pairs.items()}
    attach_bn_pairs(layers, pairs)
    truth = exact_float64(layers)

    # Each run gets a fresh deep copy; its layers are selected and BN-paired inside the run,
    # which costs microseconds (no forward pass) next to the projection.
    runs: dict[str, Callable[[nn.Module], None]] = {
        "reference loop (torch.svd f32)":
            lambda m: reference_projection_(_planned(m, config, bn_names)),
        f'project_layers_ ("{config.svd_method}")':
            lambda m: project_layers_(_planned(m, config, bn_names), config),
    }
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torchvision resnet50 (random init, randomized BN stats), {len(_convs(model))} "
          f"convs, {len(bn_names)} BN-rectified, rank_ratio {args.rank_ratio}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), load average {load}; "
          f"best of {args.repeats}, interleaved")
    seconds, projected = _best_times(runs, model, args.repeats)
    ref_label, ours_label = runs
    for label in runs:
        err = _max_rel_err(projected[label], truth)
        print(f"{label:34s} {seconds[label]:8.3f} s   max rel err vs f64 full SVD {err:.2e}")
    speedup = seconds[ref_label] / seconds[ours_label]
    err = _max_rel_err(projected[ours_label], truth)
    print(f"speed-up (reference / ours): {speedup:.2f}x")
    met = speedup >= TARGET_SPEEDUP and err <= TARGET_REL_ERR
    print(f"targets (>= {TARGET_SPEEDUP:g}x faster, max rel err <= {TARGET_REL_ERR:g}): "
          f"{'MET' if met else 'NOT MET'} (speed-up {speedup:.2f}x, error {err:.2e})")


if __name__ == "__main__":
    main()
