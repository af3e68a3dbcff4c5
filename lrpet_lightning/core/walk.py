"""Model walking: which layers LRPET targets, their ranks, and which BatchNorm follows each.

Conv -> BN pairs come from the model's data flow (the BatchNorm whose input *is* the
conv's output in a forward pass), never from module order: real models register modules
in an order unrelated to how they are called (torchvision's ResNet registers ``bn1`` right
after ``conv1`` but a downsample conv's BN lives elsewhere, DenseNet puts BN *before* conv).
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.linalg import rank_from_ratio

__all__ = [
    "CONV_TYPES",
    "BNPairTracer",
    "TargetLayer",
    "full_rank_of",
    "run_forward",
    "select_layers",
    "trace_bn_pairs",
]

log = logging.getLogger("lrpet_lightning")

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class TargetLayer:
    """One layer LRPET projects: its qualified name, module, kept rank and following BN."""

    name: str
    module: nn.Module
    rank: int
    full_rank: int
    bn: _BatchNorm | None = None
    bn_name: str | None = None


def full_rank_of(module: nn.Module) -> int:
    w = module.weight
    return min(w.shape[0], w[0].numel())


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _skip_reason(name: str, module: nn.Module, parent: nn.Module | None) -> str | None:
    """Why an otherwise eligible Conv/Linear cannot be projected, or None."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "uninitialized lazy module (run one forward pass first)"
    if isinstance(module, CONV_TYPES) and module.groups != 1:
        return f"grouped conv (groups={module.groups})"
    if isinstance(parent, nn.MultiheadAttention):
        # MultiheadAttention reads out_proj.weight directly in its functional forward.
        return "inside nn.MultiheadAttention (its parent reads .weight directly)"
    return None


def _eligible_type(module: nn.Module, include_linear: bool) -> bool:
    if isinstance(module, CONV_TYPES):
        return True
    return include_linear and isinstance(module, nn.Linear)


def select_layers(model: nn.Module, config: LowRankConfig) -> list[TargetLayer]:
    """The layers ``config`` targets in ``model``, with their ranks, in module order.

    Raises:
        ValueError: a pattern of ``include``/``exclude``/``ranks`` matches no eligible layer,
            a grouped conv is named explicitly in ``include``, or nothing is left to project.
    """
    from lrpet_lightning.core.factorized import FactorizedLayer  # avoid an import cycle

    parents: dict[str, nn.Module] = {}
    inside_factorized: set[str] = set()
    for name, module in model.named_modules():
        for child_name, _ in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            parents[full] = module
            if isinstance(module, FactorizedLayer) or name in inside_factorized:
                inside_factorized.add(full)

    eligible: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if name in inside_factorized or not _eligible_type(module, config.include_linear):
            continue
        reason = _skip_reason(name, module, parents.get(name))
        if reason is None:
            eligible.append((name, module))
            continue
        if config.include and any(name == p for p in config.include):
            raise ValueError(
                f"include names {name!r}, which cannot be projected: {reason}. "
                "Only Conv1d/2d/3d with groups=1 and nn.Linear layers are supported"
            )
        skipped.append(f"{name} ({reason})")
    if skipped:
        log.info("LRPET skips %d layer(s): %s", len(skipped), ", ".join(skipped))

    names = [n for n, _ in eligible]
    for arg in ("include", "exclude"):
        for pattern in getattr(config, arg) or ():
            if not any(_matches(n, [pattern]) for n in names):
                raise ValueError(
                    f"{arg} pattern {pattern!r} matches no eligible layer; eligible layers: "
                    f"{_preview(names)}"
                )
    if config.include:
        eligible = [(n, m) for n, m in eligible if _matches(n, config.include)]
    if config.exclude:
        eligible = [(n, m) for n, m in eligible if not _matches(n, config.exclude)]

    ranks = config.ranks or {}
    for pattern in ranks:
        if not any(_matches(n, [pattern]) for n, _ in eligible):
            raise ValueError(
                f"ranks pattern {pattern!r} matches no targeted layer; targeted layers: "
                f"{_preview([n for n, _ in eligible])}"
            )

    layers = []
    for name, module in eligible:
        spec = _rank_spec(name, ranks, config.rank_ratio)
        if spec is None:
            continue
        n = full_rank_of(module)
        if isinstance(spec, float):
            rank = rank_from_ratio(n, spec, config.min_rank)
        else:
            rank = min(max(spec, config.min_rank), n)
        layers.append(TargetLayer(name, module, rank, n))
    if not layers:
        raise ValueError(
            f"no layer of {type(model).__name__} is targeted: LRPET projects Conv1d/2d/3d with "
            "groups=1 (and nn.Linear with include_linear=True); check include/exclude"
        )
    return layers


def _rank_spec(name: str, ranks: Mapping[str, float | int], default: float | None):
    if name in ranks:
        return ranks[name]
    for pattern, spec in ranks.items():
        if fnmatch.fnmatchcase(name, pattern):
            return spec
    return default


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "(none)"


# ------------------------------------------------------------------------ BN pairing
class BNPairTracer:
    """Context manager that records, during whatever forward passes run inside it, which
    BatchNorm consumes each target layer's output tensor directly.

    Output tensors are kept referenced while tracing, so Python cannot reuse their ``id``
    for another tensor (a freed tensor's id is often handed to the next one).

    Example:
        >>> with BNPairTracer(model, layers) as tracer:
        ...     model(x)
        >>> tracer.pairs()  # {"conv1": ("bn1", bn1_module), ...}
    """

    def __init__(self, model: nn.Module, layers: Iterable[TargetLayer]) -> None:
        self._model = model
        self._layer_names = {id(layer.module): layer.name for layer in layers}
        self._outputs: dict[int, tuple[Tensor, str, int | None]] = {}
        self._found: dict[str, set[str]] = {}
        self._bns: dict[str, _BatchNorm] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> BNPairTracer:
        for name, module in self._model.named_modules():
            if id(module) in self._layer_names:
                self._handles.append(module.register_forward_hook(self._on_layer_output))
            elif isinstance(module, _BatchNorm):
                self._bns[name] = module
                self._handles.append(
                    module.register_forward_pre_hook(self._make_bn_hook(name))
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()  # release the activations

    def _on_layer_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            self._outputs[id(output)] = (output, self._layer_names[id(module)], _version(output))

    def _make_bn_hook(self, bn_name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            entry = self._outputs.get(id(args[0]))
            # An in-place op between layer and BN (conv -> ReLU(inplace=True) -> BN) hands
            # the BN the same tensor object, modified: its version counter tells them apart.
            if entry is not None and entry[0] is args[0] and entry[2] == _version(args[0]):
                self._found.setdefault(entry[1], set()).add(bn_name)

        return hook

    def pairs(self) -> dict[str, tuple[str, _BatchNorm]]:
        """``{layer_name: (bn_name, bn_module)}`` for each layer feeding exactly one BN."""
        out = {}
        for layer, bns in self._found.items():
            if len(bns) == 1:
                (bn_name,) = bns
                out[layer] = (bn_name, self._bns[bn_name])
            else:
                warnings.warn(
                    f"LRPET: {layer} feeds several BatchNorms ({sorted(bns)}); "
                    "BN rectification is skipped for it",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return out


def _version(tensor: Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference-mode tensors (no counter)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def run_forward(model: nn.Module, example_inputs: Any) -> Any:
    """``model(example_inputs)`` for a tensor, ``model(*args)`` for a tuple/list,
    ``model(**kwargs)`` for a dict; a failure is re-raised naming ``example_inputs``."""
    try:
        if isinstance(example_inputs, Mapping):
            return model(**example_inputs)
        if isinstance(example_inputs, (tuple, list)):
            return model(*example_inputs)
        return model(example_inputs)
    except Exception as err:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(
            f"example_inputs {_describe(example_inputs)} do not run through "
            f"{type(model).__name__}: {type(err).__name__}: {err}"
        ) from err


def _describe(inputs: Any) -> str:
    if isinstance(inputs, Tensor):
        return f"of shape {tuple(inputs.shape)}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(_describe(x) for x in inputs) + ")"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in inputs.items()) + "}"
    return repr(inputs)


def trace_bn_pairs(
    model: nn.Module, layers: Iterable[TargetLayer], example_inputs: Any
) -> dict[str, tuple[str, _BatchNorm]]:
    """Find each layer's following BatchNorm with one eval-mode, no-grad forward pass.

    Eval mode keeps the BN running statistics untouched; each module's ``training``
    flag is restored afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), BNPairTracer(model, layers) as tracer:
            run_forward(model, example_inputs)
        return tracer.pairs()
    finally:
        for module, mode in modes.items():
            module.training = mode
