"""Compact checkpoints: the thin-layer weights plus the per-layer ranks that rebuild them."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrpet_lightning.core.inference import FOLDED_ATTR, PREPARED_ATTR
from lrpet_lightning.core.transforms import decomposed_ranks, match_architecture_

__all__ = ["COMPACT_FORMAT", "atomic_write", "load_compact", "optimizers_match", "read_compact",
           "save_compact"]

COMPACT_FORMAT = "lrpet-compact-v1"


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` and rename it onto ``path`` once fully written:
    an interrupted write never leaves a truncated file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def optimizers_match(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> bool:
    """Whether every parameter the optimizers step is one of ``model``'s. After
    ``decompose_`` they still hold the dense weights the model no longer has: their state
    would not load into the optimizers of the thin model, so a checkpoint should drop it.

    >>> model = nn.Linear(4, 4)
    >>> optimizers_match(model, [torch.optim.SGD(model.parameters(), lr=0.1)])
    True
    >>> optimizers_match(nn.Linear(4, 4), [torch.optim.SGD(model.parameters(), lr=0.1)])
    False
    """
    live = {id(p) for p in model.parameters()}
    return all(id(p) in live for optimizer in optimizers
               for group in optimizer.param_groups for p in group["params"])


def save_compact(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write a decomposed ``model`` to ``path``: its state dict, its ``{layer: rank}`` map
    and ``metadata`` (plain values: str, int, float, bool, lists and dicts of them).

    A model prepared by ``prepare_for_inference`` (or ``fold_batchnorms_``) can be saved
    too, even one it made all dense: the file lists the BatchNorms folded into convs, and
    ``load_compact`` replaces them by ``nn.Identity`` again. (Its per-layer forms are not
    kept: layers made dense load dense, padded ranks load padded, matrix-product forms as
    thin convs, all with the same outputs; channels_last is not kept.)

    The file is written to a temporary file beside ``path`` and renamed into place, so an
    interrupted save never leaves a truncated file where a good one was.
    """
    ranks = decomposed_ranks(model)
    prepared = bool(getattr(model, PREPARED_ATTR, False))
    if not ranks and not prepared:  # (prepare_for_inference may make every layer dense)
        raise ValueError(
            f"model {type(model).__name__} has no factorized layer; call decompose_(model) first"
        )
    path = Path(path)
    state = model.state_dict()
    folded = [f"{prefix}.{bn}" if prefix else bn for prefix, module in model.named_modules()
              for bn in getattr(module, FOLDED_ATTR, ())]
    payload = {"format": COMPACT_FORMAT, "ranks": ranks, "metadata": metadata,
               "folded_batchnorms": folded, "prepared": prepared,
               "state_dict": {k: v.detach().cpu() for k, v in state.items()},
               # Each module's version (BatchNorm, MNASNet...): some refuse to load without it.
               "state_metadata": {k: dict(v) for k, v in
                                  getattr(state, "_metadata", {}).items()}}
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)
    return path


def read_compact(path: str | os.PathLike) -> dict[str, Any]:
    """Load a compact file safely (``weights_only=True``: no pickled code runs).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an empty, truncated or foreign file (the message names it and says which).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compact model {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"compact model {str(path)!r} is empty (0 bytes): its save was "
                         f"interrupted or the disk was full; save it again")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
        # torch.load names neither the file nor the likely cause (a bare EOFError).
        raise ValueError(f"compact model {str(path)!r} ({path.stat().st_size} bytes) cannot "
                         f"be read: truncated, or not written by save_compact "
                         f"({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != COMPACT_FORMAT:
        raise ValueError(f"{path} is not an lrpet_lightning compact model ({COMPACT_FORMAT})")
    return payload


def load_compact(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the thin layers of a freshly built dense ``model`` from the ranks recorded in
    ``path``, load the weights, and return the model (decomposed in place).

    Example::

        model = load_compact(build_model("resnet20"), "compact_model.pt")
    """
    payload = read_compact(path)
    ranks = payload["ranks"]
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        if name not in modules:
            raise ValueError(
                f"{path} holds a factorized layer {name!r} (rank {rank}) that "
                f"{type(model).__name__} does not have: is it the same architecture?"
            )
    state = payload["state_dict"]
    # The thin layers' shapes come from the file: no truncation of the fresh random weights
    # (which are overwritten next) and so no "not rank r" warning on every reload.
    match_architecture_(model, state)
    _refold_(model, payload.get("folded_batchnorms", []), state, path)
    if payload.get("prepared"):
        setattr(model, PREPARED_ATTR, True)
    rebuilt = decomposed_ranks(model)
    missing = [n for n, r in ranks.items() if rebuilt.get(n) != r]
    if missing:
        raise ValueError(f"could not rebuild factorized layers {missing} of {path}")
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)} but the rebuilt "
                f"{type(model).__name__} expects {tuple(own[key].shape)}: another architecture?"
            )
    state = OrderedDict(state)
    if payload.get("state_metadata") is not None:  # files of older versions lack it
        state._metadata = payload["state_metadata"]  # type: ignore[attr-defined]
    model.load_state_dict(state)
    return model


def _refold_(model: nn.Module, folded: list[str], state: dict[str, Any], path: Path) -> None:
    """Give a fresh ``model`` the shape of one whose BatchNorms ``folded`` were folded into
    their convs: each becomes ``nn.Identity``, and a conv that had no bias gets one (the
    folded shift) where the file holds it."""
    if not folded:
        return
    modules = dict(model.named_modules())
    for name in folded:
        if not isinstance(modules.get(name), _BatchNorm | nn.Identity):
            raise ValueError(
                f"{path} was saved with BatchNorm {name!r} folded into its conv, but "
                f"{type(model).__name__} has {type(modules.get(name)).__name__} there: "
                "is it the same architecture?")
        model.set_submodule(name, nn.Identity())
    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if leaf == "bias" and module is not None and getattr(module, "bias", 0) is None:
            weight = module.weight
            module.bias = nn.Parameter(weight.new_zeros(value.shape),
                                       requires_grad=weight.requires_grad)
    setattr(model, FOLDED_ATTR, list(folded))
