"""``lrpet-train``: the Hydra training app. ``train(cfg)`` is a plain function tests call.

A run is four steps: :func:`~lrpet_lightning.app.build.build` (settings checked, run dir
claimed, data, model, callbacks and trainer built), :func:`fit`, :func:`evaluate` (the
compact model, its compression report and its scores) and :func:`write` (the reports, the
compact model, the plot and ``results.json``, whose keys :mod:`~lrpet_lightning.app.schema`
defines). With ``spawn_ranks=true`` each of ``trainer.devices`` processes runs all four.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lrpet_lightning.app.build import Run, build, data_config
from lrpet_lightning.app.compact import input_spec, load_compact_model
from lrpet_lightning.app.protocol import protocol_results
from lrpet_lightning.app.results import (
    count_compression,
    finished_results,
    finite_weights,
    json_safe,
    objective_value,
    summary,
)
from lrpet_lightning.app.rundir import check_compact_model_name, check_writable, claim_run_dir
from lrpet_lightning.app.schema import STATUSES
from lrpet_lightning.app.spawn import check_strategy, spawns_here, train_spawned
from lrpet_lightning.callback import LowRankProjectionCallback
from lrpet_lightning.core.batchnorm import (
    load_norm_statistics_,
    norm_statistics,
    recalibrate_batchnorms_,
)
from lrpet_lightning.core.checkpoint import atomic_write, save_compact
from lrpet_lightning.core.report import CompressionReport
from lrpet_lightning.core.transforms import decompose_, decomposed_ranks
from lrpet_lightning.core.walk import copy_model
from lrpet_lightning.models import build_model
from lrpet_lightning.plots import layer_spectra, plot_compression

__all__ = ["STATUSES", "config_dir", "evaluate", "fit", "load_compact_model", "main",
           "recalibrate_bn", "train", "write"]

log = logging.getLogger(__name__)


def config_dir() -> Path:
    """The Hydra ``conf/`` folder, shipped inside the package (top-level ``conf/`` links here)."""
    return Path(__file__).resolve().parent.parent / "conf"


@dataclass
class Evaluation:
    """What :func:`evaluate` found: the final status and the compact model's figures."""

    status: str
    usable: bool  # the weights are finite: scored, saved and plotted
    compression: CompressionReport | None
    val: dict[str, float]
    test: dict[str, float]
    bn_batches: int | None = None  # batches the BatchNorm statistics were recomputed on


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, compress and test one model as ``cfg`` says; return and write ``results.json``.

    Writes into ``cfg.output_dir``: logger output, checkpoints, ``compression_report.json``,
    ``.md`` and ``.png``, the compact model (``cfg.compact_model_name``) and ``results.json``.
    With ``cfg.objective.metric`` set, ``results["objective"]`` is the number a sweeper
    maximizes (``lrpet-train`` returns it to Hydra).

    ``results["status"]`` is one of :data:`STATUSES` (their meaning, and every key's:
    :data:`lrpet_lightning.app.schema.RESULT_KEYS`); a relaunch of a finished run leaves
    its results.json as it was and returns it. ``results["errors"]`` lists the steps after
    training that failed (decomposition, validation, test, reports, plot, compact model):
    they are logged and recorded, and never lose the rest of the results.

    Raises:
        FileExistsError: ``cfg.output_dir`` holds another run (see ``claim_run_dir``).
        OSError: ``cfg.output_dir`` is not writable (checked before training).
        TypeError, ValueError: a bad ``compact_model_name``, ``trainer.strategy`` (a
            multiprocessing one), ``optim.*`` or ``objective.*`` setting.
    """
    check_compact_model_name(cfg.compact_model_name)
    check_strategy(cfg)
    if spawns_here(cfg):
        data_config(cfg)  # a global batch that does not divide is refused before spawning
        check_writable(Path(cfg.output_dir))
        claim_run_dir(cfg, Path(cfg.output_dir), delete=False)  # refuse before spawning
        return train_spawned(cfg)
    run = build(cfg)
    log.info("training %s on %s for %s epoch(s)%s; outputs in %s", cfg.model.arch,
             type(run.datamodule).__name__, cfg.trainer.max_epochs,
             f", resuming from {cfg.ckpt_path}" if cfg.get("ckpt_path") else "", run.out)
    status = fit(run)
    if status == "already_finished":
        kept = _kept_results(run)
        if kept is not None:
            return kept
    return write(run, evaluate(run, status))


def fit(run: Run) -> str:
    """Step 2: ``trainer.fit``; returns the status training ended with.

    A failure before training ended is raised (the checkpoints are there to resume from);
    one after it (a divergence, or the fit-end steps such as the callback's decomposition)
    is recorded in ``run.errors`` rather than lose the run.
    """
    module, probe = run.module, run.probe
    status = "finished"
    try:
        run.trainer.fit(module, datamodule=run.datamodule, ckpt_path=run.cfg.get("ckpt_path"))
    except Exception as err:
        if module.diverged_at is None and not probe.trained:
            raise
        log.error("fit failed after training: %s: %s", type(err).__name__, err)
        run.errors.append({"step": "fit end", "error": f"{type(err).__name__}: {err}"})
        status = "failed" if module.diverged_at is None else status
    if run.cfg.get("ckpt_path") is not None and probe.batches == 0 \
            and module.diverged_at is None:
        status = "already_finished"  # Lightning restored a finished loop and trained nothing
    if module.diverged_at is not None:
        status = "diverged"
        log.error("the training loss diverged (%s) at epoch %s, step %s; training stopped",
                  module.diverged_at["loss"], module.diverged_at["epoch"],
                  module.diverged_at["step"])
    return status


def _kept_results(run: Run) -> dict[str, Any] | None:
    """A relaunch of a finished run: its results.json, left as it was (None if it has none)."""
    finished_before = finished_results(run.out)
    if finished_before is None:
        log.warning("%s is at the end of training but %s holds no finished results.json: "
                    "evaluating and saving the checkpoint's model again", run.cfg.ckpt_path,
                    run.out)
        return None
    if run.kept_metrics is not None:  # the CSV logger restarted metrics.csv: put it back
        os.replace(run.kept_metrics[1], run.kept_metrics[0])
    log.info("%s is a finished run (nothing left to train); its results.json is left as it "
             "was", run.cfg.ckpt_path)
    return {**finished_before, "status": "already_finished"}


def evaluate(run: Run, status: str) -> Evaluation:
    """Step 3: the compact model, its compression report, and its validation/test scores.

    The callback decomposes at fit end (``decompose_on_fit_end: true`` in the app's config);
    what it left dense (a relaunch that trained nothing, or ``decompose_on_fit_end=false``)
    is decomposed here, at the callback's ranks: the weights are exactly low rank, so the
    split keeps the model's function. A run always ends with a compact model.
    """
    net, lrpet = run.net, run.lrpet
    usable = finite_weights(net)
    if not usable and status == "finished":  # e.g. an overflow in BatchNorm statistics
        status = "diverged"
        log.error("the weights hold NaN/inf after training: status diverged")
    # status failed: the fit-end steps failed, so the callback's report may not be this model's
    compression = lrpet.compression if lrpet and usable and status != "failed" else None
    if usable and lrpet is not None and lrpet.ranks and not decomposed_ranks(net):
        dense = copy_model(net) if compression is None and status != "failed" else None
        run.guard("decompose", decompose_, run.module, ranks=lrpet.ranks,
                  include_linear=lrpet.config.include_linear)
        if dense is not None and decomposed_ranks(net):
            # No report from the callback (a relaunch after training, or report=false):
            # count it here rather than write a FLOPs reduction nobody measured.
            compression = run.guard("compression report", count_compression, dense, net,
                                    run.datamodule)
    # A thin baseline, or a run continued from a checkpoint that held only thin layers
    # (the callback had nothing to project, so no report): count against the dense model.
    # Not after a failed fit end: no figure for a model the run does not hand back.
    continued = compression is None and status != "failed"
    if usable and decomposed_ranks(net) and (run.variant != "lrpet" or continued):
        dense = build_model(run.cfg.model.arch, num_classes=run.datamodule.num_classes,
                            in_channels=run.datamodule.in_channels,
                            small_input=run.cfg.model.small_input)
        compression = run.guard("compression report", count_compression, dense, net,
                                run.datamodule)
    bn_batches = None
    if usable and run.cfg.get("bn_recalibration", 0):
        bn_batches = run.guard("BatchNorm recalibration", recalibrate_bn, net, run.datamodule,
                               run.cfg.bn_recalibration, run.cfg.seed,
                               run.trainer.strategy.root_device)
        if run.trainer.world_size > 1:  # rank 0's statistics on every rank, whatever each
            run.guard("BatchNorm recalibration", _share_bn_statistics, run)  # did (no hang)
    val: list[dict[str, float]] = [{}]
    test: list[dict[str, float]] = [{}]
    if usable:
        val = run.guard("validate", run.trainer.validate, run.module,
                        datamodule=run.datamodule, verbose=False) or [{}]
        if run.cfg.test:
            test = run.guard("test", run.trainer.test, run.module, datamodule=run.datamodule,
                             verbose=False) or [{}]
    if status == "diverged" or not usable:  # the last finite metrics, not NaN weights' scores
        val = [{"val/acc": run.probe.last_val.get("val/acc")}]
    return Evaluation(status=status, usable=usable, compression=compression, val=val[0],
                      test=test[0], bn_batches=bn_batches)


def recalibrate_bn(net: torch.nn.Module, datamodule: Any, batches: int, seed: int,
                   device: torch.device | str | None = None) -> int:
    """Recompute ``net``'s BatchNorm statistics on ``batches`` batches of training inputs.

    The app's ``bn_recalibration`` step (and ``benchmarks/bn_recalibration.py``'s). After the
    last projection the running statistics still describe the weights before it (no forward
    pass follows a projection), so a rarely-projecting or highly compressing run scores
    below what its weights can do. The batches are ``datamodule.train_set`` with its
    training transforms, of ``datamodule.batch_size``, shuffled and transformed from
    ``seed`` alone (the same batches on every process: every rank ends with the same
    model); they run on ``device`` (None: where ``net`` is), and ``net`` is left where it
    was. Returns the batches used.
    """
    if datamodule.train_set is None:
        datamodule.setup("fit")
    loader = torch.utils.data.DataLoader(
        datamodule.train_set, batch_size=datamodule.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(int(seed)),
        num_workers=getattr(datamodule, "num_workers", 0))
    home = next(net.parameters()).device
    device = torch.device(device) if device is not None else home
    net.to(device)
    # Random training transforms draw from torch's generator: seeded here too, and the
    # training's random state left as it was.
    dtype = next(net.parameters()).dtype  # a *-true precision: the inputs in its dtype
    inputs = (batch[0].to(device, dtype if batch[0].is_floating_point() else None)
              for batch in loader)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            used = recalibrate_batchnorms_(net, inputs, batches)
        finally:
            net.to(home)
    log.info("BatchNorm statistics recomputed on %d training batch(es) of %d", used,
             datamodule.batch_size)
    return used


def _share_bn_statistics(run: Run) -> None:
    """Every process takes rank 0's recomputed BatchNorm buffers: the same batches give the
    same statistics up to the order of floating-point sums, and a user's transform may draw
    from an unseeded generator; the model each rank scores and rank 0 saves must be one."""
    shared = run.trainer.strategy.broadcast(norm_statistics(run.net), src=0)
    load_norm_statistics_(run.net, shared)


def _base_results(run: Run, ev: Evaluation) -> dict[str, Any]:
    """The keys every results.json holds (:data:`~lrpet_lightning.app.schema.REQUIRED_KEYS`)."""
    lrpet = run.lrpet
    # The settings the compact model's ranks come from: the callback's, or a baseline's.
    ranked = lrpet or (run.rank_source if run.variant in ("thin_init", "dense_finetune")
                       else None)
    return {
        "status": ev.status,
        "variant": run.variant,
        "val_acc": ev.val.get("val/acc"),
        "test_acc": ev.test.get("test/acc"),
        "test_acc_top5": ev.test.get("test/acc_top5"),
        "arch": run.cfg.model.arch,
        "lrpet": lrpet is not None,
        "rank_ratio": ranked.config.rank_ratio if ranked else None,
        "target_flops_reduction": ranked.config.target_flops_reduction if ranked else None,
        "target_params_reduction": ranked.config.target_params_reduction if ranked else None,
        "allocation": ranked.config.allocation if ranked and ranked.config.budget else None,
        # A dense baseline is uncompressed by construction (0.0); a compressed run without
        # a report did not measure it (None).
        "flops_reduction": 0.0 if ranked is None else None,
        "params_reduction": 0.0 if ranked is None else None,
        "epochs": run.trainer.current_epoch,
        "num_projections": lrpet.num_projections if lrpet else None,
        "wall_time_s": None,
        "output_dir": str(run.out),
        "errors": run.errors,
    }


def write(run: Run, ev: Evaluation) -> dict[str, Any]:
    """Step 4: the reports, the compact model, the plot and ``results.json`` (rank 0 writes).

    ``compression_report.json`` is written once, into the run dir; the callback's own copy in
    the logger's folder (e.g. ``csv/``) is removed, so a run has one report to read.
    """
    out, cfg, trainer, net = run.out, run.cfg, run.trainer, run.net
    rank0 = trainer.is_global_zero
    results = _base_results(run, ev)
    if ev.bn_batches is not None:
        results["bn_recalibration_batches"] = ev.bn_batches
    if run.module.diverged_at is not None:
        results["diverged_at"] = run.module.diverged_at
        results["last_finite_val"] = run.probe.last_val or None
    report = out / "compression_report.json"
    if rank0 and run.callback_report != report and run.callback_report.is_relative_to(out):
        run.callback_report.unlink(missing_ok=True)
    if ev.compression is not None:
        if rank0:
            run.guard("compression report", _write, report,
                      json.dumps(ev.compression.to_dict(), indent=2))
            run.guard("compression report", _write, out / "compression_report.md",
                      ev.compression.to_markdown())
        results.update(flops_reduction=ev.compression.flops_reduction,
                       params_reduction=ev.compression.params_reduction, report=str(report))
    if ev.usable and ev.status != "failed" and rank0 and decomposed_ranks(net):
        path = run.guard("compact model", save_compact, net, out / cfg.compact_model_name,
                         arch=cfg.model.arch, num_classes=run.datamodule.num_classes,
                         in_channels=run.datamodule.in_channels,
                         small_input=bool(cfg.model.small_input),
                         input_spec=input_spec(run.datamodule),
                         data=OmegaConf.to_container(cfg.data, resolve=True))
        if path is not None:
            results["compact_model"] = str(path)
    if ev.usable and run.spectra_before and rank0:
        plot = run.guard("compression plot", _plot_run, out / "compression_report.png", cfg,
                         run.lrpet, run.spectra_before,
                         layer_spectra(net, run.spectra_before))
        if plot is not None:
            results["compression_plot"] = str(plot)
    if run.evaluator is not None:
        results["reference_protocol"] = protocol_results(run.evaluator)
    if run.objective is not None:
        results["objective"] = objective_value(results, **run.objective)
    results["wall_time_s"] = time.perf_counter() - run.t0
    results = json_safe(results)
    if rank0:
        text = json.dumps(results, indent=2, allow_nan=False)
        try:
            _write(out / "results.json", text)
        except OSError:  # the results must reach the user even if the file cannot
            log.error("could not write %s; the results were:\n%s", out / "results.json", text)
            print(summary(results))
            raise
        log.info("%s: val_acc=%s test_acc=%s flops_reduction=%s; results in %s",
                 results["status"], results["val_acc"], results["test_acc"],
                 results["flops_reduction"], out / "results.json")
        print(summary(results))
    return results


def _plot_run(path: Path, cfg: DictConfig, lrpet: LowRankProjectionCallback | None,
              before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> Path | None:
    if lrpet is None:
        title = f"{cfg.model.arch}, dense (no LRPET callback)"
    elif lrpet.config.rank_ratio is None:
        title = f"{cfg.model.arch}, LRPET"  # per-layer ranks or a FLOPs budget
    else:
        title = f"{cfg.model.arch}, LRPET rank_ratio={lrpet.config.rank_ratio:.4g}"
    try:
        return plot_compression(lrpet.compression if lrpet else None, path,
                                records=lrpet.records if lrpet else None,
                                first_records=lrpet.first_records if lrpet else None,
                                spectra={n: (before[n], after[n]) for n in before},
                                title=title)
    except Exception as err:  # noqa: BLE001 - a picture must not lose a finished run's results
        log.warning("the compression plot failed and is skipped: %s: %s",
                    type(err).__name__, err)
        return None


def _write(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def _route_lightning_logs() -> None:
    """Send Lightning's messages (the LRPET callback's among them: ``rank_zero_info`` logs
    to ``lightning.pytorch``) through the root logger, i.e. into Hydra's ``train.log``.
    Lightning stops them at its own logger when it is imported before logging is set up."""
    lightning_log = logging.getLogger("lightning.pytorch")
    for handler in list(lightning_log.handlers):
        if type(handler) is logging.StreamHandler:  # Lightning's console-only handler
            lightning_log.removeHandler(handler)
    lightning_log.propagate = True


def _task(cfg: DictConfig) -> float | None:
    """What Hydra runs: ``train``, handing a sweeper (Optuna) the run's ``objective``."""
    _route_lightning_logs()
    return train(cfg).get("objective")


def _check_sweeper_installed(args: list[str]) -> None:
    if not any(a.lstrip("+").startswith("hparams_search=") for a in args):
        return
    import importlib.util

    try:
        found = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:  # no Hydra plugin at all: the namespace package is missing
        found = False
    if not found:
        raise SystemExit("lrpet-train: hparams_search needs Hydra's Optuna sweeper, which is "
                         "not installed: pip install \"lrpet-lightning[optuna]\" "
                         "(hydra-optuna-sweeper; from a clone: pip install \".[optuna]\")")


def main() -> None:
    """Console entry point ``lrpet-train`` (and ``python -m lrpet_lightning.app``)."""
    _check_sweeper_installed(sys.argv[1:])
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(_task)()


if __name__ == "__main__":
    main()
