"""``lrpet-summarize MULTIRUN_DIR``: one table and one accuracy-vs-FLOPs plot for a sweep.

Reads every run's ``results.json`` (and its ``.hydra/overrides.yaml`` and ``config.yaml``)
under the directory, writes ``summary.csv``, ``summary.md`` and ``pareto.png`` into it and
prints the table:

    lrpet-train -m callbacks.lrpet.rank_ratio=0.1,0.2,0.4 hydra.sweep.dir=multirun/ranks
    lrpet-summarize multirun/ranks
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lrpet_lightning.app.schema import ACCURACY_METRICS

__all__ = ["ACCURACY_METRICS", "Run", "load_runs", "main", "pareto_front", "seed_table",
           "summarize"]

#: results.json values in every row, after the swept overrides (keys of RESULT_KEYS).
_VALUE_COLUMNS = ("rank_ratio", "flops_reduction", "params_reduction", "val_acc", "test_acc",
                  "wall_time_s")
_LONG_FLOAT = re.compile(r"-?\d+\.\d{5,}")
_MD_HEADERS = {"rank_ratio": "rank_ratio", "flops_reduction": "FLOPs reduction",
               "params_reduction": "params reduction", "val_acc": "val top-1",
               "test_acc": "test top-1", "wall_time_s": "wall time", "objective": "objective",
               "pareto": "Pareto"}


@dataclass(frozen=True)
class Run:
    """One finished run of a sweep."""

    #: Its folder relative to the sweep dir (Hydra's job number, e.g. ``"3"``).
    name: str
    path: Path
    #: ``{key: value}`` of the run's command-line overrides (``.hydra/overrides.yaml``).
    overrides: dict[str, str]
    results: dict[str, Any]
    #: False for a dense baseline: the run had no LRPET callback.
    lrpet: bool
    #: results.json keys whose value was NaN or inf: read as missing (None) in ``results``.
    non_finite: tuple[str, ...] = ()

    @property
    def compressed(self) -> bool:
        """LRPET, or a baseline trained at its ranks (``variant`` thin_init or
        dense_finetune): a point of the plot, not a dense line."""
        return self.lrpet or self.results.get("variant") in ("thin_init", "dense_finetune")


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    overrides = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        overrides[key] = value
    return overrides


def _has_lrpet(run_dir: Path, results: dict[str, Any]) -> bool:
    if "lrpet" in results:  # written by lrpet-train since sweeps were summarized
        return bool(results["lrpet"])
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        callbacks = OmegaConf.load(config).get("callbacks") or {}
        return callbacks.get("lrpet") is not None
    return results.get("rank_ratio") is not None or "report" in results


def load_runs(multirun_dir: str | Path) -> list[Run]:
    """Every finished run (a folder holding ``results.json``) under ``multirun_dir``.

    Raises:
        FileNotFoundError: ``multirun_dir`` is not a directory, or no run under it finished.
        ValueError: a ``results.json`` that is not a JSON object.
    """
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"MULTIRUN_DIR {str(root)!r} is not a directory; pass the "
                                f"folder of a sweep, e.g. multirun/2026-11-27/12-00-00")
    runs = []
    for path in sorted(root.rglob("results.json"),
                       key=lambda p: _natural_key(str(p.parent.relative_to(root)))):
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(results, dict):
            raise ValueError(f"{path} holds a {type(results).__name__}, expected a JSON "
                             f"object (the results.json lrpet-train writes)")
        run_dir = path.parent
        # NaN is no measurement: a NaN FLOPs reduction must not land on the Pareto front,
        # nor a NaN accuracy make the whole sweep fall back to another metric.
        non_finite = tuple(k for k, v in results.items()
                           if isinstance(v, float) and not math.isfinite(v))
        results = {k: (None if k in non_finite else v) for k, v in results.items()}
        runs.append(Run(name=str(run_dir.relative_to(root)), path=run_dir,
                        overrides=_read_overrides(run_dir), results=results,
                        lrpet=_has_lrpet(run_dir, results), non_finite=non_finite))
    if not runs:
        started = _unfinished(root)
        hint = (f"; {len(started)} run(s) started but wrote none (unfinished or failed: "
                f"{', '.join(started[:8])})" if started else "")
        raise FileNotFoundError(f"no runs in {str(root)!r}: no results.json under it "
                                f"(lrpet-train writes one when a run finishes){hint}")
    return runs


def _unfinished(root: Path) -> list[str]:
    """Runs Hydra started (a ``.hydra`` folder) that wrote no ``results.json``."""
    return sorted((str(p.parent.relative_to(root)) for p in root.rglob(".hydra")
                   if not (p.parent / "results.json").is_file()), key=_natural_key)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which ``(flops_reduction, accuracy)`` points no other point beats on both axes."""
    return [not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)
            for x, y in points]


def _swept_keys(runs: list[Run]) -> list[str]:
    """The override keys whose value differs between runs (every key of a lone run)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    if len(runs) == 1:
        return keys
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def _pick_metric(runs: list[Run], metric: str | None) -> str:
    if metric is None:
        return next((m for m in ACCURACY_METRICS
                     if all(run.results.get(m) is not None for run in runs)), "val_acc")
    if metric not in ACCURACY_METRICS:
        raise ValueError(f"metric must be one of {', '.join(ACCURACY_METRICS)}, got {metric!r}")
    return metric


def _rows(runs: list[Run], metric: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The table's columns and one row per run (raw values: fractions, seconds)."""
    swept = _swept_keys(runs)
    extra = ["objective"] if any("objective" in run.results for run in runs) else []
    columns = ["run", *swept, "lrpet", *_VALUE_COLUMNS, *extra, "pareto"]
    compressed = [run for run in runs if run.compressed and _plottable(run, metric)]
    on_front = dict(zip((run.name for run in compressed), pareto_front(
        [(run.results["flops_reduction"], run.results[metric]) for run in compressed]),
        strict=True))
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "lrpet": run.lrpet}
        row.update({k: run.overrides.get(k, "") for k in swept})
        row.update({k: run.results.get(k) for k in (*_VALUE_COLUMNS, *extra)})
        row["pareto"] = on_front.get(run.name, False)
        rows.append(row)
    return columns, rows


def _plottable(run: Run, metric: str) -> bool:
    """A compressed run is a point only with both coordinates measured (a missing FLOPs
    reduction is unknown, not 0)."""
    return _is_number(run.results.get(metric)) and _is_number(run.results.get("flops_reduction"))


def _notes(runs: list[Run], metric: str) -> str:
    """The runs whose values were read as missing, and the compressed runs left unplotted."""
    notes = []
    bad = [f"{run.name} ({', '.join(run.non_finite)})" for run in runs if run.non_finite]
    if bad:
        notes.append(f"{len(bad)} run(s) with NaN/inf values, read as missing: "
                     f"{', '.join(bad)}")
    unplotted = [run.name for run in runs if run.compressed and not _plottable(run, metric)]
    if unplotted:
        notes.append(f"{len(unplotted)} compressed run(s) without a finite {metric} and "
                     f"flops_reduction, left off the plot and the Pareto front: "
                     f"{', '.join(unplotted)}")
    return "".join(f"\n{note}\n" for note in notes)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _cell(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key in ("flops_reduction", "params_reduction", "val_acc", "test_acc"):
        return f"{100 * value:.2f} %"
    if key == "wall_time_s":
        return f"{value:.1f} s"
    if key == "objective":
        return f"{value:.4f}"
    if key in ("pareto", "lrpet"):
        return "yes" if value else ""
    if isinstance(value, float) or (isinstance(value, str) and _LONG_FLOAT.fullmatch(value)):
        return f"{float(value):.4g}"  # an Optuna suggestion: 0.4292881023563948 -> 0.4293
    return str(value).replace("|", "\\|")


def _markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    headers = [_MD_HEADERS.get(c, c) for c in columns]
    numeric = set(_VALUE_COLUMNS) | {"objective"}
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def seed_table(runs: list[Run]) -> str:
    """Mean ± standard deviation over seeds: one row per setting of the other swept keys
    (``lrpet-train -m variant=lrpet,thin_init seed=0,1,2``). Empty without a swept ``seed``."""
    swept = _swept_keys(runs)
    if "seed" not in swept or len(runs) < 2:
        return ""
    others = [k for k in swept if k != "seed"]
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.overrides.get(k, "") for k in others), []).append(run)
    metrics = [m for m in ("test_acc", "val_acc", "flops_reduction")
               if any(_is_number(run.results.get(m)) for run in runs)]
    headers = [*others, "seeds", *(_MD_HEADERS[m] for m in metrics)]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] * len(others) + ["---:"] * (1 + len(metrics))) + "|"]
    for key, members in groups.items():
        cells = [*(_cell(k, v) for k, v in zip(others, key, strict=True)), str(len(members))]
        for m in metrics:
            values = [run.results[m] for run in members if _is_number(run.results.get(m))]
            if not values:
                cells.append("-")
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
                if len(values) > 1 else 0.0
            cells.append(f"{100 * mean:.2f} ± {100 * std:.2f} %"
                         + (f" (n={len(values)})" if len(values) != len(members) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return ("\nOver seeds (mean ± sample standard deviation):\n\n" + "\n".join(lines)
            + "\n")


def _label(row: dict[str, Any], swept: list[str]) -> str:
    """The point's label in the plot: its swept values, else its run name."""
    values = [f"{k.rsplit('.', 1)[-1]}={_cell(k, row[k])}" for k in swept if row[k] != ""]
    return ", ".join(values) if values and len(", ".join(values)) <= 40 else row["run"]


def summarize(multirun_dir: str | Path, *, metric: str | None = None) -> str:
    """Write ``summary.csv``, ``summary.md`` and ``pareto.png`` into ``multirun_dir``.

    Args:
        multirun_dir: a sweep's folder (Hydra's ``hydra.sweep.dir``); every folder under it
            that holds a ``results.json`` is one run.
        metric: the accuracy the plot and the Pareto front use, ``test_acc`` or ``val_acc``
            (None: ``test_acc`` when every run has it, else ``val_acc``).

    Returns:
        The table in Markdown (also in ``summary.md``).

    Raises:
        FileNotFoundError: ``multirun_dir`` is no directory or holds no finished run.
        ValueError: a bad ``metric`` or an unreadable ``results.json``.
    """
    runs = load_runs(multirun_dir)
    metric = _pick_metric(runs, metric)
    columns, rows = _rows(runs, metric)
    root = Path(multirun_dir)
    with open(root / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    table = _markdown(columns, rows) + _notes(runs, metric) + seed_table(runs)
    unfinished = _unfinished(root)
    if unfinished:  # failed or still running: say so rather than drop them silently
        table += (f"\n{len(unfinished)} run(s) without results.json (unfinished or failed), "
                  f"left out: {', '.join(unfinished)}\n")
    (root / "summary.md").write_text(
        f"# Sweep summary: {root.name}\n\n{len(rows)} run(s); Pareto front on "
        f"{_MD_HEADERS[metric]} against FLOPs reduction (`pareto.png`).\n\n{table}")

    from lrpet_lightning.plots import plot_pareto  # matplotlib only when drawing

    swept = columns[1:columns.index("lrpet")]
    points = [{"label": _label(row, swept), "flops_reduction": row["flops_reduction"],
               "accuracy": row[metric], "pareto": row["pareto"]}
              for row, run in zip(rows, runs, strict=True)
              if run.compressed and _plottable(run, metric)]
    baselines = [{"label": f"run {row['run']}", "accuracy": row[metric]}
                 for row, run in zip(rows, runs, strict=True)
                 if not run.compressed and _is_number(row[metric])]
    if not points and not baselines:
        raise ValueError(f"no run under {str(root)!r} has a {metric} to plot; summary.csv "
                         f"and summary.md are written, pareto.png is not")
    plot_pareto(points, root / "pareto.png", accuracy_label=_MD_HEADERS[metric],
                baselines=baselines, title=f"{root.name}: {_MD_HEADERS[metric]} vs FLOPs "
                                           f"reduction ({len(points)} compressed run(s))")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``lrpet-summarize``."""
    parser = argparse.ArgumentParser(
        prog="lrpet-summarize",
        description="Summarize an lrpet-train sweep (multirun) folder: writes summary.csv, "
                    "summary.md and pareto.png into it and prints the table.")
    parser.add_argument("multirun_dir", metavar="MULTIRUN_DIR",
                        help="the sweep's folder, e.g. multirun/2026-11-27/12-00-00")
    parser.add_argument("--metric", choices=ACCURACY_METRICS, default=None,
                        help="accuracy for the plot and the Pareto front (default: test_acc "
                             "when every run has it, else val_acc)")
    args = parser.parse_args(argv)
    try:
        table = summarize(args.multirun_dir, metric=args.metric)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    root = Path(args.multirun_dir)
    print(table, end="")
    print(f"\nwrote {root / 'summary.csv'}, {root / 'summary.md'} and {root / 'pareto.png'}")


if __name__ == "__main__":
    main()
