"""Pictures of a compression: per-layer ranks, kept energy, singular value spectra, Pareto plots.

Matplotlib is imported lazily (Agg backend, no display needed), so importing this module
costs nothing until a figure is drawn. The spectra helpers are plain PyTorch.

Example (after a training run with ``LowRankProjectionCallback``)::

    before = layer_spectra(model, default_spectra_layers(model))
    trainer.fit(model, ...)
    after = layer_spectra(model, before)
    plot_compression(callback.compression, "compression_report.png",
                     records=callback.last_records,
                     spectra={n: (before[n], after[n]) for n in before})
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lrpet_lightning.core.checks import check_int
from lrpet_lightning.core.factorized import FactorizedLayer
from lrpet_lightning.core.linalg import weight_to_matrix
from lrpet_lightning.core.report import CompressionReport
from lrpet_lightning.core.walk import CONV_TYPES, full_rank_of

__all__ = [
    "default_spectra_layers",
    "layer_spectra",
    "plot_compression",
    "plot_pareto",
]

#: Width per layer of the rank panel, and the figure's widest (inches); the rank panel's
#: extra height per character of the longest layer name (names are rotated 90 degrees).
_BAR_INCH, _MAX_WIDTH, _LABEL_INCH_PER_CHAR = 0.2, 32.0, 0.07
#: Font size (points) of the layer names, and the least room (inches) one name needs.
_TICK_FONT, _TICK_INCH = 7, 0.14

#: Spectra below this fraction of a panel's largest singular value are off the plot: an
#: exactly rank-r weight has a tail at float round-off, which would squash the rest.
_SPECTRUM_FLOOR = 1e-3


def _has_matrix_weight(module: nn.Module) -> bool:
    if isinstance(module, FactorizedLayer):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, Tensor) and weight.dim() >= 2


def default_spectra_layers(model: nn.Module, count: int = 3) -> list[str]:
    """Names of ``count`` evenly spaced convs of ``model`` (first, middle, last for 3).

    Only ungrouped convs of full rank >= 2 qualify: the layers LRPET projects.
    """
    check_int("count", count, minimum=1, meaning="how many layers to pick")
    names = [n for n, m in model.named_modules()
             if isinstance(m, CONV_TYPES) and m.groups == 1 and full_rank_of(m) >= 2]
    if len(names) <= count:
        return names
    picks = sorted({round(i * (len(names) - 1) / (count - 1)) for i in range(count)}
                   if count > 1 else {0})
    return [names[i] for i in picks]


def layer_spectra(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """Singular values (float64, on the CPU, descending) of each named layer's weight matrix.

    A decomposed layer (two thin layers) gives the spectrum of its equivalent dense weight.

    Raises:
        ValueError: a name that is not a module of ``model`` with a weight matrix.
    """
    modules = dict(model.named_modules())
    spectra = {}
    for name in names:
        module = modules.get(name)
        if module is None or not _has_matrix_weight(module):
            eligible = [n for n, m in modules.items() if n and _has_matrix_weight(m)]
            preview = ", ".join(eligible[:8]) + (", ..." if len(eligible) > 8 else "")
            raise ValueError(f"spectra layer {name!r} is not a layer of {type(model).__name__} "
                             f"with a weight matrix; layers with one: {preview}")
        weight = module.dense_weight() if isinstance(module, FactorizedLayer) else module.weight
        with torch.no_grad():
            matrix = weight_to_matrix(weight.detach()).to("cpu", torch.float64)
            spectra[name] = torch.linalg.svdvals(matrix)
    return spectra


# --------------------------------------------------------------------------- figures
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, works on headless nodes
    import matplotlib.pyplot as plt

    return plt


def _as_dict(item: Any) -> dict[str, Any]:
    if is_dataclass(item) and not isinstance(item, type):
        return asdict(item)
    if isinstance(item, Mapping):
        return dict(item)
    raise TypeError(f"expected a dataclass or a mapping, got {type(item).__name__}")


def _kept_energy(records: Sequence[Any] | None) -> dict[str, float]:
    return {rec["name"]: rec["kept_energy"] for rec in map(_as_dict, records or [])
            if rec.get("skipped") is None}


def _layer_rows(report: Any, records: Sequence[Any] | None,
                first_records: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """One row per layer: name, rank (None: dense), full_rank, kept_energy and
    first_kept_energy (None: unknown)."""
    last, first = _kept_energy(records), _kept_energy(first_records)
    if report is not None:
        layers = report.layers if isinstance(report, CompressionReport) else report["layers"]
        rows = [{k: layer[k] for k in ("name", "rank", "full_rank")}
                for layer in map(_as_dict, layers)]
    else:
        rows = [{k: rec[k] for k in ("name", "rank", "full_rank")}
                for rec in map(_as_dict, records or first_records or [])]
    # The callback's records and report carry the same names: an exact join, so a layer
    # never shows another layer's energy (a name that is a suffix of another's included).
    for row in rows:
        row["kept_energy"] = last.get(row["name"])
        row["first_kept_energy"] = first.get(row["name"])
    return rows


def _reduction(report: Any, key: str) -> float | None:
    if report is None:
        return None
    return getattr(report, key) if isinstance(report, CompressionReport) else report.get(key)


def plot_compression(
    report: CompressionReport | Mapping[str, Any] | None,
    path: str | Path,
    *,
    records: Sequence[Any] | None = None,
    first_records: Sequence[Any] | None = None,
    spectra: Mapping[str, tuple[Any, Any]] | None = None,
    title: str | None = None,
) -> Path:
    """Render a compression as a PNG: per-layer rank and kept energy, and spectra.

    Args:
        report: a :class:`CompressionReport` or its ``to_dict()`` (``compression_report.json``);
            gives each layer's rank and full rank. None draws from ``records`` alone.
        path: the PNG file to write.
        records: the per-layer records of a projection (``LayerRecord`` or their dicts, e.g.
            ``callback.last_records``); adds each layer's kept energy. At the end of a
            converged run it is close to 1 everywhere (the weights are already rank r).
        first_records: the records of the run's first projection (``callback.first_records``),
            drawn beside them: how much energy the projection took at its first application.
        spectra: ``{layer name: (singular values before, after)}`` (tensors or sequences;
            either may be None), e.g. from :func:`layer_spectra` at fit start and at fit end.
        title: the figure's title.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: nothing to draw (no report, no records, no spectra).
    """
    has_records = bool(records or first_records)
    rows = _layer_rows(report, records, first_records) if report is not None or has_records else []
    spectra = dict(spectra or {})
    if not rows and not spectra:
        raise ValueError("plot_compression has nothing to draw: pass a report, records or "
                         "spectra ({layer name: (before, after)})")
    plt = _pyplot()
    columns = min(len(spectra), 3) or 1
    spectra_rows = math.ceil(len(spectra) / columns)
    # The rank panel grows with the layers: a fixed width per bar (up to a cap, past which
    # the names are thinned out) and room below for the longest rotated name.
    longest = max((len(row["name"]) for row in rows), default=0)
    heights = ([3.2 + _LABEL_INCH_PER_CHAR * longest] if rows else []) + [2.8] * spectra_rows
    width = min(max(10.0, 2.0 + _BAR_INCH * len(rows)), _MAX_WIDTH)
    fig = plt.figure(figsize=(width, sum(heights) + 0.9))
    grid = fig.add_gridspec(len(heights), columns, height_ratios=heights)
    if rows:
        _draw_ranks(fig.add_subplot(grid[0, :]), rows, report)
    rank_of = {row["name"]: row["rank"] for row in rows}
    for i, (name, (before, after)) in enumerate(spectra.items()):
        ax = fig.add_subplot(grid[(1 if rows else 0) + i // columns, i % columns])
        _draw_spectrum(ax, name, before, after, rank_of.get(name))
    fig.suptitle(title or "LRPET compression")
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``; return ``path`` as a Path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _tick_step(count: int, axes_inch: float) -> int:
    """Label every ``step``-th layer so that the names never overlap."""
    return max(1, math.ceil(count * _TICK_INCH / max(axes_inch, 1e-6)))


def _draw_ranks(ax: Any, rows: list[dict[str, Any]], report: Any) -> None:
    x = range(len(rows))
    full = [r["full_rank"] for r in rows]
    kept = [r["full_rank"] if r["rank"] is None else r["rank"] for r in rows]
    ax.bar(x, full, color="0.85", label="full rank")
    ax.bar(x, kept, color=["0.55" if r["rank"] is None else "tab:blue" for r in rows],
           label="kept rank (grey: left dense)")
    step = _tick_step(len(rows), ax.get_position().width * ax.figure.get_figwidth())
    ticks = list(x)[::step]
    ax.set_xticks(ticks, [rows[i]["name"] for i in ticks], rotation=90, fontsize=_TICK_FONT)
    if step > 1:
        ax.set_xlabel(f"layers (every {step}th named)", fontsize=8)
    ax.set_ylabel("rank")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    flops, params = _reduction(report, "flops_reduction"), _reduction(report, "params_reduction")
    if flops is not None:
        # Padded: the legend sits between the title and the axes.
        ax.set_title(f"per-layer rank: {100 * flops:.1f} % fewer FLOPs, "
                     f"{100 * params:.1f} % fewer parameters", fontsize=10, pad=22)
    handles, labels = ax.get_legend_handles_labels()
    series = [("first_kept_energy", "kept energy (first projection)", "o", "none"),
              ("kept_energy", "kept energy (last projection)", "o", "tab:red")]
    series = [(key, label, marker, face) for key, label, marker, face in series
              if any(r[key] is not None for r in rows)]
    if series:
        twin = ax.twinx()
        for key, label, marker, face in series:
            points = [(i, r[key]) for i, r in enumerate(rows) if r[key] is not None]
            twin.plot([i for i, _ in points], [e for _, e in points], marker, color="tab:red",
                      markerfacecolor=face, markersize=3 if face != "none" else 4,
                      linestyle="none", label=label)
        twin.set_ylim(0.0, 1.05)
        twin.set_ylabel("kept energy: top-r share of ||W||²")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # Above the axes, in one row: inside it would cover bars or energy points.
    ax.legend(handles, labels, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              ncol=len(handles), frameon=False)


def _draw_spectrum(ax: Any, name: str, before: Any, after: Any, rank: int | None) -> None:
    top = 0.0
    for values, label, style in ((before, "before training", "--"),
                                 (after, "after training", "-")):
        if values is None:
            continue
        values = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
        ax.plot(range(1, len(values) + 1), values.tolist(), style, label=label)
        top = max(top, float(values.max()) if len(values) else 0.0)
    if rank is not None:
        ax.axvline(rank, color="0.4", linestyle=":", label=f"rank {rank}")
    ax.set_yscale("log")
    if top > 0:
        ax.set_ylim(_SPECTRUM_FLOOR * top, 2 * top)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σᵢ")
    ax.legend(fontsize=7)


def plot_pareto(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    accuracy_label: str = "test top-1",
    baselines: Sequence[Mapping[str, Any]] = (),
    title: str | None = None,
) -> Path:
    """Accuracy against FLOPs reduction, the Pareto front marked, dense baselines as lines.

    Args:
        points: one mapping per compressed run: ``label``, ``flops_reduction`` and
            ``accuracy`` (fractions), ``pareto`` (bool: on the front).
        path: the PNG file to write.
        accuracy_label: the y axis' name.
        baselines: one mapping per dense run: ``label`` and ``accuracy``; each is a
            horizontal line.
        title: the figure's title.
    """
    if not points and not baselines:
        raise ValueError("plot_pareto has nothing to draw: no points and no baselines")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    xs = [100 * p["flops_reduction"] for p in points]
    ys = [100 * p["accuracy"] for p in points]
    ax.scatter(xs, ys, color="0.6", zorder=2, label="runs")
    front = sorted((x, y) for x, y, p in zip(xs, ys, points, strict=True) if p["pareto"])
    if front:
        ax.plot(*zip(*front, strict=True), "-o", color="tab:red", zorder=3, label="Pareto front")
    for x, y, p in zip(xs, ys, points, strict=True):
        ax.annotate(str(p["label"]), (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    for i, base in enumerate(baselines):
        ax.axhline(100 * base["accuracy"], linestyle="--", color=f"C{i % 10}",
                   label=f"dense baseline ({base['label']}): {100 * base['accuracy']:.2f} %")
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel(f"{accuracy_label} (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{accuracy_label} vs FLOPs reduction", fontsize=10)
    return _save(plt, fig, path)
