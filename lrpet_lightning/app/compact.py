"""The compact model a run writes, with what it takes to feed it as the run did.

``compact_model.pt`` records the network (``arch``, ``num_classes``, ``in_channels``,
``small_input``), its ``input_spec`` (image size, channels, classes and their names,
normalization, the datamodule class) and ``data``, the run's data config. A model reloaded
and fed another image size is scored wrongly without a word (digits train at 16x16 in the
app, while ``DigitsDataModule()`` defaults to 32x32): :func:`load_compact_model` checks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrpet_lightning.core.checkpoint import load_compact, read_compact
from lrpet_lightning.models import build_model

__all__ = ["input_spec", "load_compact_datamodule", "load_compact_model"]

#: Metadata ``load_compact_model`` needs to rebuild the network.
BUILD_KEYS = ("arch", "num_classes", "in_channels", "small_input")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def input_spec(datamodule: Any) -> dict[str, Any]:
    """What a model trained on ``datamodule`` expects as input (plain values, for metadata)."""
    return {"image_size": getattr(datamodule, "image_size", None),
            "in_channels": datamodule.in_channels, "num_classes": datamodule.num_classes,
            "class_names": _plain(getattr(datamodule, "class_names", None)),
            "mean": _plain(getattr(datamodule, "mean", None)),
            "std": _plain(getattr(datamodule, "std", None)),
            "datamodule": type(datamodule).__name__}


def _close(a: Any, b: Any) -> bool:
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    return len(a) == len(b) and all(
        math.isclose(float(x), float(y), rel_tol=1e-5, abs_tol=1e-7)
        for x, y in zip(a, b, strict=True))


def _check_datamodule(path: Path, spec: dict[str, Any], datamodule: Any) -> None:
    """Raise ValueError naming each way ``datamodule`` feeds inputs unlike the run did."""
    if spec.get("mean") is not None and getattr(datamodule, "mean", 0) is None:
        datamodule.setup("test")  # digits: the normalization is measured in setup
    given = input_spec(datamodule)
    wrong = [f"{key}={given[key]!r} (the run: {spec[key]!r})"
             for key in ("image_size", "in_channels", "num_classes")
             if spec.get(key) is not None and given[key] != spec[key]]
    for key in ("mean", "std"):
        if spec.get(key) is not None and given[key] is not None and not _close(given[key],
                                                                                spec[key]):
            wrong.append(f"{key}={given[key]!r} (the run: {spec[key]!r})")
    if wrong:
        raise ValueError(
            f"{type(datamodule).__name__} does not feed compact model {str(path)!r} as its run "
            f"did: {'; '.join(wrong)}. Build the data as recorded: "
            f"load_compact_datamodule({str(path)!r})")


def _input_check_hook(path: Path, spec: dict[str, Any]):
    """A forward pre-hook refusing inputs of another shape than the run's."""
    size, channels = spec.get("image_size"), spec.get("in_channels")

    def check(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return
        if (channels is not None and x.shape[1] != channels) or (
                size is not None and tuple(x.shape[2:]) != (size, size)):
            raise ValueError(
                f"compact model {str(path)!r} was trained on {channels}x{size}x{size} inputs "
                f"({spec.get('datamodule')}, image_size={size}), got "
                f"{'x'.join(map(str, x.shape[1:]))}: its predictions would be wrong. Build the "
                f"data as recorded: load_compact_datamodule({str(path)!r}) (or pass "
                f"check_inputs=False to load_compact_model)")
    return check


def load_compact_model(path: str | Path, *, datamodule: Any = None,
                       check_inputs: bool = True) -> nn.Module:
    """Rebuild and load the compact model a run wrote, in eval mode.

    Args:
        path: the run's ``compact_model.pt``.
        datamodule: checked against the recorded input spec (image size, channels, classes,
            normalization); a mismatch raises instead of scoring the model wrongly.
        check_inputs: the model refuses inputs of another shape than the run's (a forward
            pre-hook); False leaves it out (e.g. to run a fully convolutional net at another
            resolution on purpose).

    Raises:
        FileNotFoundError, ValueError: no file, an empty or truncated one, one whose metadata
            lacks what rebuilding needs, or a ``datamodule`` unlike the run's (each message
            names the file and what is wrong).

    Example::

        model = load_compact_model("outputs/.../compact_model.pt")
        datamodule = load_compact_datamodule("outputs/.../compact_model.pt")
    """
    path = Path(path)
    meta = read_compact(path)["metadata"]
    missing = [k for k in BUILD_KEYS if k not in meta]
    if missing:
        raise ValueError(f"compact model {str(path)!r} has no {', '.join(missing)} in its "
                         f"metadata (not saved by lrpet-train); rebuild the network yourself "
                         f"and use lrpet_lightning.load_compact(model, path)")
    spec = meta.get("input_spec") or {}
    if datamodule is not None and spec:
        _check_datamodule(path, spec, datamodule)
    net = build_model(meta["arch"], num_classes=meta["num_classes"],
                      in_channels=meta["in_channels"], small_input=meta["small_input"])
    net = load_compact(net, path).eval()
    if check_inputs and spec:
        net.register_forward_pre_hook(_input_check_hook(path, spec))
    return net


def load_compact_datamodule(path: str | Path) -> Any:
    """The datamodule of the run that wrote ``path``, built from its recorded data config.

    Raises:
        ValueError: the file records no data config (not written by lrpet-train).
    """
    import hydra

    data = read_compact(path)["metadata"].get("data")
    if not isinstance(data, dict) or "_target_" not in data:
        raise ValueError(f"compact model {str(path)!r} records no data config (saved without "
                         f"data=...); build its datamodule yourself")
    return hydra.utils.instantiate(data)
