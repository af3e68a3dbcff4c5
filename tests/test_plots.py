"""Compression pictures: exact spectra, layer choice, PNGs written from reports and records."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lrpet_lightning import compression_report, decompose_, project_low_rank_
from lrpet_lightning.models import build_model
from lrpet_lightning.plots import (
    _layer_rows,
    default_spectra_layers,
    layer_spectra,
    plot_compression,
    plot_pareto,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise: never a spectra pick
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.dw(self.bn1(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


def test_layer_spectra_are_the_weight_matrix_singular_values() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    singular = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(36, 6, dtype=torch.float64))
    with torch.no_grad():
        conv.weight.copy_((u @ torch.diag(singular) @ v.T).reshape(6, 4, 3, 3))
    model = nn.Sequential(conv)
    spectra = layer_spectra(model, ["0"])
    assert spectra["0"].dtype == torch.float64
    torch.testing.assert_close(spectra["0"], singular, rtol=1e-5, atol=1e-6)


def test_a_decomposed_layer_keeps_the_spectrum_of_its_dense_weight() -> None:
    torch.manual_seed(0)
    model = _Net()
    project_low_rank_(model, rank_ratio=0.25, example_inputs=torch.randn(2, 3, 8, 8))
    before = layer_spectra(model, ["conv2", "conv3"])
    decompose_(model, rank_ratio=0.25)
    after = layer_spectra(model, ["conv2", "conv3"])  # FactorizedConv: product of thin pair
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-5)
        assert int((after[name] > 1e-4 * after[name][0]).sum()) == 8  # rank 0.25 * 32


def test_default_spectra_layers_are_first_middle_last_ungrouped_conv() -> None:
    assert default_spectra_layers(_Net()) == ["conv1", "conv2", "conv3"]
    assert default_spectra_layers(_Net(), count=2) == ["conv1", "conv3"]
    assert default_spectra_layers(_Net(), count=1) == ["conv1"]
    names = default_spectra_layers(build_model("resnet20"))
    assert names == ["conv1", "layer2.1.conv1", "layer3.2.conv2"]
    with pytest.raises(ValueError, match=r"count must be an int >= 1 \(how many layers to "
                                         r"pick\), got 0$"):
        default_spectra_layers(_Net(), count=0)
    with pytest.raises(TypeError, match=r"count must be an int >= 1.*got 2\.0$"):
        default_spectra_layers(_Net(), count=2.0)


@pytest.mark.parametrize("name", ["nothing", "bn1"])
def test_layer_spectra_rejects_a_layer_without_a_weight_matrix(name: str) -> None:
    with pytest.raises(ValueError, match=f"spectra layer '{name}' is not a layer of _Net.*conv1"):
        layer_spectra(_Net(), [name])


def _compressed(tmp_path: Path):
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(2, 3, 8, 8)
    names = default_spectra_layers(model)
    before = layer_spectra(model, names)
    records = project_low_rank_(model, rank_ratio=0.25, example_inputs=x, exclude=["conv3"])
    dense = copy.deepcopy(model)
    decompose_(model, rank_ratio=0.25, exclude=["conv3"])
    report = compression_report(dense, model, x)
    after = layer_spectra(model, names)
    return report, records, {n: (before[n], after[n]) for n in names}


def test_plot_compression_writes_a_png_from_a_report_or_its_json(tmp_path: Path) -> None:
    report, records, spectra = _compressed(tmp_path)
    path = plot_compression(report, tmp_path / "sub" / "report.png", records=records,
                            spectra=spectra, title="test")
    assert path == tmp_path / "sub" / "report.png"
    _assert_png(path)
    # compression_report.json read back, records as dicts, spectra as plain lists
    as_json = json.loads(json.dumps(report.to_dict()))
    _assert_png(plot_compression(as_json, tmp_path / "json.png",
                                 records=[r.to_dict() for r in records],
                                 spectra={n: (b.tolist(), None) for n, (b, _) in spectra.items()}))
    _assert_png(plot_compression(None, tmp_path / "spectra_only.png", spectra=spectra))
    _assert_png(plot_compression(None, tmp_path / "records_only.png", records=records))
    _assert_png(plot_compression(report, tmp_path / "first_and_last.png", records=records,
                                 first_records=records))


def test_layer_rows_join_report_and_records_by_name() -> None:
    # One name per layer: the callback's report rows and records carry the same names, so
    # rows join exactly; a dense-kept layer never shows another layer's energy.
    report = {"layers": [
        {"name": "model.conv1", "rank": 4, "full_rank": 16},
        {"name": "model.layer1.0.conv1", "rank": 2, "full_rank": 8},
        {"name": "model.head", "rank": None, "full_rank": 10}]}
    records = [{"name": "model.layer1.0.conv1", "rank": 2, "full_rank": 8, "kept_energy": 0.5,
                "skipped": None},
               {"name": "model.conv1", "rank": 4, "full_rank": 16, "kept_energy": 0.75,
                "skipped": None},
               {"name": "model.layer2.head", "rank": 2, "full_rank": 10, "kept_energy": 0.9,
                "skipped": None}]
    first = [{**records[1], "kept_energy": 0.25}]
    rows = _layer_rows(report, records, first)
    assert rows == [
        {"name": "model.conv1", "rank": 4, "full_rank": 16, "kept_energy": 0.75,
         "first_kept_energy": 0.25},
        {"name": "model.layer1.0.conv1", "rank": 2, "full_rank": 8, "kept_energy": 0.5,
         "first_kept_energy": None},
        {"name": "model.head", "rank": None, "full_rank": 10, "kept_energy": None,
         "first_kept_energy": None}]


def test_plots_refuse_to_draw_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plot_compression has nothing to draw"):
        plot_compression(None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="plot_pareto has nothing to draw"):
        plot_pareto([], tmp_path / "y.png")
    assert not list(tmp_path.iterdir())


def test_plot_pareto_writes_a_png(tmp_path: Path) -> None:
    points = [{"label": "rank_ratio=0.1", "flops_reduction": 0.9, "accuracy": 0.8,
               "pareto": True},
              {"label": "rank_ratio=0.2", "flops_reduction": 0.8, "accuracy": 0.7,
               "pareto": False}]
    _assert_png(plot_pareto(points, tmp_path / "pareto.png",
                            baselines=[{"label": "run 2", "accuracy": 0.95}]))


def _rows(count: int) -> list[dict]:
    """ResNet-56-like rows: ``count`` layers, energies at 1.0 where the legend used to sit."""
    return [{"name": f"layer{i // 18 + 1}.{i % 18 // 2}.conv{i % 2 + 1}", "rank": 6,
             "full_rank": 16, "kept_energy": 1.0, "first_kept_energy": 0.5}
            for i in range(count)]


def _draw(rows: list[dict]):
    from lrpet_lightning.plots import _draw_ranks, _pyplot

    plt = _pyplot()
    fig = plt.figure(figsize=(min(max(10.0, 2.0 + 0.2 * len(rows)), 32.0), 4.5))
    ax = fig.add_subplot()
    _draw_ranks(ax, rows, {"flops_reduction": 0.5, "params_reduction": 0.5})
    fig.tight_layout()
    fig.canvas.draw()
    return plt, fig, ax


def test_rank_panel_legend_is_outside_the_axes() -> None:
    # Inside, the legend covered the first layers' bars and kept-energy points.
    plt, fig, ax = _draw(_rows(55))
    legend = ax.get_legend().get_window_extent()
    assert legend.y0 >= ax.get_window_extent().y1 - 1
    assert legend.y1 <= ax.title.get_window_extent().y0 + 1  # and below the title
    plt.close(fig)


@pytest.mark.parametrize("count", [55, 400])
def test_rank_panel_names_are_readable_and_never_overlap(count: int) -> None:
    plt, fig, ax = _draw(_rows(count))
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert all(t.get_fontsize() >= 7 for t in labels)
    boxes = [t.get_window_extent() for t in labels]
    assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(boxes))
    if count == 55:  # ResNet-56: every layer named
        assert len(labels) == count
    else:  # too many to name: thinned out, and said so
        assert len(labels) < count and "every" in ax.get_xlabel()
    plt.close(fig)


def test_figure_grows_with_the_layer_count(tmp_path: Path) -> None:
    from PIL import Image

    small = plot_compression(None, tmp_path / "small.png", records=_rows(10))
    deep = plot_compression(None, tmp_path / "deep.png", records=_rows(110))
    (w_small, h_small), (w_deep, h_deep) = (Image.open(p).size for p in (small, deep))
    assert w_deep > w_small and h_deep >= h_small
