"""Accuracy ablation on real images: does LRPET beat its alternatives here?

On scikit-learn's bundled digits (1,797 real 8x8 images; the app's ``DigitsDataModule`` with
the default app run's settings: 16x16, random 2-pixel shifts, batch 64, fixed stratified
split) one CIFAR ResNet-20 is trained by every variant with the same optimizer (the app's
``ImageClassifier``: SGD momentum 0.9, weight decay 1e-4, cosine schedule) and the same total
number of epochs, for several seeds, at two compression levels:

- ``dense``        the uncompressed baseline (no callback);
- ``lrpet``        ``LowRankProjectionCallback`` with energy transfer and BN rectification,
                   a projection after every epoch, decomposed at fit end;
- ``lrpet_no_et``  the same without energy transfer;
- ``lrpet_no_bn``  the same without BN rectification;
- ``svd_ft``       "SVD + fine-tune": train dense for (1 - ft_share) of the epochs, then
                   ``decompose_`` at the same ranks (plain truncated SVD) and fine-tune the
                   thin model for the remaining ft_share of the epochs (default 1/3; fine-tune
                   lr ``--ft-lr``, cosine). The dense phase is shared by both levels of a seed;
- ``thin_init``    decomposed at initialization at the same ranks (random weights truncated
                   with energy transfer: ``variant=thin_init`` of the app) and the thin model
                   trained from scratch for all the epochs;
- ``spectrum``     non-uniform ranks from a FLOPs budget (``allocation="spectrum"``,
                   ``target_flops_reduction`` = the uniform level's reduction), when
                   ``LowRankProjectionCallback`` accepts ``target_flops_reduction``.

Every variant is tested once, after its last epoch (no checkpoint selection). The table gives
the compact model's test top-1 (mean ± sample std over seeds) and the FLOPs / parameter
reductions from ``compression_report``. Within a seed, every variant starts from the same
initial weights.

Run:  python benchmarks/accuracy_digits.py [--seeds 0 1 2] [--variants lrpet svd_ft ...]
          [--epochs 30] [--jobs 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import lightning as L
import torch

from lrpet_lightning import LowRankProjectionCallback, compression_report, decompose_
from lrpet_lightning.app.data import DigitsDataModule
from lrpet_lightning.app.module import ImageClassifier
from lrpet_lightning.app.variants import decompose_thin_
from lrpet_lightning.core import LowRankConfig
from lrpet_lightning.models import build_model

ARCH = "resnet20"
#: Compression levels: kept rank fraction -> FLOPs reduction for ResNet-20 at 16x16
#: (compression_report): 0.20 -> 79.1 % (the paper's ResNet-56 setting), 0.08 -> 92.4 %.
LEVELS = {"80": 0.20, "92": 0.08}
VARIANTS = ("dense", "lrpet", "lrpet_no_et", "lrpet_no_bn", "svd_ft", "thin_init", "spectrum")
_LRPET_FLAGS = {"lrpet": {}, "lrpet_no_et": {"energy_transfer": False},
                "lrpet_no_bn": {"bn_rectification": False}}


@dataclass(frozen=True)
class Settings:
    """What every run of one benchmark invocation shares."""

    epochs: int = 30
    ft_share: float = 1 / 3
    ft_lr: float = 0.01
    data: tuple[tuple[str, Any], ...] = ()   # DigitsDataModule kwargs (the app's defaults)
    optim: tuple[tuple[str, Any], ...] = ()  # ImageClassifier kwargs (the app's defaults)
    limit_train_batches: int | None = None   # for smoke tests

    @property
    def ft_epochs(self) -> int:
        return max(1, round(self.epochs * self.ft_share))


def spectrum_supported() -> bool:
    """Whether the callback takes a FLOPs budget (issue 8, being implemented in parallel)."""
    return "target_flops_reduction" in inspect.signature(LowRankProjectionCallback).parameters


def app_defaults() -> tuple[dict[str, Any], dict[str, Any]]:
    """The default app run's datamodule and optimizer settings, read from its Hydra config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lrpet_lightning.app.train import config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("train", overrides=["output_dir=unused"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if not str(data.pop("_target_")).endswith("DigitsDataModule"):
        raise RuntimeError("the app's default data config is no longer the digits")
    return data, OmegaConf.to_container(cfg.optim, resolve=True)


def uniform_reduction(rank_ratio: float, image_size: int) -> tuple[float, float]:
    """FLOPs and parameter reductions of ResNet-20 decomposed at ``rank_ratio``."""
    with torch.device("meta"):  # shapes are all a count needs: no SVD work
        net = build_model(ARCH, num_classes=10, in_channels=1)
        dense = copy.deepcopy(net)
        decompose_(net, rank_ratio=rank_ratio)
        report = compression_report(dense, net, torch.empty(1, 1, image_size, image_size))
    return report.flops_reduction, report.params_reduction


# ------------------------------------------------------------------------------ one run
def _fit_and_test(net: torch.nn.Module, s: Settings, epochs: int, lr: float | None = None,
                  callbacks: list[L.Callback] | None = None) -> float:
    dm = DigitsDataModule(**dict(s.data))
    optim = dict(s.optim)
    if lr is not None:
        optim["lr"] = lr
    module = ImageClassifier(net, dm.num_classes, max_epochs=epochs, **optim)
    # The callback writes its compression report into the trainer's root dir: not the cwd.
    with tempfile.TemporaryDirectory(prefix="accuracy_digits_") as root:
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks or [],
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            limit_train_batches=s.limit_train_batches, deterministic=False,
            default_root_dir=root,
        )
        trainer.fit(module, datamodule=dm)
        return float(trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"])


def _new_net(seed: int) -> torch.nn.Module:
    L.seed_everything(seed, verbose=False)  # the same initial weights for every variant
    return build_model(ARCH, num_classes=10, in_channels=1)


def _record(variant: str, level: str | None, seed: int, acc: float, flops: float,
            params: float, seconds: float, **extra: Any) -> dict[str, Any]:
    return dict(variant=variant, level=level, seed=seed, test_acc=acc, flops_reduction=flops,
                params_reduction=params, seconds=seconds, **extra)


def run_task(task: tuple[str, int, tuple[str, ...], Settings]) -> list[dict[str, Any]]:
    """One variant for one seed (all requested levels for ``svd_ft``); returns records."""
    variant, seed, levels, s = task
    t0 = time.perf_counter()
    if variant == "dense":
        acc = _fit_and_test(_new_net(seed), s, s.epochs)
        return [_record(variant, None, seed, acc, 0.0, 0.0, time.perf_counter() - t0)]
    if variant == "svd_ft":
        return _svd_finetune(seed, levels, s)
    (level,) = levels
    if variant == "thin_init":
        return [_thin_init(seed, level, s)]
    rank_ratio = LEVELS[level]
    if variant == "spectrum":
        image_size = dict(s.data)["image_size"]
        target = uniform_reduction(rank_ratio, image_size)[0]
        # The API of issue 8 (allocation="spectrum" + target_flops_reduction).
        callback = LowRankProjectionCallback(target_flops_reduction=target, allocation="spectrum",
                                             decompose_on_fit_end=True)
    else:
        callback = LowRankProjectionCallback(rank_ratio=rank_ratio, decompose_on_fit_end=True,
                                             **_LRPET_FLAGS[variant])
    net = _new_net(seed)
    acc = _fit_and_test(net, s, s.epochs, callbacks=[callback])
    report = callback.compression
    return [_record(variant, level, seed, acc, report.flops_reduction, report.params_reduction,
                    time.perf_counter() - t0)]


def _thin_init(seed: int, level: str, s: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    net = _new_net(seed)
    dense = copy.deepcopy(net)
    image_size = dict(s.data)["image_size"]
    x = torch.zeros(2, 1, image_size, image_size)
    settings = {f.name: getattr(LowRankConfig(rank_ratio=LEVELS[level]), f.name)
                for f in fields(LowRankConfig)}
    decompose_thin_(net, settings, x, truncate_only=False)
    report = compression_report(dense, net, x[:1])
    acc = _fit_and_test(net, s, s.epochs)
    return _record("thin_init", level, seed, acc, report.flops_reduction,
                   report.params_reduction, time.perf_counter() - t0)


def _svd_finetune(seed: int, levels: tuple[str, ...], s: Settings) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    pre_epochs = s.epochs - s.ft_epochs
    if pre_epochs < 1:
        raise ValueError(f"svd_ft needs epochs >= 2 to split into dense + fine-tune, got "
                         f"{s.epochs}")
    dense = _new_net(seed)
    dense_acc = _fit_and_test(dense, s, pre_epochs)
    shared = time.perf_counter() - t0
    records = []
    image_size = dict(s.data)["image_size"]
    for level in levels:
        t1 = time.perf_counter()
        thin = copy.deepcopy(dense)
        decompose_(thin, rank_ratio=LEVELS[level])  # truncated SVD at the LRPET ranks
        x = torch.zeros(1, 1, image_size, image_size)
        report = compression_report(dense, thin, x)
        L.seed_everything(seed, verbose=False)
        acc = _fit_and_test(thin, s, s.ft_epochs, lr=s.ft_lr)
        records.append(_record("svd_ft", level, seed, acc, report.flops_reduction,
                               report.params_reduction, shared + time.perf_counter() - t1,
                               dense_phase_acc=dense_acc))
    return records


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)  # tiny models: extra intra-op threads only spin
    _quiet()


_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lrpet_lightning")


def _quiet() -> dict[str, int]:
    """Silence Lightning's per-fit chatter; returns the log levels it replaced."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*val_dataloader.*")
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return levels


# ------------------------------------------------------------------------------- report
def _fmt_pct(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.2f} (1 seed)"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def format_table(records: list[dict[str, Any]], variants: list[str]) -> str:
    """A Markdown table, one row per (level, variant), in the order of ``variants``."""
    rows = ["| level | variant | FLOPs reduction | params reduction | compact test top-1 "
            "(%, mean ± std) | seeds | per seed (%) |", "|---|---|---:|---:|---:|---:|---|"]
    for level in [None, *LEVELS]:
        for variant in variants:
            group = sorted((r for r in records if r["variant"] == variant and r["level"] == level),
                           key=lambda r: r["seed"])
            if not group:
                continue
            accs = [r["test_acc"] for r in group]
            name = "dense" if level is None else f"~{level} % (rank_ratio {LEVELS[level]})"
            per_seed = ", ".join(f"{100 * a:.2f}" for a in accs)
            # Budget-solved ranks (spectrum) may differ between seeds: show the mean.
            flops = statistics.fmean(r["flops_reduction"] for r in group)
            params = statistics.fmean(r["params_reduction"] for r in group)
            rows.append(f"| {name} | {variant} | {100 * flops:.1f} % | {100 * params:.1f} % | "
                        f"{_fmt_pct(accs)} | {len(group)} | {per_seed} |")
    return "\n".join(rows)


def _tasks(variants: list[str], seeds: list[int], levels: list[str],
           s: Settings) -> list[tuple[str, int, tuple[str, ...], Settings]]:
    tasks = []
    for seed in seeds:
        for variant in variants:
            if variant == "dense" or variant == "svd_ft":
                tasks.append((variant, seed, tuple(levels), s))
            else:
                tasks += [(variant, seed, (level,), s) for level in levels]
    # Longest first (svd_ft trains 1 + ft_share x (levels - 1) budgets) keeps workers busy.
    return sorted(tasks, key=lambda t: t[0] != "svd_ft")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="default: all (spectrum only when the callback supports it)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--levels", nargs="+", choices=sorted(LEVELS), default=list(LEVELS))
    parser.add_argument("--epochs", type=int, default=30, help="total epochs of every variant")
    parser.add_argument("--ft-share", type=float, default=1 / 3,
                        help="svd_ft: share of the epochs spent fine-tuning the thin model")
    parser.add_argument("--ft-lr", type=float, default=0.01, help="svd_ft: fine-tuning lr")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel worker processes (one thread each)")
    parser.add_argument("--limit-train-batches", type=int, default=None,
                        help="for smoke tests only")
    parser.add_argument("--json", default=None, help="also write every run's record here")
    args = parser.parse_args(argv)
    if not 0.0 < args.ft_share < 1.0:
        parser.error(f"--ft-share must be in (0, 1), got {args.ft_share}")
    threads = torch.get_num_threads()
    with warnings.catch_warnings():  # leave the caller's warning filters, log levels, threads
        levels = _quiet()
        try:
            return _run(args)
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    notes = []
    variants = list(args.variants or VARIANTS)
    if "spectrum" in variants and not spectrum_supported():
        variants.remove("spectrum")
        notes.append("spectrum: skipped - LowRankProjectionCallback does not accept "
                      "target_flops_reduction yet (issue 8)")
    data, optim = app_defaults()
    s = Settings(epochs=args.epochs, ft_share=args.ft_share, ft_lr=args.ft_lr,
                 data=tuple(data.items()), optim=tuple(optim.items()),
                 limit_train_batches=args.limit_train_batches)
    tasks = _tasks(variants, args.seeds, args.levels, s)

    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    done = 0

    def collect(result: list[dict[str, Any]]) -> None:
        nonlocal done
        done += 1
        records.extend(result)
        for r in result:
            print(f"[{done}/{len(tasks)} {time.perf_counter() - t0:6.0f} s] {r['variant']:<12} "
                  f"level={r['level']} seed={r['seed']} top-1={100 * r['test_acc']:.2f} % "
                  f"({r['seconds']:.0f} s)", file=sys.stderr, flush=True)

    if args.jobs > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs, initializer=_init_worker, initargs=(1,)) as pool:
            for result in pool.imap_unordered(run_task, tasks):
                collect(result)
    else:
        _init_worker(1)
        for task in tasks:
            collect(run_task(task))
    wall = time.perf_counter() - t0

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{ARCH} on digits ({data['image_size']}x{data['image_size']}, "
          f"augment={data['augment']}), {args.epochs} epochs per variant (svd_ft: "
          f"{args.epochs - s.ft_epochs} dense + {s.ft_epochs} fine-tune at lr {args.ft_lr}), "
          f"SGD lr {optim['lr']} {optim['scheduler']}, seeds {args.seeds}; torch "
          f"{torch.__version__}, {args.jobs} job(s); wall {wall:.0f} s; load average {load}")
    print(format_table(records, variants))
    for note in notes:
        print(note)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"settings": {**asdict(s), "data": data, "optim": optim},
                       "records": records, "notes": notes, "wall_s": wall}, f, indent=2)
    return records


if __name__ == "__main__":
    main()
