"""ONNX export (core.export.export_onnx) and the ``lrpet-export`` command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from lrpet_lightning import decompose_, project_low_rank_  # noqa: E402
from lrpet_lightning.core.export import (  # noqa: E402
    OnnxCheckError,
    OnnxMismatchError,
    check_onnx,
    export_onnx,
)
from lrpet_lightning.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    model, x = build_model("resnet20"), torch.randn(2, 3, 32, 32)
    project_low_rank_(model, rank_ratio=0.4, example_inputs=x)  # exact: decompose_ loses nothing
    decompose_(model, rank_ratio=0.4, example_inputs=x)
    return model


def test_decomposed_resnet20_exports_and_matches_pytorch_at_any_batch_size(
        resnet20: nn.Module, tmp_path: Path) -> None:
    resnet20.train()
    path = export_onnx(resnet20, torch.randn(1, 3, 32, 32), tmp_path / "sub" / "r20.onnx")
    assert path == tmp_path / "sub" / "r20.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["r20.onnx"]  # weights inside
    assert resnet20.training  # its mode is restored
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "BatchNormalization" not in ops  # folded by the exporter (eval mode)
    convs = sum(n.op_type == "Conv" for n in onnx.load(path).graph.node)
    assert convs > 21  # resnet20 has 21 dense convs; the factorized ones are two each
    check = check_onnx(path, resnet20.eval(), [(torch.randn(1, 3, 32, 32),),
                                                (torch.randn(4, 3, 32, 32),)])
    assert check.passed and check.batch_sizes == (1, 4)
    assert check.max_abs < 1e-4 and check.max_rel < 1e-3


def _conv_widths(path: Path) -> list[int]:
    """Output channels of every Conv weight in the file, in graph order."""
    graph = onnx.load(path).graph
    weights = {t.name: t.dims for t in graph.initializer}
    return [weights[n.input[1]][0] for n in graph.node
            if n.op_type == "Conv" and n.input[1] in weights]


@pytest.mark.parametrize("multiple", [1, 8, 16])
def test_ranks_are_zero_padded_in_the_file_and_the_outputs_kept(
        resnet20: nn.Module, tmp_path: Path, multiple: int) -> None:
    from lrpet_lightning.core import decomposed_ranks

    ranks = decomposed_ranks(resnet20)
    assert any(r % 8 for r in ranks.values())  # rank_ratio 0.4 of 16/32/64: 6, 13, 26
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    path = export_onnx(resnet20, torch.randn(1, 3, 32, 32), tmp_path / "r20.onnx",
                       rank_multiple=multiple)
    widths = _conv_widths(path)
    padded = sorted({-(-r // multiple) * multiple for r in ranks.values()})
    for rank in padded:  # each first thin conv's width, padded
        assert rank in widths
    if multiple > 1:
        assert not {r for r in ranks.values() if r % multiple} & set(widths)
    # The model is untouched, and the file computes what it does (checked inside too).
    assert decomposed_ranks(resnet20) == ranks
    assert all(torch.equal(v, before[k]) for k, v in resnet20.state_dict().items())
    check = check_onnx(path, resnet20.eval(), [(torch.randn(3, 3, 32, 32),)])
    assert check.passed and check.max_abs < 1e-4


def test_a_file_that_computes_something_else_is_not_kept(
        resnet20: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = ort.InferenceSession.run

    def corrupted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return [o + 0.01 for o in run(self, *args, **kwargs)]

    monkeypatch.setattr(ort.InferenceSession, "run", corrupted)
    path = tmp_path / "r20.onnx"
    with pytest.raises(OnnxMismatchError, match=r"max abs difference 0\.01.*max rel") as err:
        export_onnx(resnet20, torch.randn(1, 3, 32, 32), path, dynamic_batch=False)
    assert "r20.onnx.mismatch" in str(err.value)
    assert not path.exists() and (tmp_path / "r20.onnx.mismatch").is_file()


def test_a_static_batch_export_takes_only_its_batch_size(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    path = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "s.onnx", dynamic_batch=False)
    assert check_onnx(path, model.eval(), [(torch.randn(2, 3, 8, 8),)]).passed
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    with pytest.raises(InvalidArgument, match="(?i)dimension"):
        check_onnx(path, model, [(torch.randn(3, 3, 8, 8),)])


def test_bad_arguments_and_missing_packages(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, out = nn.Linear(3, 2), torch.randn(1, 3), tmp_path / "m.onnx"
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple"):
        export_onnx(model, {"input": x}, out)
    with pytest.raises(TypeError, match="opset must be an int"):
        export_onnx(model, x, out, opset="18")
    with pytest.raises(ValueError, match="rtol must be a number >= 0.0"):
        export_onnx(model, x, out, rtol=-1.0)
    with pytest.raises(ValueError, match="rank_multiple must be .*>= 1.*got 0"):
        export_onnx(model, x, out, rank_multiple=0)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"needs onnxscript.*\.\[export\]"):
        export_onnx(model, x, out)
    assert not out.exists()


def test_lrpet_export_of_a_trained_run(cfg_tiny, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from lrpet_lightning.app.export import main
    from lrpet_lightning.app.train import train

    results = train(cfg_tiny)
    pt = Path(results["compact_model"])
    main([str(pt.parent)])  # the run folder: compact_model.onnx beside the .pt
    printed = capsys.readouterr().out
    assert f"wrote {pt.with_suffix('.onnx')}" in printed and "max abs difference" in printed
    session = ort.InferenceSession(str(pt.with_suffix(".onnx")))
    shape = session.get_inputs()[0].shape  # digits: 1 channel, 16x16 in the app
    assert shape[1:] == [1, 16, 16] and not isinstance(shape[0], int)  # dynamic batch

    monkeypatch.setitem(sys.modules, "openvino", None)  # as where it is not installed
    out = tmp_path / "exports" / "digits.onnx"
    main([str(pt), "--out", str(out), "--batch-size", "4", "--openvino"])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "OpenVINO is not installed" in printed
    assert out.is_file() and not out.with_suffix(".xml").exists()

    # Ranks padded to multiples of 8 by default; --rank-multiple 1 keeps them as trained.
    from lrpet_lightning.app.compact import load_compact_model
    from lrpet_lightning.core import decomposed_ranks

    ranks = set(decomposed_ranks(load_compact_model(pt)).values())
    assert any(r % 8 for r in ranks)
    as_trained = tmp_path / "as_trained.onnx"
    main([str(pt), "--out", str(as_trained), "--rank-multiple", "1"])
    assert ranks <= set(_conv_widths(as_trained))
    assert not {r for r in ranks if r % 8} & set(_conv_widths(pt.with_suffix(".onnx")))


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "nowhere.pt", "nowhere.pt' does not exist"),
    (lambda d: d, "has no compact_model.pt"),
    (lambda d: (d / "junk.pt").write_bytes(b"not a model") and d / "junk.pt", "junk.pt"),
])
def test_lrpet_export_names_a_bad_path(make, message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    from lrpet_lightning.app.export import main

    with pytest.raises(SystemExit) as err:
        main([str(make(tmp_path))])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_openvino_ir_is_written_and_checked_where_openvino_is_installed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in ``openvino`` (so that a wrong result can be made): the IR is saved
    beside the .onnx and its outputs are checked; a wrong one is renamed, not kept."""
    import types

    from lrpet_lightning.app.export import _to_openvino

    shift = {"by": 0.0}

    def compile_model(model_path, device, config):  # type: ignore[no-untyped-def]
        assert config == {"INFERENCE_PRECISION_HINT": "f32"}  # bf16 on AMX CPUs otherwise
        sess = ort.InferenceSession(model_path)
        return lambda x: [o + shift["by"] for o in sess.run(None, {"input": x})]

    def save_model(model_path, xml, compress_to_fp16):  # type: ignore[no-untyped-def]
        assert compress_to_fp16 is False  # float16 weights otherwise
        Path(xml).write_text("<net/>")
        Path(xml).with_suffix(".bin").write_bytes(Path(model_path).read_bytes())

    def compiled_file(path, device, config):  # type: ignore[no-untyped-def]
        # the saved .xml is what is checked: its .bin holds the ONNX file here
        return compile_model(str(Path(path).with_suffix(".bin")), device, config)

    fake = types.SimpleNamespace(convert_model=lambda p: p, save_model=save_model,
                                 compile_model=compiled_file)
    monkeypatch.setitem(sys.modules, "openvino", fake)
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval(), torch.randn(1, 3, 8, 8)
    onnx_path = export_onnx(model, x, tmp_path / "m.onnx")
    assert _to_openvino(onnx_path, model, x) == tmp_path / "m.xml"
    assert (tmp_path / "m.bin").is_file()
    shift["by"] = 0.5
    with pytest.raises(OnnxMismatchError, match="max abs difference 0.5"):
        _to_openvino(onnx_path, model, x)
    assert not (tmp_path / "m.xml").exists() and (tmp_path / "m.xml.mismatch").is_file()


def test_real_openvino_ir_of_a_decomposed_model_matches_pytorch(
        resnet20: nn.Module, tmp_path: Path) -> None:
    # The real OpenVINO: save_model writes float16 weights by default (0.015 off on
    # ResNet-20) and CPUs with bf16 units infer in bf16 by default (0.15 off): the IR must
    # keep float32 weights, and the check asks for f32 inference.
    ov = pytest.importorskip("openvino")
    from lrpet_lightning.app.export import _to_openvino

    x = torch.randn(1, 3, 32, 32)
    onnx_path = export_onnx(resnet20, x, tmp_path / "r20.onnx")
    xml = _to_openvino(onnx_path, resnet20.eval(), x)
    assert xml == tmp_path / "r20.xml" and xml.with_suffix(".bin").is_file()
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x4 = torch.randn(4, 3, 32, 32)  # the IR keeps the dynamic batch
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(compiled(x4.numpy())[0]), resnet20(x4),
                                   rtol=1e-3, atol=1e-4)


def test_a_dynamic_batch_export_from_a_batch_of_one(tmp_path: Path) -> None:
    # torch.export makes a size-1 dimension a constant; timm's ConvNeXt then failed to
    # export with a dynamic batch from a batch-1 example (lrpet-export's default).
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    path = export_onnx(model, x, tmp_path / "convnext.onnx")
    check = check_onnx(path, model, [(x,), (torch.randn(3, 3, 64, 64),)])
    assert check.passed and check.batch_sizes == (1, 3)


def _two_convs(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_file_onnxruntime_cannot_run_is_not_left_as_checked(dtype, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(OnnxCheckError, match=rf"could not be checked in onnxruntime.*the model "
                                             rf"has {name} weights: export a float32 copy"):
        export_onnx(_two_convs(dtype), torch.randn(1, 3, 16, 16, dtype=dtype), path)
    assert not path.exists() and (tmp_path / "m.onnx.unchecked").exists()


def test_a_float16_model_is_checked_at_float16_tolerances(tmp_path: Path) -> None:
    # Its own round-off (5e-4 here) exceeds the float32 tolerances.
    model, x = _two_convs(torch.float16), torch.randn(1, 3, 16, 16, dtype=torch.float16)
    export_onnx(model, x, tmp_path / "m.onnx")
    with pytest.raises(OnnxMismatchError, match="allowed: atol=0.0001"):
        export_onnx(model, x, tmp_path / "strict.onnx", rtol=1e-3, atol=1e-4)


class DynamicCache:
    """Stands in for transformers' cache object, which torch.export cannot flatten."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class _ReturnsACache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor):
        y = self.lin(x)
        return y, DynamicCache(y)


def test_an_export_failure_names_the_model_and_hints_at_use_cache(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)could not export _ReturnsACache.*use_cache=False"):
        export_onnx(_ReturnsACache().eval(), torch.randn(2, 4), tmp_path / "m.onnx")
