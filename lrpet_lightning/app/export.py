"""``lrpet-export``: a run's compact model as a checked ONNX file (and OpenVINO IR, if asked).

The example input is built from the input spec the run recorded (channels, image size), so
the exported graph takes what the model was trained on: normalized images, batch first (any
batch size). The file is run in onnxruntime and compared with PyTorch before it is kept
(:func:`lrpet_lightning.core.export.export_onnx`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lrpet_lightning.app.compact import load_compact_model
from lrpet_lightning.core.checkpoint import read_compact
from lrpet_lightning.core.checks import check_int
from lrpet_lightning.core.export import (
    ATOL,
    RTOL,
    OnnxCheckError,
    OnnxMismatchError,
    check_onnx,
    export_onnx,
)
from lrpet_lightning.core.inference import RANK_MULTIPLE

__all__ = ["compact_path", "export_run", "main"]


def compact_path(run_dir_or_file: str | os.PathLike) -> Path:
    """The ``compact_model.pt`` of a run folder, or the file itself.

    Raises:
        FileNotFoundError: no such file or folder, or a folder without ``compact_model.pt``.
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        file = path / "compact_model.pt"
        if not file.is_file():
            raise FileNotFoundError(f"run folder {str(path)!r} has no compact_model.pt (the run "
                                    f"did not finish, or this is not an lrpet-train run folder)")
        return file
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist (give a run folder or its "
                                f"compact_model.pt)")
    return path


def _example_input(path: Path, batch_size: int, image_size: int | None) -> torch.Tensor:
    spec = read_compact(path)["metadata"].get("input_spec") or {}
    size = image_size if image_size is not None else spec.get("image_size")
    channels = spec.get("in_channels")
    if size is None or channels is None:
        raise ValueError(f"compact model {str(path)!r} records no input size (image_size, "
                         f"in_channels); pass --image-size")
    return torch.randn(batch_size, int(channels), int(size), int(size))


def export_run(run_dir_or_file: str | os.PathLike, out: str | os.PathLike | None = None, *,
               batch_size: int = 1, image_size: int | None = None,
               openvino: bool = False, rank_multiple: int = RANK_MULTIPLE) -> dict[str, object]:
    """Export a run's compact model to ONNX (checked in onnxruntime), optionally OpenVINO;
    factorized ranks zero-padded to multiples of ``rank_multiple`` in the file
    (:func:`~lrpet_lightning.core.export.export_onnx`).

    Returns:
        ``{"onnx": Path, "check": OnnxCheck, "openvino": Path | str | None}`` — for OpenVINO
        the ``.xml`` written, or a message saying why none was.

    Raises:
        FileNotFoundError, ValueError: a missing or foreign file (named in the message).
        OnnxMismatchError: the ONNX file computes something else than PyTorch.
    """
    check_int("batch_size", batch_size, minimum=1)
    check_int("image_size", image_size, minimum=1, optional=True)
    path = compact_path(run_dir_or_file)
    # A different --image-size on purpose (fully convolutional nets): no input-shape guard.
    model = load_compact_model(path, check_inputs=image_size is None)
    x = _example_input(path, batch_size, image_size)
    onnx_path = Path(out) if out is not None else path.with_suffix(".onnx")
    export_onnx(model, x, onnx_path, rank_multiple=rank_multiple)
    check = check_onnx(onnx_path, model, [(x,)])
    result: dict[str, object] = {"onnx": onnx_path, "check": check, "openvino": None}
    if openvino:
        result["openvino"] = _to_openvino(onnx_path, model, x)
    return result


def _to_openvino(onnx_path: Path, model: torch.nn.Module, x: torch.Tensor) -> Path | str:
    try:
        import openvino as ov
    except ImportError:
        return "OpenVINO is not installed (pip install openvino): no OpenVINO IR written"
    xml = onnx_path.with_suffix(".xml")
    # save_model stores float16 weights unless told not to (0.015 max abs difference on
    # ResNet-20): keep the float32 weights the ONNX file has.
    ov.save_model(ov.convert_model(os.fspath(onnx_path)), os.fspath(xml),
                  compress_to_fp16=False)
    # The file written is what is checked. On CPUs with bf16 units (AMX, AVX512-BF16)
    # OpenVINO infers in bf16 unless told otherwise (0.15 off on ResNet-20): check in f32.
    compiled = ov.compile_model(os.fspath(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.from_numpy(compiled(x.numpy())[0]).double()
    with torch.no_grad():
        want = model(x).double()
    diff = (got - want).abs()
    if not bool((diff <= ATOL + RTOL * want.abs()).all()):
        bad = [xml, xml.with_suffix(".bin")]
        for file in bad:
            if file.exists():
                os.replace(file, file.with_name(file.name + ".mismatch"))
        raise OnnxMismatchError(
            f"the OpenVINO model {str(xml)!r} computes something else than PyTorch: max abs "
            f"difference {float(diff.max()):.3g}; renamed to *.mismatch")
    return xml


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.2f} MiB"


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``lrpet-export``."""
    parser = argparse.ArgumentParser(
        prog="lrpet-export",
        description="Export a run's compact model to ONNX (dynamic batch), checked against "
                    "PyTorch in onnxruntime; with --openvino also to OpenVINO IR.")
    parser.add_argument("source", metavar="RUN_DIR_OR_COMPACT_PT",
                        help="an lrpet-train run folder or its compact_model.pt")
    parser.add_argument("--out", default=None,
                        help="the .onnx file (default: compact_model.onnx beside the .pt)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="batch size of the example input (the file takes any)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input height = width (default: the run's recorded image size)")
    parser.add_argument("--rank-multiple", type=int, default=RANK_MULTIPLE,
                        help="zero-pad each factorized rank to a multiple of it in the file "
                             "(same outputs, faster in onnxruntime; 1: as trained)")
    parser.add_argument("--openvino", action="store_true",
                        help="also write OpenVINO IR (.xml/.bin), if openvino is installed")
    args = parser.parse_args(argv)
    try:
        result = export_run(args.source, args.out, batch_size=args.batch_size,
                            image_size=args.image_size,
                            openvino=args.openvino, rank_multiple=args.rank_multiple)
    except (FileNotFoundError, ValueError, TypeError, ImportError, OnnxMismatchError,
            OnnxCheckError) as err:
        parser.error(str(err))
    onnx_path, check, ov = result["onnx"], result["check"], result["openvino"]
    print(f"wrote {onnx_path} ({_size(onnx_path)}); onnxruntime vs PyTorch: max abs "
          f"difference {check.max_abs:.3g}, max rel {check.max_rel:.3g}")
    if isinstance(ov, Path):
        print(f"wrote {ov} and {ov.with_suffix('.bin')} ({_size(ov.with_suffix('.bin'))})")
    elif ov is not None:
        print(ov)


if __name__ == "__main__":
    main()
