"""``lrpet-train``: the Hydra training app. ``train(cfg)`` is a plain function tests call."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf, open_dict

from lrpet_lightning.app.compact import input_spec, load_compact_model
from lrpet_lightning.app.module import ImageClassifier
from lrpet_lightning.app.results import (
    RunProbe,
    count_compression,
    finished_results,
    finite_weights,
    json_safe,
    objective_config,
    objective_value,
    summary,
)
from lrpet_lightning.app.rundir import (
    STATUSES,
    check_compact_model_name,
    check_writable,
    claim_run_dir,
    keep_metrics_history,
    resumes_run_in,
)
from lrpet_lightning.callback import LowRankProjectionCallback
from lrpet_lightning.core.checkpoint import atomic_write, save_compact
from lrpet_lightning.core.transforms import decompose_, decomposed_ranks
from lrpet_lightning.models import build_model
from lrpet_lightning.plots import (
    default_spectra_layers,
    layer_spectra,
    plot_compression,
)

__all__ = ["STATUSES", "config_dir", "load_compact_model", "main", "train"]

log = logging.getLogger(__name__)


def config_dir() -> Path:
    """The Hydra ``conf/`` folder, shipped inside the package (top-level ``conf/`` links here)."""
    return Path(__file__).resolve().parent.parent / "conf"


def _instantiate_logger(cfg: DictConfig) -> Any:
    if cfg.get("logger") is None:
        return False
    try:
        return hydra.utils.instantiate(cfg.logger)
    except Exception as err:
        if isinstance(err.__cause__, (ImportError, ModuleNotFoundError)) or "install" in str(err):
            target = cfg.logger.get("_target_", "?")
            raise RuntimeError(f"logger {target} needs a package that is not installed "
                               f"({err.__cause__ or err}); install it, or use logger=csv") from err
        raise


def _find_lrpet(trainer: pl.Trainer) -> LowRankProjectionCallback | None:
    return next((c for c in trainer.callbacks if isinstance(c, LowRankProjectionCallback)), None)


def _spectra_layer_names(cfg: DictConfig, net: torch.nn.Module) -> list[str]:
    names = cfg.get("spectra_layers")
    if names is None:
        return default_spectra_layers(net)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"spectra_layers must be a list of module names (or null), "
                         f"got {names!r}")
    modules = dict(net.named_modules())
    for name in names:
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            layers = default_spectra_layers(net, count=len(modules))
            raise ValueError(f"spectra_layers names {name!r}, which is not a conv or linear "
                             f"layer of {cfg.model.arch}; e.g. {', '.join(layers[:8])}")
    return list(names)


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
                                records=lrpet.last_records if lrpet else None,
                                first_records=lrpet.first_records if lrpet else None,
                                spectra={n: (before[n], after[n]) for n in before},
                                title=title)
    except Exception as err:  # noqa: BLE001 - a picture must not lose a finished run's results
        log.warning("the compression plot failed and is skipped: %s: %s",
                    type(err).__name__, err)
        return None


def _optim_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.optim`` as ImageClassifier arguments; unknown keys named before training."""
    kwargs = OmegaConf.to_container(cfg.optim, resolve=True)
    allowed = [n for n in inspect.signature(ImageClassifier).parameters
               if n not in ("model", "num_classes", "max_epochs")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"optim.{unknown[0]} is not an optimizer setting; allowed: "
                         f"{', '.join('optim.' + n for n in allowed)}")
    return kwargs


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, compress and test one model as ``cfg`` says; return and write ``results.json``.

    Writes into ``cfg.output_dir``: logger output, checkpoints, ``compression_report.json``,
    ``.md`` and ``.png``, the compact model (``cfg.compact_model_name``) and ``results.json``.
    With ``cfg.objective.metric`` set, ``results["objective"]`` is the number a sweeper
    maximizes (``lrpet-train`` returns it to Hydra).

    ``results["status"]`` is ``"finished"``, ``"diverged"`` (a non-finite training loss
    stopped the fit; the metrics are the last finite ones) or ``"already_finished"`` (a
    relaunch of a finished run: its results.json is left as it was and returned).
    ``results["errors"]`` lists the steps after training that failed (decomposition,
    validation, test, reports, plot, compact model): they are logged and recorded, and
    never lose the rest of the results. A value that was not measured is None, never 0.

    Raises:
        FileExistsError: ``cfg.output_dir`` holds another run (see ``claim_run_dir``).
        OSError: ``cfg.output_dir`` is not writable (checked before training).
        ValueError: a bad ``compact_model_name``, ``optim.*`` or ``objective.*`` setting.
    """
    check_compact_model_name(cfg.compact_model_name)
    if cfg.trainer.get("strategy") == "ddp_spawn" and "LOCAL_RANK" not in os.environ:
        check_writable(Path(cfg.output_dir))
        claim_run_dir(cfg, Path(cfg.output_dir), delete=False)  # refuse before spawning
        return _train_spawned(cfg)
    t0 = time.perf_counter()
    objective = objective_config(cfg)
    optim = _optim_kwargs(cfg)
    out = Path(cfg.output_dir)
    check_writable(out)
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    claim_run_dir(cfg, out, delete=rank0)
    ckpt_path = cfg.get("ckpt_path")
    resuming = resumes_run_in(out, ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    net = build_model(cfg.model.arch, num_classes=datamodule.num_classes,
                      in_channels=datamodule.in_channels, small_input=cfg.model.small_input)
    try:
        module = ImageClassifier(net, datamodule.num_classes, max_epochs=cfg.trainer.max_epochs,
                                 **optim)
    except (TypeError, ValueError) as err:  # name the override: "optim.lr must be a number"
        raise ValueError(f"optim.{err}") from err
    probe = RunProbe()
    # The probe first: its on_train_end marks the training as over before the others'
    # fit-end work (the callback's decomposition) can fail.
    callbacks = [probe] + [hydra.utils.instantiate(c)
                           for c in (cfg.get("callbacks") or {}).values()
                           if c is not None and "_target_" in c]
    logger = _instantiate_logger(cfg)
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks,
                                                  logger=logger)
    # The CSV logger deletes metrics.csv when it starts: keep each earlier launch's copy.
    kept_metrics = keep_metrics_history(logger, resuming) if rank0 else None
    spectra_before: dict[str, torch.Tensor] = {}
    if cfg.get("plot_compression", False):  # the paper's figure 1: spectra before and after
        spectra_before = layer_spectra(net, _spectra_layer_names(cfg, net))
    log.info("training %s on %s for %s epoch(s)%s; outputs in %s", cfg.model.arch,
             type(datamodule).__name__, cfg.trainer.max_epochs,
             f", resuming from {ckpt_path}" if ckpt_path else "", out)
    errors: list[dict[str, str]] = []

    def guard(step: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one step after training; a failure is logged and recorded, not raised, so a
        finished training always ends with a results.json saying what happened."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - recorded in results["errors"]
            log.error("%s failed after training: %s: %s", step, type(err).__name__, err)
            errors.append({"step": step, "error": f"{type(err).__name__}: {err}"})
            return None

    status = "finished"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Exception as err:
        if module.diverged_at is None and not probe.trained:
            raise  # failed before training ended: the checkpoints are there to resume from
        # Training is over (diverged, or done and then the fit-end steps failed, e.g. the
        # callback's decomposition): record what happened rather than lose the run.
        log.error("fit failed after training: %s: %s", type(err).__name__, err)
        errors.append({"step": "fit end", "error": f"{type(err).__name__}: {err}"})
        status = "failed" if module.diverged_at is None else status
    finished_before = finished_results(out)
    if ckpt_path is not None and probe.batches == 0 and module.diverged_at is None:
        status = "already_finished"  # Lightning restored a finished loop and trained nothing
        if finished_before is not None:
            if kept_metrics is not None:  # the CSV logger restarted metrics.csv: put it back
                os.replace(kept_metrics[1], kept_metrics[0])
            log.info("%s is a finished run (nothing left to train); its results.json is "
                     "left as it was", ckpt_path)
            return {**finished_before, "status": status}
        log.warning("%s is at the end of training but %s holds no finished results.json: "
                    "evaluating and saving the checkpoint's model again", ckpt_path, out)
    if module.diverged_at is not None:
        status = "diverged"
        log.error("the training loss diverged (%s) at epoch %s, step %s; training stopped",
                  module.diverged_at["loss"], module.diverged_at["epoch"],
                  module.diverged_at["step"])
    usable = finite_weights(net)
    if not usable and status == "finished":  # e.g. an overflow in BatchNorm statistics
        status = "diverged"
        log.error("the weights hold NaN/inf after training: status diverged")

    lrpet = _find_lrpet(trainer)
    compression = lrpet.compression if lrpet is not None and usable else None
    if status == "failed":
        compression = None  # the fit-end steps failed: the report may not be this model's
    dense_copy = None
    if usable and lrpet is not None and lrpet.state_dict()["ranks"] and not decomposed_ranks(net):
        # The callback projected but did not decompose: the final weights are exactly low
        # rank, so splitting them at the callback's ranks preserves the model's function.
        dense_copy = copy.deepcopy(net) if compression is None else None
        guard("decompose", decompose_, module, ranks=lrpet.state_dict()["ranks"],
              include_linear=lrpet.config.include_linear)
    if dense_copy is not None and decomposed_ranks(net) and status != "failed":
        # No report from the callback (a relaunch after training, or report=false): count
        # it here rather than write a FLOPs reduction nobody measured.
        compression = guard("compression report", count_compression, dense_copy, net,
                            datamodule)
    val: list[dict[str, float]] = [{}]
    test: list[dict[str, float]] = [{}]
    if usable:
        val = guard("validate", trainer.validate, module, datamodule=datamodule,
                    verbose=False) or [{}]
        if cfg.test:
            test = guard("test", trainer.test, module, datamodule=datamodule,
                         verbose=False) or [{}]
    if status == "diverged" or not usable:  # the last finite metrics, not NaN weights' scores
        val = [{"val/acc": probe.last_val.get("val/acc")}]

    results: dict[str, Any] = {
        "status": status,
        "val_acc": val[0].get("val/acc"),
        "test_acc": test[0].get("test/acc"),
        "test_acc_top5": test[0].get("test/acc_top5"),
        "arch": cfg.model.arch,
        "lrpet": lrpet is not None,  # False: a dense baseline (callbacks.lrpet=null)
        "rank_ratio": lrpet.config.rank_ratio if lrpet else None,
        # A budget run's target and allocation (None without a budget).
        "target_flops_reduction": lrpet.config.target_flops_reduction if lrpet else None,
        "target_params_reduction": lrpet.config.target_params_reduction if lrpet else None,
        "allocation": lrpet.config.allocation if lrpet and lrpet.config.budget else None,
        # Measured from the compression report; a dense baseline is uncompressed by
        # construction (0.0); an LRPET run without a report did not measure it (None).
        "flops_reduction": 0.0 if lrpet is None else None,
        "params_reduction": 0.0 if lrpet is None else None,
        "epochs": trainer.current_epoch,
        "num_projections": lrpet.num_projections if lrpet else None,
        "wall_time_s": None,
        "output_dir": str(out),
    }
    if module.diverged_at is not None:
        results["diverged_at"] = module.diverged_at
        results["last_finite_val"] = probe.last_val or None
    if compression is not None:
        if trainer.is_global_zero:
            guard("compression report", _write, out / "compression_report.json",
                  json.dumps(compression.to_dict(), indent=2))
            guard("compression report", _write, out / "compression_report.md",
                  compression.to_markdown())
        results.update(flops_reduction=compression.flops_reduction,
                       params_reduction=compression.params_reduction,
                       report=str(out / "compression_report.json"))
    if usable and status != "failed" and trainer.is_global_zero and decomposed_ranks(net):
        path = guard("compact model", save_compact, net, out / cfg.compact_model_name,
                     arch=cfg.model.arch, num_classes=datamodule.num_classes,
                     in_channels=datamodule.in_channels,
                     small_input=bool(cfg.model.small_input),
                     input_spec=input_spec(datamodule),
                     data=OmegaConf.to_container(cfg.data, resolve=True))
        if path is not None:
            results["compact_model"] = str(path)
    if usable and spectra_before and trainer.is_global_zero:
        plot = guard("compression plot", _plot_run, out / "compression_report.png", cfg,
                     lrpet, spectra_before, layer_spectra(net, spectra_before))
        if plot is not None:
            results["compression_plot"] = str(plot)
    if objective is not None:
        results["objective"] = objective_value(results, **objective)
    results["errors"] = errors
    results["wall_time_s"] = time.perf_counter() - t0
    results = json_safe(results)
    if trainer.is_global_zero:
        _write(out / "results.json", json.dumps(results, indent=2, allow_nan=False))
        log.info("%s: val_acc=%s test_acc=%s flops_reduction=%s; results in %s", status,
                 results["val_acc"], results["test_acc"], results["flops_reduction"],
                 out / "results.json")
        print(summary(results))
    return results


def _train_spawned(cfg: DictConfig) -> dict[str, Any]:
    """ddp_spawn, whole: every spawned rank runs all of ``train`` as under torchrun.

    Lightning's own ddp_spawn runs only ``fit`` in the workers and loads rank 0's weights
    back into this process non-strictly: a model decomposed at fit end and the callback's
    state would be silently lost, and validate/test would see an untrained network.
    """
    devices = cfg.trainer.devices
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices must be a number of processes >= 1 with "
                         f"strategy=ddp_spawn, got {devices!r}")
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.strategy = "ddp"  # the ranks are started here, as torchrun would
    container = OmegaConf.to_container(cfg, resolve=True)  # ${hydra:...} needs this process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_train_rank, args=(container, devices, port), nprocs=devices,
                       start_method="spawn")
    return json.loads((Path(container["output_dir"]) / "results.json").read_text())


def _train_rank(local_rank: int, container: dict[str, Any], world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0",
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
                      RANK=str(local_rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    train(OmegaConf.create(container))
    if torch.distributed.is_initialized():  # leave together, so no rank aborts at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


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
