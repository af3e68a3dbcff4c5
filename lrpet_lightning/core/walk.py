"""Model walking: which layers LRPET targets, their ranks, and why the others are left alone.

A layer is targeted only when projecting its ``.weight`` provably changes what its forward
computes: a plain Conv1d/2d/3d (``groups == 1``), ``nn.Linear`` or Hugging Face's
``Conv1D`` (a Linear with a transposed weight) whose forward is the base class's own, whose
weight is a plain parameter (no parametrization, no weight-norm hook) owned by this module
alone, and whose parent does not read the weight directly. Everything else that holds a
weight matrix is named, with its reason, in :attr:`Selection.skipped` — which the public
verbs turn into one warning the user sees.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from lrpet_lightning.core.config import LowRankConfig
from lrpet_lightning.core.linalg import factorization_pays, rank_from_ratio

__all__ = [
    "CONV_TYPES",
    "Selection",
    "TargetLayer",
    "copy_model",
    "hook_count",
    "is_hf_conv1d",
    "layer_matrix",
    "select",
    "select_layers",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Parents whose own (functional or fused) forward reads these children's weights directly,
# so a factorized child would be rebuilt into a dense matrix on every read.
_READING_PARENTS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,  # out_proj.weight in F.multi_head_attention_forward
    nn.TransformerEncoderLayer,  # linear1/linear2.weight in its fused inference path
    nn.TransformerDecoderLayer,
)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``transformers.pytorch_utils.Conv1D``: ``x @ W + b`` with ``W`` of shape
    ``(in, out)`` — a Linear with a transposed weight (all of GPT-2's compute). Recognised
    by its class and attributes, so core does not import transformers."""
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), Tensor))


def layer_matrix(module: nn.Module, weight: Tensor | None = None) -> Tensor:
    """The weight matrix LRPET works on: one row per output channel, ``(N, C*prod(kernel))``
    for a conv, ``(out, in)`` for a Linear and for a Hugging Face ``Conv1D`` (whose stored
    weight is ``(in, out)``). A view of ``weight`` (default ``module.weight``)."""
    w = module.weight if weight is None else weight
    if is_hf_conv1d(module):
        return w.mT
    return w.reshape(w.shape[0], -1)


def full_rank_of(module: nn.Module) -> int:
    """``min(rows, cols)`` of the layer's weight matrix: the largest rank it can have."""
    w = module.weight
    return min(w.shape[0], w[0].numel())


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also of a model holding a computed tensor as a plain
    attribute (the legacy ``nn.utils.weight_norm`` hook keeps ``.weight = g * v / ||v||``,
    which ``deepcopy`` refuses): such a tensor is copied detached; the hook recomputes it
    before every forward.

    Example:
        >>> net = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 4)))
        >>> copy_model(net)[0].weight_v.shape
        torch.Size([4, 4])
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


@dataclass
class TargetLayer:
    """One layer LRPET projects: its qualified name, module, kept rank and following BN."""

    name: str
    module: nn.Module
    rank: int
    full_rank: int
    bn: _BatchNorm | None = None
    bn_name: str | None = None
    #: Every name the module is registered under (a module shared by two parents).
    aliases: tuple[str, ...] = ()

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is the transpose of :meth:`matrix` (HF ``Conv1D``)."""
        return is_hf_conv1d(self.module)

    def matrix(self) -> Tensor:
        """The layer's weight matrix (detached view), one row per output channel."""
        return layer_matrix(self.module, self.module.weight.detach())

    def weight_from_matrix(self, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`matrix`: a tensor of the stored weight's shape."""
        shape = self.module.weight.shape
        return matrix.mT.reshape(shape) if self.transposed else matrix.reshape(shape)


@dataclass
class Selection:
    """What :func:`select` found: the targeted layers and every weight matrix left alone."""

    layers: list[TargetLayer]
    #: ``{module name: why it is not projected}`` (not the layers a pattern or
    #: ``include_linear=False`` left out by choice: those are the caller's decision).
    skipped: dict[str, str] = field(default_factory=dict)
    #: Notes on targeted layers (a rank ``rank_multiple`` rounded to one that would not pay).
    notes: dict[str, str] = field(default_factory=dict)


def hook_count(module: nn.Module) -> int:
    """How many forward, forward-pre, backward and backward-pre hooks ``module`` itself has."""
    return sum(len(getattr(module, name, ())) for name in (
        "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _base_type(module: nn.Module) -> type[nn.Module] | None:
    for base in (*CONV_TYPES, nn.Linear):
        if isinstance(module, base):
            return base
    return None


def _eligible_type(module: nn.Module, include_linear: bool) -> bool:
    if isinstance(module, CONV_TYPES):
        return True
    return include_linear and (isinstance(module, nn.Linear) or is_hf_conv1d(module))


def _skip_reason(module: nn.Module, parent: nn.Module | None) -> str | None:
    """Why an otherwise eligible layer cannot be projected (a static reason), or None."""
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "uninitialized lazy module (run one forward pass first)"
    if "weight" not in module._parameters or module._parameters["weight"] is None:
        # torch.nn.utils.parametrizations (weight_norm, spectral_norm, orthogonal) and the
        # legacy weight_norm/spectral_norm hooks compute .weight from other parameters:
        # writing into it would change nothing the forward uses.
        return "weight is computed by a parametrization or a weight-norm hook"
    if isinstance(module, CONV_TYPES) and module.groups != 1:
        return f"grouped conv (groups={module.groups})"
    if "forward" in vars(module):  # ``layer.forward = ...`` on the instance
        return "its forward is replaced on the instance (it may not use .weight as is)"
    base = _base_type(module)
    if base is not None and (
        type(module).forward is not base.forward
        or getattr(type(module), "_conv_forward", None) is not getattr(base, "_conv_forward", None)
    ):
        # e.g. timm's StdConv2d standardizes the weight in its forward.
        return f"{type(module).__name__} has its own forward (it may not use .weight as is)"
    if isinstance(parent, _READING_PARENTS):
        return f"its parent {type(parent).__name__} reads .weight directly"
    return None


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a module that holds weight matrices of another kind is not projected."""
    if isinstance(module, nn.RNNBase):
        return f"recurrent layer ({type(module).__name__}): not supported"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"transposed conv ({type(module).__name__}): not supported"
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return "nn.MultiheadAttention in_proj_weight (read by its functional forward)"
    return None


def _own_matrices(module: nn.Module) -> list[str]:
    """The parameters of ``module``'s own (not its children's) that are matrices: two or
    more dimensions above 1 (a conv kernel, a table; not a bias, a scale or a class token)."""
    return [n for n, p in module._parameters.items()
            if p is not None and not isinstance(p, nn.parameter.UninitializedParameter)
            and sum(d > 1 for d in p.shape) >= 2]


def _other_matrix_reason(module: nn.Module) -> str | None:
    """Why a module of no supported type that computes with a matrix of its own (a custom
    ``x @ self.weight.T``, ``nn.Embedding``, ``nn.Bilinear``) is not projected, or None."""
    if isinstance(module, (nn.Linear, parametrize.ParametrizationList)) or is_hf_conv1d(module):
        return None  # a Linear left out by include_linear=False; a parametrized layer's own
    names = _own_matrices(module)
    if not names:
        return None
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding table (a lookup, not a matrix product): not projected"
    return (f"{type(module).__name__} computes with its own {', '.join(names)} in its own "
            "forward: only Conv/Linear layers are projected")


def _weight_owners(model: nn.Module) -> dict[int, set[int]]:
    """``{id(parameter): {id(module) holding it}}`` over every registration."""
    owners: dict[int, set[int]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(module))
    return owners


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()
               if not isinstance(p, nn.parameter.UninitializedParameter))


def select(model: nn.Module, config: LowRankConfig) -> Selection:
    """The layers ``config`` targets in ``model`` with their ranks, in module order, and
    the weight-holding modules left alone with their reasons.

    Names are relative to ``model``; a module registered under several names is one layer,
    named by its first name, with every name in ``aliases``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``config`` not a ``LowRankConfig``.
        ValueError: a pattern of ``include``/``exclude``/``ranks`` matches no eligible layer,
            a layer named exactly in ``include`` cannot be projected, or nothing is targeted.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=4))
        >>> found = select(net, LowRankConfig(rank_ratio=0.5))
        >>> [(layer.name, layer.rank, layer.full_rank) for layer in found.layers]
        [('0', 8, 16)]
        >>> found.skipped
        {'1': 'grouped conv (groups=4)'}
    """
    from lrpet_lightning.core.factorized import FactorizedLayer  # avoid an import cycle

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"config must be a LowRankConfig, got {type(config).__name__}")

    parents: dict[str, nn.Module] = {}
    aliases: dict[int, list[str]] = {}
    inside_factorized: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
        for child_name, _ in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            parents.setdefault(full, module)
            if isinstance(module, FactorizedLayer) or name in inside_factorized:
                inside_factorized.add(full)
    owners = _weight_owners(model)
    total = max(_params(model), 1)

    eligible: list[tuple[str, nn.Module]] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if name in inside_factorized:
            continue
        if not _eligible_type(module, config.include_linear):
            reason, size = _unsupported_reason(module), _params(module)
            if reason is None:  # its own matrices only: a model may hold a pos_embed itself
                reason = _other_matrix_reason(module)
                size = sum(module._parameters[n].numel() for n in _own_matrices(module))
            if reason is not None:
                skipped[name or "(model)"] = f"{reason}; {100 * size / total:.1f} % of parameters"
            continue
        reason = _skip_reason(module, parents.get(name))
        if reason is None:
            tied = owners.get(id(module.weight), set()) - {id(module)}
            if tied:
                others = [aliases[i][0] for i in tied if i in aliases]
                reason = f"weight tied to {', '.join(sorted(others))}"
        if reason is None:
            eligible.append((name, module))
            continue
        if config.include and any(name == p for p in config.include):
            raise ValueError(
                f"include names {name!r}, which cannot be projected: {reason}. Only plain "
                "Conv1d/2d/3d with groups=1, nn.Linear and HF Conv1D layers are supported"
            )
        skipped[name] = reason

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
    notes: dict[str, str] = {}
    for name, module in eligible:
        spec = _rank_spec(name, ranks, config.rank_ratio)
        if spec is None:
            continue
        n = full_rank_of(module)
        if isinstance(spec, float):
            rank = rank_from_ratio(n, spec, config.min_rank, config.rank_multiple)
            rows, cols = layer_matrix(module).shape
            if config.rank_multiple > 1 and rank < n and not factorization_pays(rows, cols, rank):
                # Rounded up to a rank whose thin pair is bigger than the layer: it would be
                # projected every time (losing accuracy) and then kept dense anyway.
                notes[name] = (f"rank {rank} of {n} (rounded to a multiple of rank_multiple="
                               f"{config.rank_multiple}) would not be factorized ({rows}x{cols}"
                               " weight): kept at full rank, not projected")
                rank = n
        else:  # an absolute rank is kept as given (no rank_multiple rounding): e.g. the
            # ranks solve_ranks or a checkpoint gives must rebuild exactly that architecture
            rank = min(max(spec, config.min_rank), n)
        layers.append(TargetLayer(name, module, rank, n, aliases=tuple(aliases[id(module)])))
    if not layers:
        why = f"; left alone: {_preview([f'{n} ({r})' for n, r in skipped.items()], 4)}" \
            if skipped else ""
        raise ValueError(
            f"no layer of {type(model).__name__} is targeted: LRPET projects plain Conv1d/2d/3d "
            "with groups=1 (and nn.Linear / HF Conv1D with include_linear=True); check "
            f"include/exclude{why}"
        )
    return Selection(layers, skipped, notes)


def select_layers(model: nn.Module, config: LowRankConfig) -> list[TargetLayer]:
    """The targeted layers of :func:`select` (the skipped ones are dropped)."""
    return select(model, config).layers


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
