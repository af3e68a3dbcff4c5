"""One full LRPET projection pass (BN rectification on) over every conv of ResNet-50.

Compares ``project_layers_`` with the default ``svd_method`` ("gram", exact quality), the
fast mode ("gram32") and the top-r mode ("subspace") against the reference code's way: a
Python loop that, per layer, rectifies the matrix by its BatchNorm, runs a full ``torch.svd``
in float32, transfers the energy, rebuilds, undoes the rectification with the regularized
inverse and copies the result back. The BN pairs are traced once with an example input
before timing, so only the projection itself is timed. The BatchNorms' running statistics
and gammas are randomized (seeded) so that the rectification is not a near-identity, as it
would be at random init.

Three weight states are measured (``--states``):

* ``init`` — torchvision's random init: no spectral gap at the cut, the hardest case for
  accuracy (the first projection of a training run);
* ``trained`` — every later projection of a run: each weight is the previous projection
  (rank r) plus a 5 % random change, as one epoch of SGD leaves it;
* ``drift`` — the same with a change of decaying spectrum (singular values ~ 1/i): a
  smaller gap at the cut, closer to what SGD leaves.

Prints, measured side by side in one run (interleaved, best of ``--repeats``):

* the speed-up ``reference time / ours`` of each mode;
* the largest relative error ``||W - W*||_F / ||W*||_F`` over the 53 convs, where ``W*`` is
  the same projection computed with a full SVD in float64;
* whether the issue's targets are met: default >= 3x faster within 1e-5 relative, fast
  mode >= 6x faster (its error printed), top-r mode ("subspace": block subspace iteration,
  falling back to "gram" where not converged) >= 6x faster within 1e-5.

Run:  python benchmarks/projection.py [--rank-ratio 0.38] [--repeats 3] [--threads N]
          [--device cpu|cuda] [--states init trained drift]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from svd_backends import _best_times, _max_rel_err, parse_args

from lrpet_lightning.core import LowRankConfig
from lrpet_lightning.core.linalg import (
    BN_INVERSE_EPS,
    ZERO_LAYER_TOL,
    bn_scale,
    project_matrix,
    weight_to_matrix,
)
from lrpet_lightning.core.trace import trace_bn_pairs
from lrpet_lightning.core.transforms import attach_bn_pairs, project_layers_
from lrpet_lightning.core.walk import TargetLayer, select_layers

TARGET_SPEEDUP = 3.0
TARGET_REL_ERR = 1e-5
TARGET_FAST_SPEEDUP = 6.0
#: Relative size of the change one epoch of SGD makes between two projections ("trained").
TRAINED_CHANGE = 0.05


def _planned(model: nn.Module, config: LowRankConfig,
             bn_names: dict[str, str]) -> list[TargetLayer]:
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
    """The ground truth: the projection (docs/method.md) with BN rectification, full SVD in
    float64, on CPU."""
    out = {}
    for layer in layers:
        W = layer.module.weight
        bn = layer.bn
        scale = None if bn is None else bn_scale(bn.running_var, bn.eps, bn.weight).cpu()
        M = weight_to_matrix(W.detach()).double().cpu()
        out[layer.name] = project_matrix(M, layer.rank, scale=scale,
                                         svd_method="exact").matrix.reshape(W.shape)
    return out


@torch.no_grad()
def as_trained_(layers: list[TargetLayer], drift: bool = False) -> None:
    """Turn random-init weights into a mid-training state: the previous projection (rank r)
    plus a ``TRAINED_CHANGE`` random change, as one epoch of SGD leaves them. ``drift``: the
    change has a decaying spectrum (``s_i ~ 1/i``, as SGD updates concentrate in a few
    directions), so that its largest singular values, which sit at the cut, are larger."""
    generator = torch.Generator().manual_seed(1)
    for layer, projected in zip(layers, exact_float64(layers).values(), strict=True):
        noise = torch.randn(projected.shape, generator=generator, dtype=torch.float64)
        if drift:
            rows = projected.shape[0]
            n = min(rows, noise[0].numel())
            left = torch.randn(rows, n, generator=generator, dtype=torch.float64)
            decay = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
            noise = ((left * decay) @ noise.reshape(rows, -1)[:n]).reshape(projected.shape)
        noise *= TRAINED_CHANGE * projected.norm() / noise.norm()
        layer.module.weight.copy_(projected + noise)


def measure(state: str, args) -> dict[str, tuple[float, float]]:
    """Seconds and max relative error of each method on ResNet-50 in ``state``."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.2, 5.0)
                m.weight.uniform_(0.1, 2.0)
    config = LowRankConfig(rank_ratio=args.rank_ratio)  # default svd_method
    fast = LowRankConfig(rank_ratio=args.rank_ratio, svd_method="gram32")
    topr = LowRankConfig(rank_ratio=args.rank_ratio, svd_method="subspace")
    layers = select_layers(model, config)
    pairs = trace_bn_pairs(model, layers, torch.randn(2, 3, 224, 224))
    bn_names = {conv: bn for conv, (bn, _) in pairs.items()}
    attach_bn_pairs(layers, pairs)
    if state in ("trained", "drift"):
        as_trained_(layers, drift=state == "drift")
    truth = exact_float64(layers)
    model.to(args.device)

    # Each run gets a fresh deep copy; its layers are selected and BN-paired inside the run,
    # which costs microseconds (no forward pass) next to the projection.
    runs: dict[str, Callable[[nn.Module], None]] = {
        "reference loop (torch.svd f32)":
            lambda m: reference_projection_(_planned(m, config, bn_names)),
        f'default ("{config.svd_method}")':
            lambda m: project_layers_(_planned(m, config, bn_names), config),
        f'fast ("{fast.svd_method}")':
            lambda m: project_layers_(_planned(m, fast, bn_names), fast),
        f'top-r ("{topr.svd_method}")':
            lambda m: project_layers_(_planned(m, topr, bn_names), topr),
    }
    seconds, projected = _best_times(runs, model, args.repeats)
    return {label: (seconds[label], _max_rel_err(projected[label], truth)) for label in runs}


def main() -> None:
    args = parse_args(__doc__, lambda p: p.add_argument(
        "--states", nargs="+", choices=("init", "trained", "drift"),
        default=["init", "trained", "drift"]))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"torchvision resnet50, 53 convs BN-rectified (randomized BN stats), rank_ratio "
          f"{args.rank_ratio}; torch {torch.__version__}, {device}, "
          f"{torch.get_num_threads()} thread(s), load average {load}; best of "
          f"{args.repeats}, interleaved")
    print(f"{'state':8s} {'method':32s} {'seconds':>8s} {'speed-up':>9s} {'max rel err':>12s}")
    verdicts = []
    for state in args.states:
        results = measure(state, args)
        ref, default, fast, topr = results.values()
        for label, (sec, err) in results.items():
            print(f"{state:8s} {label:32s} {sec:8.3f} {ref[0] / sec:8.2f}x {err:12.2e}")
        speedup, fast_speedup = ref[0] / default[0], ref[0] / fast[0]
        met = speedup >= TARGET_SPEEDUP and default[1] <= TARGET_REL_ERR
        fast_met = fast_speedup >= TARGET_FAST_SPEEDUP
        topr_met = ref[0] / topr[0] >= TARGET_FAST_SPEEDUP and topr[1] <= TARGET_REL_ERR
        verdicts.append(
            f"{state}: default {speedup:.2f}x, error {default[1]:.1e} (target >= "
            f"{TARGET_SPEEDUP:g}x within {TARGET_REL_ERR:g}: {'MET' if met else 'NOT MET'}); "
            f"fast {fast_speedup:.2f}x, error {fast[1]:.1e} (target >= "
            f"{TARGET_FAST_SPEEDUP:g}x: {'MET' if fast_met else 'NOT MET'}); top-r "
            f"{ref[0] / topr[0]:.2f}x, error {topr[1]:.1e} (target >= "
            f"{TARGET_FAST_SPEEDUP:g}x within {TARGET_REL_ERR:g}: "
            f"{'MET' if topr_met else 'NOT MET'})")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
