"""How much do stale BatchNorm statistics cost finished runs? Scores each compact model as
saved and again after ``bn_recalibration`` (its BatchNorm statistics recomputed on training
batches; the app's step, ``lrpet_lightning.app.train.recalibrate_bn``).

A projection changes the weights without a forward pass, so after the last one the running
statistics describe the weights before it. With a projection after every epoch the last
one changes little; with rarer projections or high compression the difference is the point
of this script. Runs are found as ``compact_model.pt`` files under the given folders (e.g.
a ``lrpet-train -m`` sweep dir), each with its ``results.json``.

Run:  python benchmarks/bn_recalibration.py DIR [DIR ...] [--batches 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from lrpet_lightning.app.compact import load_compact_datamodule, load_compact_model
from lrpet_lightning.app.train import recalibrate_bn


@torch.no_grad()
def top1(net: torch.nn.Module, datamodule: Any) -> float:
    """Top-1 accuracy of ``net`` (eval mode) on ``datamodule``'s test split."""
    net.eval()
    right = total = 0
    for x, y in datamodule.test_dataloader():
        right += int((net(x).argmax(1) == y).sum())
        total += len(y)
    return right / total


def rescore(path: Path, batches: int) -> dict[str, Any]:
    """``path``'s run: its settings, and its test top-1 before and after recalibration."""
    results = json.loads((path.parent / "results.json").read_text())
    datamodule = load_compact_datamodule(path)
    datamodule.setup("fit")
    net = load_compact_model(path, datamodule=datamodule)
    before = top1(net, datamodule)
    seed = _seed(path)
    used = recalibrate_bn(net, datamodule, batches, seed)
    return {"run": str(path.parent), "variant": results.get("variant"),
            "flops_reduction": results.get("flops_reduction"), "seed": seed,
            "test_acc_saved": before, "test_acc_recalibrated": top1(net, datamodule),
            "batches": used}


def _seed(path: Path) -> int:
    """The run's ``seed``, from Hydra's record of its config (0 if there is none)."""
    config = path.parent / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        return int(OmegaConf.load(config).get("seed", 0))
    return 0


def _group(row: dict[str, Any]) -> str:
    """The sweep (the run dir's parent, its last two folders), the variant and the FLOPs."""
    sweep = "/".join(Path(row["run"]).parent.parts[-2:])
    return f"{sweep} / {row['variant']} / {row['flops_reduction']}"


def table(rows: list[dict[str, Any]]) -> str:
    """Mean ± std of each group's test top-1 (a group: one sweep's runs of one variant at
    one FLOPs reduction)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_group(row)].append(row)
    lines = ["| sweep / variant | FLOPs reduction | seeds | test top-1 as saved | after "
             "recalibration |", "|---|---:|---|---:|---:|"]
    for name, group in sorted(groups.items()):
        def stat(key: str, group=group) -> str:
            values = [100 * r[key] for r in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            per_seed = "/".join(f"{v:.1f}" for v in values)
            return f"{statistics.mean(values):.2f} ± {spread:.2f} ({per_seed})"
        flops = group[0]["flops_reduction"]
        label = name.rsplit(" / ", 1)[0]
        measured = f"{100 * flops:.2f} %" if flops is not None else "not measured"
        lines.append(f"| {label} | {measured} | "
                     f"{','.join(str(r['seed']) for r in group)} | {stat('test_acc_saved')} | "
                     f"{stat('test_acc_recalibrated')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="folders holding finished runs")
    parser.add_argument("--batches", type=int, default=20,
                        help="training batches to recompute the statistics on (default 20)")
    parser.add_argument("--json", type=Path, help="also write the per-run rows here")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches must be an int >= 1, got {args.batches}")
    paths = sorted(p for d in args.dirs for p in d.rglob("compact_model.pt"))
    if not paths:
        print(f"no compact_model.pt under {', '.join(map(str, args.dirs))}: nothing to score",
              file=sys.stderr)
        return 2
    rows = [rescore(p, args.batches) for p in paths]
    rows.sort(key=lambda r: (_group(r), r["seed"]))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
