"""ONNX export of a (decomposed) model, checked against PyTorch in onnxruntime.

An exported file that computes something else than the model is worse than none: it is
deployed and scores wrongly without a word. :func:`export_onnx` therefore runs the file it
wrote in onnxruntime and compares its outputs with PyTorch's before returning; a file that
does not match is renamed to ``<name>.mismatch`` and an error names the difference.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` based; it needs
``onnxscript``): it is the default since torch 2.9, it takes a dynamic batch dimension as a
``torch.export.Dim``, and the TorchScript exporter (``dynamo=False``) warns that it is
deprecated. A factorized layer exports as two plain convs (or linears): ONNX needs no custom op.

Needs the ``export`` extra (``onnx``, ``onnxruntime``, ``onnxscript``), imported only when
called. Plain PyTorch: nothing here imports lightning or hydra.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lrpet_lightning.core.checks import check_bool, check_float, check_int
from lrpet_lightning.core.inference import RANK_MULTIPLE, pad_ranks, tensor_leaves
from lrpet_lightning.core.trace import eval_mode

__all__ = ["OnnxCheck", "OnnxCheckError", "OnnxMismatchError", "check_onnx", "export_onnx"]

#: Default tolerances of the onnxruntime check (float32 kernels differ in summation order:
#: measured ~1e-6 relative on ResNet-20, ~1e-5 on ResNet-50).
RTOL, ATOL = 1e-3, 1e-4
#: The same for a float16 model (its own round-off: 5e-4 max abs on two convs, 1.5e-3 on a
#: ResNet-18 with outputs of about 1).
RTOL_FLOAT16, ATOL_FLOAT16 = 1e-2, 5e-3


class OnnxMismatchError(RuntimeError):
    """The exported file's outputs differ from PyTorch's beyond the tolerance."""


class OnnxCheckError(RuntimeError):
    """The exported file could not be run in onnxruntime, so it is not checked."""


@dataclass(frozen=True)
class OnnxCheck:
    """Largest differences between onnxruntime's and PyTorch's outputs over the inputs run.

    ``max_abs`` is ``max |ort - torch|``; ``max_rel`` is ``max |ort - torch| / |torch|``
    over the elements whose ``|torch|`` exceeds ``atol`` (elsewhere a ratio means nothing);
    ``batch_sizes`` are those of the inputs checked.
    """

    max_abs: float
    max_rel: float
    passed: bool
    batch_sizes: tuple[int, ...]


def _needs(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs {module} (with onnx, onnxruntime and onnxscript): "
            "pip install -e '.[export]'") from err


def _as_args(example_inputs: Any) -> tuple[Tensor, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
            isinstance(t, Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple of tensors (the model's "
                    f"positional inputs), got {type(example_inputs).__name__}")


def _like(args: tuple[Tensor, ...], batch: int, seed: int) -> tuple[Tensor, ...]:
    """Random inputs of ``args``' shapes at batch size ``batch`` (integer inputs, e.g. token
    ids, are repeated from the example, not drawn: random ids may be out of range)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in args:
        shape = (batch, *t.shape[1:])
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=gen, dtype=t.dtype).to(t.device))
        else:
            out.append(t[:1].expand(shape).clone())
    return tuple(out)


def check_onnx(path: str | os.PathLike, model: nn.Module, inputs: list[tuple[Tensor, ...]],
               *, rtol: float = RTOL, atol: float = ATOL) -> OnnxCheck:
    """Run ``path`` in onnxruntime (CPU) on each input tuple and compare with ``model``.

    Passes when every element satisfies ``|ort - torch| <= atol + rtol * |torch|``.
    ``model`` is run as it is (put it in eval mode first).

    Raises:
        ImportError: onnxruntime is not installed.
        ValueError: the file's outputs are not those of the model (count or shapes).
    """
    ort = _needs("onnxruntime")
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    max_abs = max_rel = 0.0
    passed = True
    with torch.no_grad():
        for args in inputs:
            if len(names) != len(args):
                raise ValueError(f"{os.fspath(path)!r} takes {len(names)} inputs, "
                                 f"got {len(args)}")
            got = session.run(None, {n: a.detach().cpu().numpy()
                                     for n, a in zip(names, args, strict=True)})
            want = tensor_leaves(model(*args))
            if len(got) != len(want):
                raise ValueError(f"{os.fspath(path)!r} returns {len(got)} outputs, the model "
                                 f"{len(want)}")
            for g, w in zip(got, want, strict=True):
                w = w.detach().cpu().double()
                g = torch.from_numpy(g).double()
                if g.shape != w.shape:
                    raise ValueError(f"{os.fspath(path)!r} returns shape {tuple(g.shape)}, "
                                     f"the model {tuple(w.shape)}")
                diff = (g - w).abs()
                max_abs = max(max_abs, float(diff.max()) if diff.numel() else 0.0)
                big = w.abs() > atol
                if bool(big.any()):
                    max_rel = max(max_rel, float((diff[big] / w.abs()[big]).max()))
                passed &= bool((diff <= atol + rtol * w.abs()).all())
    return OnnxCheck(max_abs, max_rel, passed, tuple(int(a[0].shape[0]) for a in inputs))


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
    rank_multiple: int = RANK_MULTIPLE,
) -> Path:
    """Export ``model`` to an ONNX file and check it in onnxruntime against PyTorch.

    The file is checked on ``example_inputs``, on random inputs of the same shape and, with
    ``dynamic_batch``, on random inputs of another batch size. The weights are stored in
    the file itself (no ``.onnx.data`` beside it; ONNX caps that at 2 GB).

    No ``prepare_for_inference`` is needed first: the exporter already folds each eval-mode
    BatchNorm into the conv before it (measured on ResNet-20: the same graph, 38 Conv and no
    BatchNormalization, with or without it), ONNX has no memory format (channels_last is
    not in the graph), and which form of a layer is faster is onnxruntime's matter, not
    PyTorch's.

    Each factorized layer's rank is padded with zero channels to a multiple of
    ``rank_multiple`` in the file (:func:`~lrpet_lightning.core.inference.pad_ranks`: the
    same outputs; ``model`` itself is not changed). onnxruntime's CPU convolutions run a
    blocked layout only where channel counts allow it: measured on ResNet-50 at 0.465 of
    the FLOPs (2 threads), padding to multiples of 8 took the compact model from 0.73 to
    0.64 of the dense latency at batch 1 and from 0.63 to 0.56 at batch 16, for 0.477 of
    the FLOPs. Ranks solved as multiples (``rank_multiple=16`` in training) do better still.

    Args:
        model: any ``nn.Module`` taking tensors, typically after ``decompose_``; exported in
            eval mode (each module's mode is restored afterwards).
        example_inputs: a tensor or a tuple of tensors (positional inputs), batch first.
        path: the ``.onnx`` file to write (its folder is created).
        opset: the ONNX opset; ``None``: the exporter's default.
        dynamic_batch: the first dimension of every input is dynamic (any batch size).
        rtol, atol: the check passes when ``|ort - torch| <= atol + rtol * |torch|``;
            ``None``: ``RTOL, ATOL`` (1e-3, 1e-4), or ``RTOL_FLOAT16, ATOL_FLOAT16``
            (1e-2, 5e-3) for a model with float16 weights.
        rank_multiple: pad each factorized layer's rank to a multiple of it; 1: as it is.

    Returns:
        ``path``, checked.

    Raises:
        ImportError: onnx, onnxruntime or onnxscript is missing (``pip install '.[export]'``).
        TypeError, ValueError: an argument of the wrong type or out of range.
        OnnxMismatchError: the file's outputs differ beyond the tolerance; the message names
            the max abs/rel difference, and the file is renamed to ``<path>.mismatch``.
        OnnxCheckError: onnxruntime cannot run the file (e.g. a float64 or bfloat16 model:
            its CPU convolutions are float32 and float16); it is renamed to
            ``<path>.unchecked``.
        RuntimeError: torch.onnx.export cannot export the model (its message, with a hint
            where one is known).

    Example::

        model = build_model("resnet20")
        decompose_(model, rank_ratio=0.4)
        export_onnx(model, torch.randn(1, 3, 32, 32), "resnet20.onnx")
    """
    args = _as_args(example_inputs)
    check_int("opset", opset, minimum=7, optional=True, meaning="ONNX opset version")
    check_bool("dynamic_batch", dynamic_batch)
    half = any(p.dtype == torch.float16 for p in model.parameters())
    rtol = (RTOL_FLOAT16 if half else RTOL) if rtol is None else rtol
    atol = (ATOL_FLOAT16 if half else ATOL) if atol is None else atol
    check_float("rtol", rtol, low=0.0)
    check_float("atol", atol, low=0.0)
    check_int("rank_multiple", rank_multiple, minimum=1,
              meaning="multiple the exported ranks are zero-padded to")
    _needs("onnxscript")
    _needs("onnx")
    _needs("onnxruntime")  # before the export: a file is only left where it was checked
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):  # every module's own training flag comes back afterwards
        n = int(args[0].shape[0])
        traced = args
        if dynamic_batch and n == 1:
            # torch.export specializes a dimension of size 1 to a constant, and then a
            # dynamic batch fails on many models (timm ConvNeXt, torchvision MobileNetV2):
            # export on the example repeated to a batch of 2; the file is checked at 1.
            traced = tuple(a.expand(2, *a.shape[1:]).clone() for a in args)
        _export(pad_ranks(model, rank_multiple), traced, path, opset, dynamic_batch)
        inputs = [args, _like(args, n, seed=0)]
        if dynamic_batch:
            inputs.append(_like(args, 2 if n == 1 else 1, seed=1))
        try:
            result = check_onnx(path, model, inputs, rtol=rtol, atol=atol)
        except Exception as err:  # onnxruntime's own errors have no common base class
            unchecked = path.with_name(path.name + ".unchecked")
            os.replace(path, unchecked)
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                             if p.dtype in (torch.float64, torch.bfloat16)})
            hint = (f" (onnxruntime's CPU convolutions take float32 and float16, the model has "
                    f"{' and '.join(dtypes)} weights: export a float32 copy, model.float())"
                    if dtypes else "")
            raise OnnxCheckError(
                f"the ONNX export of {type(model).__name__} could not be checked in "
                f"onnxruntime: {type(err).__name__}: {err}{hint}. Not kept as {str(path)!r}: "
                f"renamed to {str(unchecked)!r}") from err
    if not result.passed:
        rejected = path.with_name(path.name + ".mismatch")
        os.replace(path, rejected)
        raise OnnxMismatchError(
            f"the ONNX export of {type(model).__name__} computes something else than PyTorch: "
            f"max abs difference {result.max_abs:.3g}, max rel difference "
            f"{result.max_rel:.3g} (allowed: atol={atol:g} + rtol={rtol:g} x |output|), "
            f"on batch sizes {list(result.batch_sizes)}. Not kept as {str(path)!r}: renamed to "
            f"{str(rejected)!r} for inspection")
    return path


def _export(net: nn.Module, args: tuple[Tensor, ...], path: Path, opset: int | None,
            dynamic_batch: bool) -> None:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in args)
    with warnings.catch_warnings(), torch.no_grad():
        # torch.export notes each guard it adds as a warning; the check below is what counts.
        warnings.simplefilter("ignore", UserWarning)
        try:
            torch.onnx.export(
                net, args, os.fspath(path), dynamo=True, external_data=False, verbose=False,
                opset_version=opset, dynamic_shapes=dynamic_shapes,
                input_names=[f"input{i}" if len(args) > 1 else "input"
                             for i in range(len(args))],
            )
        except Exception as err:
            hint = ""
            if "DynamicCache" in str(err) or "Cache" in type(err).__name__:
                hint = (" Hint: the model returns a transformers cache, which torch.export "
                        "cannot flatten; build it with use_cache=False in its config.")
            raise RuntimeError(f"torch.onnx.export could not export {type(net).__name__}: "
                               f"{type(err).__name__}: {err}{hint}") from err
