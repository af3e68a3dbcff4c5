"""CPU inference latency of an LRPET-compressed ResNet-50 against the dense one.

torchvision ResNet-50 (random weights: latency does not depend on their values), every
conv projected and decomposed at ``--rank-ratio`` (0.38: 53.5 % fewer FLOPs), run at
224x224 for each ``--batch-sizes``. Prints latency ratios compact/dense measured side by
side in one run (interleaved, best of ``--repeats``):

* ``plain``: eval-mode models as they are — two convs per layer, BatchNorm separate, NCHW;
* ``folded+CL``: BatchNorm folded and channels_last, every layer kept factorized;
* ``prepared``: ``prepare_for_inference`` (the above, plus each factorized layer timed
  against its dense equivalent on its own activation shape and the faster form kept);

the dense model is in its best form (BN folded, channels_last) for the last two ratios.
The FLOPs ratio (``torch.utils.flop_counter``) is the limit to chase. A per-stage table
(stem, layer1..layer4) shows where latency falls short of FLOPs: each factorized layer of
the folded channels_last model timed against its dense equivalent on its own activation.

Run:  python benchmarks/inference.py [--batch-sizes 1 16] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from functools import partial

import torch
import torchvision
from torch import nn

from lrpet_lightning import compression_report, decompose_, project_low_rank_
from lrpet_lightning.core import CompressionReport, FactorizedLayer, decomposed_ranks
from lrpet_lightning.core.inference import prepare_for_inference, race

SIZE = 224


def compact_resnet50(rank_ratio: float) -> tuple[nn.Module, nn.Module]:
    """(dense, compact) ResNet-50 in eval mode; compact = projected then decomposed."""
    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    compact = copy.deepcopy(dense)
    x = torch.randn(2, 3, SIZE, SIZE)
    project_low_rank_(compact, rank_ratio=rank_ratio, example_inputs=x)
    decompose_(compact, rank_ratio=rank_ratio)
    return dense, compact.eval()


def is_channels_last(model: nn.Module) -> bool:
    """Whether ``model``'s spatial convs hold channels_last weights."""
    return any(
        isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
        and not m.weight.is_contiguous()
        and m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in model.modules()
    )


def bench_batch(
    dense: nn.Module, compact: nn.Module, report: CompressionReport, batch: int, repeats: int
) -> None:
    x = torch.randn(batch, 3, SIZE, SIZE, device=next(dense.parameters()).device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    dense_best = prepare_for_inference(dense, x, channels_last=True, latency_aware=False)
    folded = prepare_for_inference(compact, x, channels_last=True, latency_aware=False)
    prep_start = time.perf_counter()
    prepared = prepare_for_inference(compact, x, repeats=repeats)
    prep_s = time.perf_counter() - prep_start
    x_prepared = x_cl if is_channels_last(prepared) else x

    candidates = {
        "dense plain": lambda: dense(x),
        "compact plain": lambda: compact(x),
        "dense best": lambda: dense_best(x_cl),
        "compact folded+CL": lambda: folded(x_cl),
        "compact prepared": lambda: prepared(x_prepared),
    }
    with torch.no_grad():
        times = dict(zip(candidates, race(list(candidates.values()), repeats), strict=True))
    made_dense = sorted(set(decomposed_ranks(compact)) - set(decomposed_ranks(prepared)))

    print(f"\nbatch {batch}  (best of {repeats}, interleaved; set-up "
          f"{time.perf_counter() - start:.0f} s, of which prepare_for_inference {prep_s:.0f} s)")
    for name, t in times.items():
        print(f"  {name:18s} {1e3 * t:8.1f} ms")
    ratio = {
        "plain      (two convs per layer)  ": times["compact plain"] / times["dense plain"],
        "folded+CL  (all layers factorized)": times["compact folded+CL"] / times["dense best"],
        f"prepared   (latency-aware, CL={is_channels_last(prepared)!s:5s})":
            times["compact prepared"] / times["dense best"],
    }
    for name, value in ratio.items():
        print(f"  ratio {name}  {value:.3f}")
    print(f"  layers made dense by prepare_for_inference: {len(made_dense)} of "
          f"{len(decomposed_ranks(compact))}: {', '.join(made_dense) or '-'}")
    per_stage(folded, x_cl, report, repeats)


@torch.no_grad()
def per_stage(model: nn.Module, x: torch.Tensor, report: CompressionReport, repeats: int) -> None:
    """Per stage: FLOPs ratio and conv latency ratio factorized/dense, layer by layer."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str, module: nn.Module, args: tuple[torch.Tensor]) -> None:
        inputs[name] = args[0]

    handles = [m.register_forward_pre_hook(partial(keep_input, n)) for n, m in layers.items()]
    model(x)
    for handle in handles:
        handle.remove()
    denses = {n: m.to_dense().to(memory_format=torch.channels_last) for n, m in layers.items()}
    runs = []
    for name in layers:  # each layer's two forms side by side, all layers in one race
        runs += [partial(layers[name], inputs[name]), partial(denses[name], inputs[name])]
    times = race(runs, repeats)
    flops = {c.name: (c.dense_flops, c.compact_flops) for c in report.layers}
    stages: dict[str, list[float]] = {}
    slower: dict[str, list[str]] = {}
    for i, name in enumerate(layers):
        stage = name.split(".")[0] if name.startswith("layer") else "stem"
        t_fact, t_dense = times[2 * i], times[2 * i + 1]
        acc = stages.setdefault(stage, [0.0, 0.0, 0.0, 0.0])
        for j, v in enumerate((*flops[name], t_dense, t_fact)):
            acc[j] += v
        if t_fact >= t_dense:
            slower.setdefault(stage, []).append(f"{name} ({t_fact / t_dense:.2f})")
    print("  convs per stage, factorized/dense, each layer on its own activation:")
    print(f"    {'stage':8s} {'FLOPs':>6s} {'latency':>8s} {'dense ms':>9s}  "
          "layers slower factorized")
    for stage, (f_dense, f_fact, t_dense, t_fact) in stages.items():
        print(f"    {stage:8s} {f_fact / f_dense:6.3f} {t_fact / t_dense:8.3f} "
              f"{1e3 * t_dense:9.1f}  {', '.join(slower.get(stage, [])) or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-ratio", type=float, default=0.38)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")

    dense, compact = compact_resnet50(args.rank_ratio)
    report = compression_report(dense, compact, torch.randn(1, 3, SIZE, SIZE))
    dense, compact = dense.to(args.device), compact.to(args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"torchvision ResNet-50, rank_ratio {args.rank_ratio}, {device}, {args.threads} "
          f"thread(s), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"  {report.summary()}")
    print(f"  FLOPs ratio compact/dense {report.compact_flops / report.dense_flops:.3f}")
    for batch in args.batch_sizes:
        bench_batch(dense, compact, report, batch, args.repeats)


if __name__ == "__main__":
    main()
