"""Step 1 of a run: everything ``train(cfg)`` needs, built and checked before any training."""

from __future__ import annotations

import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lrpet_lightning.app.module import ImageClassifier
from lrpet_lightning.app.protocol import PreProjectionEvaluator, apply_protocol
from lrpet_lightning.app.results import RunProbe, objective_config
from lrpet_lightning.app.rundir import (
    check_writable,
    claim_run_dir,
    keep_metrics_history,
    resumes_run_in,
)
from lrpet_lightning.app.variants import (
    DecomposeAt,
    check_variant,
    decompose_thin_,
    lrpet_then_thin,
    rank_settings,
)
from lrpet_lightning.callback import LowRankProjectionCallback
from lrpet_lightning.core.checks import check_int
from lrpet_lightning.models import build_model
from lrpet_lightning.plots import default_spectra_layers, layer_spectra

__all__ = ["Run", "build", "check_world_size", "data_config", "instantiate_logger", "optim_kwargs",
           "spectra_layer_names", "world_size"]

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One launch of a run: its config, parts, and what the steps after training record."""

    cfg: DictConfig
    out: Path
    objective: dict[str, Any] | None
    datamodule: Any
    net: torch.nn.Module
    module: ImageClassifier
    probe: RunProbe
    trainer: pl.Trainer
    #: ``(metrics.csv, its copy)`` of an earlier launch (rank 0, on a relaunch), else None.
    kept_metrics: tuple[Path, Path] | None
    #: Singular values of the plotted layers at initialization (empty: no plot).
    spectra_before: dict[str, torch.Tensor]
    #: Where the callback writes its own compression_report.json (the logger's folder).
    callback_report: Path
    t0: float
    #: The reference protocol's test before each projection (None: the standard protocol).
    evaluator: PreProjectionEvaluator | None = None
    #: ``variant.name``: lrpet, or a baseline (:mod:`~lrpet_lightning.app.variants`).
    variant: str = "lrpet"
    #: A baseline's rank settings: the LRPET callback it was configured with, not run.
    rank_source: LowRankProjectionCallback | None = None
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def lrpet(self) -> LowRankProjectionCallback | None:
        return next((c for c in self.trainer.callbacks
                     if isinstance(c, LowRankProjectionCallback)), None)

    def guard(self, step: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one step after training; a failure is logged and recorded, not raised, so a
        finished training always ends with a results.json saying what happened."""
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - recorded in results["errors"]
            log.error("%s failed after training: %s: %s", step, type(err).__name__, err)
            self.errors.append({"step": step, "error": f"{type(err).__name__}: {err}"})
            return None


def instantiate_logger(cfg: DictConfig) -> Any:
    """``cfg.logger`` built (False without one); a missing package is named."""
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


def spectra_layer_names(cfg: DictConfig, net: torch.nn.Module) -> list[str]:
    """The layers ``compression_report.png`` shows spectra of (``cfg.spectra_layers``)."""
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


def optim_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.optim`` as ImageClassifier arguments; unknown keys named before training."""
    kwargs = OmegaConf.to_container(cfg.optim, resolve=True)
    allowed = [n for n in inspect.signature(ImageClassifier).parameters
               if n not in ("model", "num_classes", "max_epochs")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"optim.{unknown[0]} is not an optimizer setting; allowed: "
                         f"{', '.join('optim.' + n for n in allowed)}")
    return kwargs


def _device_count(devices: Any, accelerator: Any) -> int:
    """Processes per node for ``trainer.devices``, resolved as Lightning resolves it."""
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:  # "0,1" (or "0,"): device ids
            return len([i for i in text.split(",") if i.strip()])
        if text == "-1" or text.isdigit():
            devices = int(text)
        elif text == "auto":
            devices = "auto"
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if devices == "auto" or devices == -1:
        # "auto" (and -1, "every GPU") means every visible GPU on a GPU, else one process.
        gpu = accelerator in ("gpu", "cuda") or (accelerator in (None, "auto")
                                                  and torch.cuda.is_available())
        if gpu:
            return torch.cuda.device_count()
        if devices == -1:
            raise ValueError(f"trainer.devices=-1 means every GPU, but trainer.accelerator="
                             f"{accelerator} has none; give a count of processes")
        return 1
    return check_int("trainer.devices", devices, minimum=1,
                     meaning='processes per node, or "auto" or -1')


def world_size(trainer_cfg: Any) -> int:
    """The number of processes a ``trainer`` config launches: ``devices`` × ``num_nodes``.

    ``devices`` may be a count, a list or string of device ids, ``"auto"`` or ``-1``;
    the last two are resolved as Lightning resolves them (every visible GPU on a GPU
    accelerator, one process otherwise). :func:`check_world_size` checks the result against
    the trainer once it is built.

    Args:
        trainer_cfg: ``cfg.trainer`` (a mapping with ``devices``, ``accelerator`` and
            optionally ``num_nodes``).

    Returns:
        The world size, >= 1.

    Raises:
        TypeError, ValueError: ``devices`` or ``num_nodes`` is not a valid count.

    Example:
        >>> world_size({"accelerator": "gpu", "devices": 8, "num_nodes": 2})
        16
    """
    devices = _device_count(trainer_cfg.get("devices", "auto"), trainer_cfg.get("accelerator"))
    if devices < 1:
        raise ValueError(f"trainer.devices={trainer_cfg.get('devices')!r} resolves to no "
                         f"device on this machine")
    nodes = check_int("trainer.num_nodes", trainer_cfg.get("num_nodes", 1), minimum=1)
    return devices * nodes


def data_config(cfg: DictConfig) -> DictConfig:
    """``cfg.data`` as the datamodule takes it, its batch per process derived.

    With ``data.global_batch_size`` set (the ImageNet presets: 256, the paper's batch), the
    per-process ``batch_size`` is ``global_batch_size / world_size(cfg.trainer)``, so the
    global batch, and with it the recipe's learning rate, stays the same on any number of
    GPUs and nodes. Without it (null or absent), ``data.batch_size`` is per process, as always.

    Args:
        cfg: the composed run config.

    Returns:
        A copy of ``cfg.data`` without ``global_batch_size`` (``cfg`` is left as it is).

    Raises:
        TypeError: ``data.global_batch_size`` is not an int.
        ValueError: it is < 1, it does not divide over the processes, or ``data.batch_size``
            is set as well (which of the two would be meant is unclear).

    Example:
        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"trainer": {"accelerator": "gpu", "devices": 8,
        ...     "num_nodes": 1}, "data": {"batch_size": None, "global_batch_size": 256}})
        >>> data_config(cfg).batch_size
        32
    """
    data = cfg.data.copy()  # shallow: interpolations still resolve against cfg
    if "global_batch_size" not in data:
        return data
    with open_dict(data):
        total = data.pop("global_batch_size")
    if total is None:
        return data
    total = check_int("data.global_batch_size", total, minimum=1,
                      meaning="samples per optimizer step over all processes")
    if data.get("batch_size") is not None:
        raise ValueError(f"data.batch_size={data.batch_size} (per process) and "
                         f"data.global_batch_size={total} (over all processes) are both set; "
                         f"keep one: add data.global_batch_size=null to give the batch per "
                         f"process, or data.batch_size=null to derive it")
    processes = world_size(cfg.trainer)
    if total % processes:
        raise ValueError(
            f"data.global_batch_size={total} does not divide over trainer.devices="
            f"{cfg.trainer.get('devices')} x trainer.num_nodes={cfg.trainer.get('num_nodes', 1)}"
            f" = {processes} processes; set data.global_batch_size to a multiple of "
            f"{processes} (scaling optim.lr with it), or data.global_batch_size=null "
            f"data.batch_size=<per process>")
    data.batch_size = total // processes
    return data


def check_world_size(cfg: DictConfig, trainer: pl.Trainer) -> None:
    """Refuse a trainer whose world size is not the one ``data.global_batch_size`` was divided
    by (``trainer.devices`` resolved differently from :func:`world_size`).

    Raises:
        ValueError: the global batch would not be ``data.global_batch_size``.
    """
    total = cfg.data.get("global_batch_size")
    if total is None:
        return
    expected = world_size(cfg.trainer)
    if trainer.world_size != expected:
        raise ValueError(
            f"data.global_batch_size={total} was divided over trainer.devices="
            f"{cfg.trainer.get('devices')} x trainer.num_nodes={cfg.trainer.get('num_nodes', 1)}"
            f" = {expected} processes, but the trainer runs {trainer.world_size}; give "
            f"trainer.devices as a count")


def build(cfg: DictConfig) -> Run:
    """Check the settings and the run dir, then build data, model, callbacks and trainer.

    Raises:
        FileExistsError: ``cfg.output_dir`` holds another run (see ``claim_run_dir``).
        OSError: ``cfg.output_dir`` is not writable.
        TypeError, ValueError: a bad ``optim.*`` (named), ``objective.*`` or other setting,
            or a ``data.global_batch_size`` that does not divide over the processes.
    """
    t0 = time.perf_counter()
    objective = objective_config(cfg)
    optim = optim_kwargs(cfg)
    evaluator = apply_protocol(cfg)  # protocol=reference sets data.val_size=0
    variant, finetune_epochs = check_variant(cfg, world_size(cfg.trainer))
    check_int("bn_recalibration", cfg.get("bn_recalibration", 0), minimum=0,
              meaning="training batches to recompute BatchNorm statistics on; 0: off")
    data = data_config(cfg)  # before the run dir is claimed: a bad batch leaves no trace
    if cfg.data.get("global_batch_size") is not None:
        log.info("data.global_batch_size=%s over %d process(es): data.batch_size=%d per process",
                 cfg.data.global_batch_size, world_size(cfg.trainer), data.batch_size)
    out = Path(cfg.output_dir)
    check_writable(out)
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    claim_run_dir(cfg, out, delete=rank0)
    resuming = resumes_run_in(out, cfg.get("ckpt_path"))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(data)
    net = build_model(cfg.model.arch, num_classes=datamodule.num_classes,
                      in_channels=datamodule.in_channels, small_input=cfg.model.small_input)
    try:
        module = ImageClassifier(net, datamodule.num_classes, max_epochs=cfg.trainer.max_epochs,
                                 **optim)
    except (TypeError, ValueError) as err:  # name the override: "optim.lr must be a number"
        raise type(err)(f"optim.{err}") from err
    probe = RunProbe()
    # The probe first: its on_train_end marks the training as over before the others'
    # fit-end work (the callback's decomposition) can fail. The reference protocol's
    # evaluator before the LRPET callback: it tests the weights before each projection.
    callbacks = [probe] + ([evaluator] if evaluator else []) + [hydra.utils.instantiate(c)
                           for c in (cfg.get("callbacks") or {}).values()
                           if c is not None and "_target_" in c]
    rank_source = None
    if variant == "lrpet_thin":  # LRPET, then thin: the callback runs until the switch
        lrpet = next(c for c in callbacks if isinstance(c, LowRankProjectionCallback))
        callbacks.append(lrpet_then_thin(lrpet, cfg.trainer.max_epochs - finetune_epochs,
                                         net))
    elif variant != "lrpet":  # a baseline: the LRPET callback only lends its rank settings
        rank_source = next((c for c in callbacks if isinstance(c, LowRankProjectionCallback)),
                           None)
        callbacks = [c for c in callbacks if c is not rank_source]
        example = torch.zeros((2, *datamodule.example_input_shape[1:]))
        if variant == "thin_init":
            ranks = decompose_thin_(net, rank_settings(rank_source), example,
                                    truncate_only=False)
            log.info("variant=thin_init: %d layer(s) decomposed at initialization", len(ranks))
        elif variant == "dense_finetune":
            settings = rank_settings(rank_source)
            callbacks.append(DecomposeAt(
                net, cfg.trainer.max_epochs - finetune_epochs,
                lambda _: decompose_thin_(net, settings, example, truncate_only=True)))
    logger = instantiate_logger(cfg)
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks,
                                                  logger=logger)
    check_world_size(cfg, trainer)
    # Before fit no process group exists, so this is no collective; the callback writes there.
    callback_report = Path(trainer.log_dir or trainer.default_root_dir) / "compression_report.json"
    # The CSV logger deletes metrics.csv when it starts: keep each earlier launch's copy.
    kept_metrics = keep_metrics_history(logger, resuming) if rank0 else None
    spectra_before: dict[str, torch.Tensor] = {}
    # The paper's figure 1: spectra before and after (LRPET runs: a baseline has no callback).
    if cfg.get("plot_compression", False) and variant == "lrpet":
        spectra_before = layer_spectra(net, spectra_layer_names(cfg, net))
    return Run(cfg=cfg, out=out, objective=objective, datamodule=datamodule, net=net,
               module=module, probe=probe, trainer=trainer, kept_metrics=kept_metrics,
               spectra_before=spectra_before, callback_report=callback_report, t0=t0,
               evaluator=evaluator, variant=variant, rank_source=rank_source)
