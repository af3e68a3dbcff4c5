"""The run dir: one run per folder, writable before training, nothing of a launch lost.

A second run into a used dir silently replaced ``results.json``, the reports and
``metrics.csv`` and left the old ``last.ckpt`` for ``ckpt_path=.../last.ckpt`` to resume;
a read-only dir failed only after training; a relaunch's CSV logger deleted the earlier
launches' ``metrics.csv``. Rank 0 alone changes files; every rank runs the checks.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from lrpet_lightning.app.schema import STATUSES  # re-exported: its old home

__all__ = ["RUN_OUTPUTS", "STATUSES", "check_compact_model_name", "check_writable",
           "claim_run_dir", "existing_outputs", "keep_metrics_history", "resumes_run_in"]

log = logging.getLogger(__name__)


#: Files ``train`` writes into the run dir besides the compact model and the checkpoints.
RUN_OUTPUTS = ("results.json", "compression_report.json", "compression_report.md",
               "compression_report.png")


def check_compact_model_name(name: Any) -> None:
    """``compact_model_name`` must be a plain ``*.pt`` file name: checked before training, as
    a bad one only failed (or overwrote results.json) after the whole run."""
    ok = (isinstance(name, str) and name.endswith(".pt") and len(name) > len(".pt")
          and Path(name).name == name and "/" not in name and "\\" not in name
          and name not in RUN_OUTPUTS)
    if not ok:
        raise ValueError(f"compact_model_name must be a plain file name ending in .pt "
                         f"(written into the run dir, e.g. compact_model.pt), got {name!r}")


def existing_outputs(out: Path) -> list[str]:
    """What an earlier run left in ``out`` (Hydra's own ``.hydra/`` and logs do not count)."""
    found = [name for name in RUN_OUTPUTS[:1] if (out / name).exists()]
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        found += [f"checkpoints/{p.name}" for p in sorted(ckpts.glob("*.ckpt"))]
    found += [p.name for p in sorted(out.glob("hpc_ckpt_*.ckpt"))]
    return found


def resumes_run_in(out: Path, ckpt_path: Any) -> bool:
    """Whether ``ckpt_path`` continues the run whose outputs are in ``out``."""
    if ckpt_path is None:  # Lightning's SLURM auto-requeue resumes hpc_ckpt_* by itself
        return SLURMEnvironment.detect() and any(out.glob("hpc_ckpt_*.ckpt"))
    if ckpt_path == "last":
        return (out / "checkpoints" / "last.ckpt").is_file()
    if ckpt_path == "hpc":
        return any(out.glob("hpc_ckpt_*.ckpt"))
    try:
        Path(ckpt_path).resolve().relative_to(out.resolve())
    except ValueError:
        return False
    return True


def claim_run_dir(cfg: DictConfig, out: Path, delete: bool) -> None:
    """Refuse to write a new run over an earlier one's results and checkpoints; with
    ``overwrite=true`` and ``delete``, remove them instead.

    A second run into a used dir silently replaced results.json and the reports, and left
    the old last.ckpt for a later ``ckpt_path=.../last.ckpt`` to resume the wrong run.
    Every rank checks (so all refuse together rather than leave the others waiting at the
    process group's start); only rank 0 deletes.
    """
    found = existing_outputs(out)
    if not found or resumes_run_in(out, cfg.get("ckpt_path")):
        return
    if not cfg.get("overwrite", False):
        raise FileExistsError(
            f"output_dir {str(out)!r} already holds a run ({', '.join(found[:4])}); resume "
            f"it with ckpt_path={out / 'checkpoints' / 'last.ckpt'} (or ckpt_path=last), "
            f"pass overwrite=true to replace it, or choose another output_dir")
    if not delete:
        return
    log.warning("overwrite=true: removing the earlier run's %s from %s", ", ".join(found), out)
    stale = [*RUN_OUTPUTS, cfg.compact_model_name]
    for path in [*(out / n for n in stale), *(out / "checkpoints").glob("*.ckpt"),
                 *out.glob("hpc_ckpt_*.ckpt")]:
        path.unlink(missing_ok=True)


def check_writable(out: Path) -> None:
    """Create ``out`` and prove it takes files, before any training time is spent: the
    checkpoints, reports and results.json would otherwise fail only afterwards.

    Raises:
        OSError: ``out`` (or its ``checkpoints/`` or ``csv/``) cannot be created or written.
    """
    for folder in (out, out / "checkpoints", out / "csv"):
        if folder is not out and not folder.is_dir():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".lrpet-write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise OSError(f"output_dir {str(out)!r} is not writable: {folder} "
                          f"({type(err).__name__}: {err}); nothing was trained. Fix its "
                          f"permissions or choose another output_dir") from err


def keep_metrics_history(logger: Any, resuming: bool) -> tuple[Path, Path] | None:
    """On a relaunch, copy the CSV logger's ``metrics.csv`` to ``metrics-launch<k>.csv``
    (k = 1, 2, ... per earlier launch), since Lightning's CSV logger deletes it when it
    starts. Returns ``(metrics.csv, copy)``, or None when there is nothing to keep."""
    if not resuming or not isinstance(logger, CSVLogger):
        return None
    metrics = Path(logger.log_dir) / "metrics.csv"
    if not metrics.is_file():
        return None
    launch = 1 + len(list(metrics.parent.glob("metrics-launch*.csv")))
    copy = metrics.with_name(f"metrics-launch{launch}.csv")
    shutil.copy2(metrics, copy)
    log.info("kept the earlier launch's metrics as %s", copy)
    return metrics, copy
