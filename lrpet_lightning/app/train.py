"""``lrpet-train``: the Hydra training app. ``train(cfg)`` is a plain function tests call."""

from __future__ import annotations

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

from lrpet_lightning.app.module import ImageClassifier
from lrpet_lightning.callback import LowRankProjectionCallback
from lrpet_lightning.core.checkpoint import atomic_write, read_compact, save_compact
from lrpet_lightning.core.checkpoint import load_compact as _load_compact
from lrpet_lightning.core.transforms import decompose_, decomposed_ranks
from lrpet_lightning.models import build_model
from lrpet_lightning.plots import default_spectra_layers, layer_spectra, plot_compression

__all__ = ["config_dir", "load_compact_model", "main", "train"]

log = logging.getLogger("lrpet_lightning")


def config_dir() -> Path:
    """The Hydra ``conf/`` folder, shipped inside the package (top-level ``conf/`` links here)."""
    return Path(__file__).resolve().parent.parent / "conf"


def _instantiate_logger(cfg: DictConfig) -> Any:
    if cfg.get("logger") is None:
        return False
    try:
        return hydra.utils.instantiate(cfg.logger)
    except Exception as err:  # noqa: BLE001 - missing optional packages surface here
        if isinstance(err.__cause__, (ImportError, ModuleNotFoundError)) or "install" in str(err):
            target = cfg.logger.get("_target_", "?")
            raise RuntimeError(f"logger {target} needs a package that is not installed "
                               f"({err.__cause__ or err}); install it, or use logger=csv") from err
        raise


def _find_lrpet(trainer: pl.Trainer) -> LowRankProjectionCallback | None:
    return next((c for c in trainer.callbacks if isinstance(c, LowRankProjectionCallback)), None)


#: results.json keys ``objective.metric`` may name (higher is better for each).
OBJECTIVE_METRICS = ("val_acc", "test_acc", "test_acc_top5", "flops_reduction",
                     "params_reduction")


def _objective_config(cfg: DictConfig) -> dict[str, Any] | None:
    """The checked ``objective`` node, or None when no objective is asked for."""
    node = cfg.get("objective")
    if node is None or node.get("metric") is None:
        return None
    metric = node.metric
    if metric not in OBJECTIVE_METRICS:
        raise ValueError(f"objective.metric must be one of {', '.join(OBJECTIVE_METRICS)} "
                         f"(or null), got {metric!r}")
    if metric.startswith("test_") and not cfg.get("test", True):
        raise ValueError(f"objective.metric={metric} needs the test split, but test=false; "
                         f"use objective.metric=val_acc or test=true")
    floor, penalty = node.get("min_flops_reduction", 0.0), node.get("flops_penalty", 0.0)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
        raise ValueError(f"objective.min_flops_reduction must be a number in [0, 1), "
                         f"got {floor!r}")
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty >= 0:
        raise ValueError(f"objective.flops_penalty must be a number >= 0, got {penalty!r}")
    return {"metric": metric, "min_flops_reduction": float(floor),
            "flops_penalty": float(penalty)}


def _objective(results: dict[str, Any], metric: str, min_flops_reduction: float,
               flops_penalty: float) -> float:
    """``metric - flops_penalty * max(0, min_flops_reduction - flops_reduction)``: the number
    a sweeper maximizes (a run short of the FLOPs budget pays for each point it misses)."""
    value = results.get(metric)
    if value is None:
        log.warning("objective.metric %s was not measured in this run; the objective is NaN",
                    metric)
        return float("nan")
    shortfall = max(0.0, min_flops_reduction - results["flops_reduction"])
    return float(value) - flops_penalty * shortfall


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, compress and test one model as ``cfg`` says; return and write ``results.json``.

    Writes into ``cfg.output_dir``: logger output, checkpoints, ``compression_report.json``,
    ``.md`` and ``.png``, the compact model (``cfg.compact_model_name``) and ``results.json``.
    With ``cfg.objective.metric`` set, ``results["objective"]`` is the number a sweeper
    maximizes (``lrpet-train`` returns it to Hydra).
    """
    if cfg.trainer.get("strategy") == "ddp_spawn" and "LOCAL_RANK" not in os.environ:
        return _train_spawned(cfg)
    t0 = time.perf_counter()
    objective = _objective_config(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    net = build_model(cfg.model.arch, num_classes=datamodule.num_classes,
                      in_channels=datamodule.in_channels, small_input=cfg.model.small_input)
    module = ImageClassifier(net, datamodule.num_classes, max_epochs=cfg.trainer.max_epochs,
                             **OmegaConf.to_container(cfg.optim, resolve=True))
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()
                 if c is not None and "_target_" in c]
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=_instantiate_logger(cfg))
    spectra_before: dict[str, torch.Tensor] = {}
    if cfg.get("plot_compression", False):  # the paper's figure 1: spectra before and after
        spectra_before = layer_spectra(net, _spectra_layer_names(cfg, net))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    lrpet = _find_lrpet(trainer)
    if lrpet is not None and lrpet.state_dict()["ranks"] and not decomposed_ranks(net):
        # The callback projected but did not decompose: the final weights are exactly low
        # rank, so splitting them at the callback's ranks preserves the model's function.
        decompose_(module, ranks=lrpet.state_dict()["ranks"],
                   include_linear=lrpet.config.include_linear)
    val = trainer.validate(module, datamodule=datamodule, verbose=False)
    test = trainer.test(module, datamodule=datamodule, verbose=False) if cfg.test else [{}]

    results: dict[str, Any] = {
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
        "flops_reduction": 0.0,
        "params_reduction": 0.0,
        "epochs": trainer.current_epoch,
        "wall_time_s": None,
        "output_dir": str(out),
    }
    if lrpet is not None and lrpet.compression is not None:
        report = lrpet.compression
        if trainer.is_global_zero:
            _write(out / "compression_report.json", json.dumps(report.to_dict(), indent=2))
            _write(out / "compression_report.md", report.to_markdown())
        results.update(flops_reduction=report.flops_reduction,
                       params_reduction=report.params_reduction,
                       report=str(out / "compression_report.json"))
    if trainer.is_global_zero and decomposed_ranks(net):
        path = save_compact(net, out / cfg.compact_model_name, arch=cfg.model.arch,
                            num_classes=datamodule.num_classes,
                            in_channels=datamodule.in_channels,
                            small_input=bool(cfg.model.small_input))
        results["compact_model"] = str(path)
    if spectra_before and trainer.is_global_zero:
        plot = _plot_run(out / "compression_report.png", cfg, lrpet, spectra_before,
                         layer_spectra(net, spectra_before))
        if plot is not None:
            results["compression_plot"] = str(plot)
    if objective is not None:
        results["objective"] = _objective(results, **objective)
    results["wall_time_s"] = time.perf_counter() - t0
    if trainer.is_global_zero:
        _write(out / "results.json", json.dumps(results, indent=2))
        print(_summary(results))
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


def _summary(results: dict[str, Any]) -> str:
    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * x:.2f} %"

    budget = [(f"target {key[7:].replace('_', ' ')}", f"{pct(results[key])} "
               f"({results['allocation']})") for key in ("target_flops_reduction",
                                                        "target_params_reduction")
              if results.get(key) is not None]
    rows = [("model", results["arch"]), ("rank_ratio", str(results["rank_ratio"])), *budget,
            ("test top-1 (compact)", pct(results["test_acc"])),
            ("val top-1 (compact)", pct(results["val_acc"])),
            ("FLOPs reduction", pct(results["flops_reduction"])),
            ("params reduction", pct(results["params_reduction"])),
            ("wall time", f"{results['wall_time_s']:.1f} s"),
            ("compact model", results.get("compact_model", "-")),
            ("results", str(Path(results["output_dir"]) / "results.json"))]
    if "objective" in results:
        rows.insert(-2, ("objective", f"{results['objective']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "LRPET run summary", *(f"  {k.ljust(width)}  {v}" for k, v in rows)])


def load_compact_model(path: str | Path):
    """Rebuild and load the compact model a run wrote: ``load_compact_model("…/compact_model.pt")``."""
    meta = read_compact(path)["metadata"]
    net = build_model(meta["arch"], num_classes=meta["num_classes"],
                      in_channels=meta["in_channels"], small_input=meta["small_input"])
    return _load_compact(net, path).eval()


def _task(cfg: DictConfig) -> float | None:
    """What Hydra runs: ``train``, handing a sweeper (Optuna) the run's ``objective``."""
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
