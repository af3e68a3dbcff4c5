"""CPU latency at equal FLOPs: LRPET (ours) beside Torch-Pruning's channel pruning (issue 16).

torchvision ResNet-50 (random weights, BatchNorm statistics randomized: latency does not
depend on the values), 224x224, eval mode, ``torch.inference_mode``, ``--threads`` threads.
Every variant's FLOPs are counted the same way (``torch.utils.flop_counter``, as
``compression_report`` does, on the model as it runs), all variants run interleaved (one
run of each per round, ``--rounds`` rounds) and each latency printed is the median over
rounds of its time relative to the dense model's in the same round:

* ``dense``: BatchNorm folded, channels_last (the reference, 1.000) and contiguous;
* ``ours``: every conv projected at the ranks ``solve_ranks(target_flops_reduction=0.535)``
  gives, then ``decompose_``; ``prepared`` = ``prepare_for_inference``; ``factorized`` =
  every layer factorized, BatchNorm folded (channels_last and contiguous; and with every
  rank padded by zero channels to a multiple of 8, exact); ``rank_multiple=8`` / ``16`` =
  the ranks ``solve_ranks(rank_multiple=...)`` gives, its budget bisected to the same
  FLOPs (rounding to multiples moves budget between layers);
* ``torch-pruning``: ``tp.pruner.MetaPruner`` with L2 magnitude importance, global
  pruning, the final fc kept, the pruning ratio bisected until the FLOPs are within
  0.5 % of ours; with and without ``round_to=8``; BatchNorm folded.

Targets (issue 16): ours at or below Torch-Pruning's latency, and at most 0.52 of dense,
at batch 1 and 16. Needs the benchmark extra: ``pip install "torch-pruning>=1.6"``.

Run:  python benchmarks/vs_torch_pruning.py [--batch-sizes 1 16] [--rounds 20]
      [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable, Mapping

import torch
import torchvision
from inference import SIZE, is_channels_last
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrpet_lightning import decompose_, project_low_rank_, solve_ranks
from lrpet_lightning.core import decomposed_ranks
from lrpet_lightning.core.inference import (
    GemmFactorizedConv,
    median_ratio,
    output_error,
    pad_ranks,
    prepare_for_inference,
    time_rounds,
)
from lrpet_lightning.core.report import count_flops

TARGET_FLOPS_REDUCTION = 0.535
TARGET_LATENCY = 0.52
FLOPS_MATCH = 0.005  # Torch-Pruning's FLOPs within 0.5 % of ours


def randomize_batchnorms_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)


def flops(model: nn.Module, x: torch.Tensor) -> int:
    return count_flops(model, x)[""]


def ours(dense: nn.Module, ranks: Mapping[str, int], x: torch.Tensor) -> nn.Module:
    """``dense`` projected at ``ranks`` and decomposed (a copy, eval mode)."""
    compact = copy.deepcopy(dense)
    project_low_rank_(compact, ranks=dict(ranks), example_inputs=x)
    decompose_(compact, ranks=dict(ranks))
    return compact.eval()


def bisect(fn: Callable[[float], float], target: float, low: float, high: float,
           steps: int = 20) -> float:
    """The argument in [low, high] where the decreasing ``fn`` is within FLOPS_MATCH of
    ``target`` (or the closest after ``steps`` halvings)."""
    best, best_gap = low, float("inf")
    for _ in range(steps):
        mid = (low + high) / 2
        value = fn(mid)
        gap = abs(value / target - 1)
        if gap < best_gap:
            best, best_gap = mid, gap
        if gap <= FLOPS_MATCH / 2:
            break
        low, high = (mid, high) if value > target else (low, mid)
    return best


def ranks_multiple_of(dense: nn.Module, target: int, x: torch.Tensor,
                      multiple: int) -> dict[str, int]:
    """``solve_ranks(rank_multiple=multiple)``'s ranks, with the FLOPs reduction asked of it
    bisected so that the decomposed model counts ``target`` FLOPs within ``FLOPS_MATCH``
    (the solver meets a budget from below; rounding to multiples overshoots it)."""
    def solved(reduction: float) -> dict[str, int]:
        return solve_ranks(dense, x, target_flops_reduction=reduction,
                           rank_multiple=multiple).ranks

    def counted(reduction: float) -> float:
        return flops(ours(dense, solved(reduction), x), x)

    return solved(bisect(counted, target, TARGET_FLOPS_REDUCTION - 0.03,
                         TARGET_FLOPS_REDUCTION, steps=8))


def torch_pruned(tp, dense: nn.Module, x: torch.Tensor, ratio: float,
                 round_to: int | None) -> nn.Module:
    """A copy of ``dense`` with channels pruned by Torch-Pruning (L2, global)."""
    model = copy.deepcopy(dense)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=ratio, ignored_layers=[model.fc], round_to=round_to,
    )
    pruner.step()
    return model.eval()


def matched_torch_pruned(tp, dense: nn.Module, target: int, x: torch.Tensor,
                         round_to: int | None) -> nn.Module:
    ratio = bisect(lambda r: flops(torch_pruned(tp, dense, x, r, round_to), x),
                   target, 0.0, 0.9)
    return torch_pruned(tp, dense, x, ratio, round_to)


def gemm_layers(model: nn.Module) -> int:
    """How many layers ``prepare_for_inference`` runs as two matrix products."""
    return sum(isinstance(m, GemmFactorizedConv) for m in model.modules())


def build_variants(batch: int, dense: nn.Module, compact: nn.Module,
                   multiples: dict[int, nn.Module], pruned: dict[str, nn.Module],
                   repeats: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """``{name: (prepared model, the input it runs on)}`` at ``batch``."""
    x = torch.randn(batch, 3, SIZE, SIZE)
    cl = x.contiguous(memory_format=torch.channels_last)

    def folded(model: nn.Module, channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
        prepared = prepare_for_inference(model, x, channels_last=channels_last,
                                         latency_aware=False)
        return prepared, cl if channels_last else x

    prepared = prepare_for_inference(compact, x, repeats=repeats)
    variants = {
        "dense  BN folded, channels_last": folded(dense, True),
        "dense  BN folded, contiguous": folded(dense, False),
        "ours   prepare_for_inference": (prepared, cl if is_channels_last(prepared) else x),
        "ours   factorized, channels_last": folded(compact, True),
        "ours   factorized, contiguous": folded(compact, False),
        "ours   factorized, ranks zero-padded to 8k (exact)": folded(pad_ranks(compact), True),
    }
    for multiple, model in multiples.items():
        fast = prepare_for_inference(model, x, repeats=repeats)
        variants[f"ours   rank_multiple={multiple}, prepare_for_inference"] = (
            fast, cl if is_channels_last(fast) else x)
        variants[f"ours   rank_multiple={multiple}, factorized, channels_last"] = (
            folded(model, True))
    for name, model in pruned.items():
        variants[f"{name}, channels_last"] = folded(model, True)
        variants[f"{name}, contiguous"] = folded(model, False)
    return variants


def main(argv: list[str] | None = None) -> dict[int, dict[str, tuple[float, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds timed")
    parser.add_argument("--prepare-repeats", type=int, default=5,
                        help="prepare_for_inference's repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 rounds, prepare repeats 1, batch size 1 only")
    args = parser.parse_args(argv)
    try:
        import torch_pruning as tp
    except ImportError:
        print('vs_torch_pruning.py needs Torch-Pruning: pip install "torch-pruning>=1.6" '
              '(or pip install -e ".[bench]")', file=sys.stderr)
        raise SystemExit(2) from None
    if args.quick:
        args.rounds, args.prepare_repeats, args.batch_sizes = 3, 1, [1]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torchvision ResNet-50, {SIZE}x{SIZE}, CPU, {args.threads} thread(s), "
          f"torch {torch.__version__}, torch-pruning {tp.__version__}; load average at the "
          f"start {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    randomize_batchnorms_(dense)
    x1 = torch.randn(1, 3, SIZE, SIZE)
    dense_flops = flops(dense, x1)
    solution = solve_ranks(dense, x1, target_flops_reduction=TARGET_FLOPS_REDUCTION)
    compact = ours(dense, solution.ranks, x1)
    target = flops(compact, x1)
    multiples = {m: ours(dense, ranks_multiple_of(dense, target, x1, m), x1) for m in (8, 16)}
    pruned = {
        "torch-pruning L2 global": matched_torch_pruned(tp, dense, target, x1, None),
        "torch-pruning L2 global round_to=8": matched_torch_pruned(tp, dense, target, x1, 8),
    }
    print(f"  ours: rank ratio {solution.rank_ratio:.4f}, FLOPs ratio "
          f"{target / dense_flops:.4f}; set-up {time.perf_counter() - start:.0f} s")

    results: dict[int, dict[str, tuple[float, float]]] = {}
    for batch in args.batch_sizes:
        variants = build_variants(batch, dense, compact, multiples, pruned,
                                  args.prepare_repeats)
        names = list(variants)
        with torch.inference_mode():
            rounds = time_rounds([lambda m=m, x=x: m(x) for m, x in variants.values()],
                                 args.rounds)
            x = variants[names[0]][1].contiguous()
            # ours computes the projected model's function, not the dense one's
            expected = {"dense": dense(x), "ours": compact(x)}
            results[batch] = {}
            print(f"\nbatch {batch}: median over {args.rounds} interleaved rounds; dense "
                  f"{1e3 * sorted(rounds[0])[len(rounds[0]) // 2]:.1f} ms")
            print(f"  {'variant':50s} {'FLOPs':>6s} {'latency':>8s}  note")
            for name, times in zip(names, rounds, strict=True):
                model, xv = variants[name]
                ratio = median_ratio(times, rounds[0])
                f = flops(model, xv[:1]) / dense_flops
                results[batch][name] = (f, ratio)
                note = ""
                family = name.split()[0]
                if family in expected and "multiple" not in name:  # other ranks and weights
                    error = output_error(model(xv), expected[family])
                    note = f"output rel err {error:.1e}"
                if name == "ours   prepare_for_inference":
                    ranks = decomposed_ranks(model)
                    note += (f"; {len(ranks)} of {len(decomposed_ranks(compact))} layers "
                             f"factorized ({sum(r != solution.ranks[n] for n, r in ranks.items())}"
                             f" padded, {gemm_layers(model)} as two matrix products), "
                             f"channels_last {is_channels_last(model)}")
                print(f"  {name:50s} {f:6.3f} {ratio:8.3f}  {note}")
            verdict(results[batch])
    print(f"\n{time.perf_counter() - start:.0f} s in all; load average at the end "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return results


def verdict(result: Mapping[str, tuple[float, float]]) -> None:
    """Print whether ours meets the issue's targets (its best form vs Torch-Pruning's)."""
    prepared = result["ours   prepare_for_inference"][1]
    best_tp_name = min((n for n in result if n.startswith("torch-pruning")),
                       key=lambda n: result[n][1])
    best_tp = result[best_tp_name][1]
    print(f"  target: prepare_for_inference <= torch-pruning's best ({best_tp:.3f}, "
          f"{best_tp_name.removeprefix('torch-pruning ')}): "
          f"{'MET' if prepared <= best_tp else 'MISSED'} ({prepared:.3f}); <= "
          f"{TARGET_LATENCY} of dense: {'MET' if prepared <= TARGET_LATENCY else 'MISSED'}")


if __name__ == "__main__":
    main()
