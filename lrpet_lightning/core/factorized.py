"""Factorized layers: a rank-r layer as two thin layers (docs/method.md).

``FactorizedConv``: a *plain* conv of the original dimensionality, kernel, stride, padding,
dilation and padding_mode mapping ``C -> r`` without bias, then a 1x1 conv ``r -> N`` with
the original bias. ``FactorizedLinear``: ``Linear(in, r, bias=False)`` then
``Linear(r, out)`` (also for Hugging Face's ``Conv1D``, a Linear with a transposed weight).
The thin layers are always the plain torch classes, never the original's subclass: a
subclass with its own forward (e.g. a weight-standardized conv) is never factorized.

Both keep the attributes a parent may read off the dense layer (``in_channels``,
``stride``, ``in_features``...), carry over ``requires_grad`` of a frozen layer, and have
a read-only ``weight`` equal to the dense layer's — rebuilt on every read, so code that
reads a child's ``.weight`` keeps computing the right thing; such a read is warned about
once, because it costs the FLOPs the factorization saves.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor, nn

from lrpet_lightning.core.checks import check_int
from lrpet_lightning.core.linalg import TRUNCATION_RTOL, factorize_matrix, weight_to_matrix
from lrpet_lightning.core.walk import CONV_TYPES, full_rank_of, is_hf_conv1d, layer_matrix

__all__ = ["FACTORIZED_TYPES", "FactorizedConv", "FactorizedLayer", "FactorizedLinear",
           "factorized_type"]


class FactorizedLayer(nn.Module):
    """Base of the two-thin-layer modules: ``second(first(x))``."""

    # torch.jit.script compiles a module's properties; these are Python-side conveniences
    # (the forward never reads them), so scripting leaves them out.
    __jit_unused_properties__ = ("rank", "weight", "bias", "in_channels", "out_channels",
                                 "kernel_size", "stride", "padding", "dilation",
                                 "padding_mode", "groups", "in_features", "out_features")

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        return self.first.weight.shape[0]

    def dense_weight(self) -> Tensor:
        """The equivalent dense weight ``second @ first``, in the dense layer's shape."""
        dense = weight_to_matrix(self.second.weight) @ weight_to_matrix(self.first.weight)
        out_features = self.second.weight.shape[0]
        return dense.reshape(out_features, *self.first.weight.shape[1:])

    @property
    def weight(self) -> Tensor:
        """The equivalent dense weight (computed, not a parameter): see the module doc."""
        # torch.jit.script looks at every attribute while compiling: not a read to warn of.
        scripting = sys._getframe(1).f_globals.get("__name__", "").startswith("torch.jit")
        if not scripting and not self.__dict__.get("_weight_read_warned"):
            self.__dict__["_weight_read_warned"] = True
            warnings.warn(
                f"LRPET: .weight of a {type(self).__name__} (rank {self.rank}) was read: the "
                "dense weight is rebuilt from the thin pair on every read, which costs what "
                "the factorization saves. If the parent's forward reads it, keep that layer "
                "dense (decompose_(..., example_inputs=x) detects such layers)",
                RuntimeWarning, stacklevel=2,
            )
        return self.dense_weight()

    @property
    def bias(self) -> Tensor | None:
        return self.second.bias

    def _split(self, matrix: Tensor, bias: Tensor | None, rank: int,
               frozen: tuple[bool, bool]) -> None:
        """Fill ``first``/``second`` from the SVD of ``matrix`` (rows = outputs) at ``rank``."""
        A, B = factorize_matrix(matrix.detach().double(), rank)
        self.first.weight.data.copy_(B.reshape(self.first.weight.shape))
        self.second.weight.data.copy_(A.reshape(self.second.weight.shape))
        if bias is not None:
            self.second.bias.data.copy_(bias.detach())
        weight_grad, bias_grad = frozen
        self.first.weight.requires_grad_(weight_grad)
        self.second.weight.requires_grad_(weight_grad)
        if self.second.bias is not None:
            self.second.bias.requires_grad_(bias_grad)

    def _dense_into(self, dense: nn.Module) -> nn.Module:
        dense.weight.data.copy_(self.dense_weight().detach())
        dense.weight.requires_grad_(self.first.weight.requires_grad)
        if dense.bias is not None:
            dense.bias.data.copy_(self.second.bias.detach())
            dense.bias.requires_grad_(self.second.bias.requires_grad)
        return dense

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Accept the dense layer's keys (``weight``/``bias``): a dense checkpoint saved
        # before decomposition (e.g. ModelCheckpoint's "best" during LRPET training) loads
        # into the decomposed model by splitting its weight at this layer's rank — exact
        # when that weight was projected to this rank.
        # A dense weight that is not rank r loads truncated, with a warning naming it.
        dense_key = prefix + "weight"
        # Another shape is left to load_state_dict's own missing/unexpected-key error.
        shape = (self.second.weight.shape[0], self.first.weight[0].numel())
        w = state_dict.get(dense_key)
        if (w is not None and prefix + "first.weight" not in state_dict
                and w.dim() >= 2 and w.numel() == shape[0] * shape[1]):
            M = weight_to_matrix(state_dict.pop(dense_key)).double()
            if self.__dict__.get("_hf_conv1d"):
                M = M.mT  # a Hugging Face Conv1D stores its weight as (in, out)
            A, B = factorize_matrix(M, self.rank)
            error = float(torch.linalg.matrix_norm(M - A @ B)
                          / torch.linalg.matrix_norm(M).clamp_min(1e-300))
            if not error <= max(TRUNCATION_RTOL, 4 * torch.finfo(w.dtype).eps):
                warnings.warn(
                    f"LRPET: the dense weight {dense_key!r} loaded into a thin pair of rank "
                    f"{self.rank} is not rank {self.rank}: truncating it changes it by "
                    f"{100 * error:.2g} %, so the loaded model computes something else than "
                    "the one saved (a checkpoint from before the last projection, or with "
                    "residual_scale > 0)", RuntimeWarning, stacklevel=2)
            state_dict[prefix + "first.weight"] = B.reshape(self.first.weight.shape)
            state_dict[prefix + "second.weight"] = A.reshape(self.second.weight.shape)
            if prefix + "bias" in state_dict:
                state_dict[prefix + "second.bias"] = state_dict.pop(prefix + "bias")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def _check_rank(module: nn.Module, rank: int) -> None:
    check_int("rank", rank, minimum=1, maximum=full_rank_of(module),
              meaning=f"the width of the thin pair of a {type(module).__name__}")


def _grads(module: nn.Module) -> tuple[bool, bool]:
    bias = getattr(module, "bias", None)
    return module.weight.requires_grad, bias.requires_grad if bias is not None else True


def _plain_conv_type(conv: nn.Module) -> type[nn.Module]:
    for kind in CONV_TYPES:
        if isinstance(conv, kind):
            return kind
    raise TypeError(f"conv must be a Conv1d/2d/3d, got {type(conv).__name__}")


class FactorizedConv(FactorizedLayer):
    """A Conv1d/2d/3d (groups=1) of rank ``r`` as ``kxk C->r`` then ``1x1 r->N``."""

    @classmethod
    def from_dense(cls, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, rank: int) -> FactorizedConv:
        """Split ``conv`` at ``rank`` (exact when its weight has rank ``rank``).

        >>> FactorizedConv.from_dense(nn.Conv2d(16, 32, 3), 8)
        FactorizedConv(
          rank=8
          (first): Conv2d(16, 8, kernel_size=(3, 3), stride=(1, 1), bias=False)
          (second): Conv2d(8, 32, kernel_size=(1, 1), stride=(1, 1))
        )
        """
        kind = _plain_conv_type(conv)
        if conv.groups != 1:
            raise ValueError(f"conv.groups must be 1 to factorize, got {conv.groups}")
        _check_rank(conv, rank)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        first = kind(
            conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **factory,
        )
        second = kind(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory)
        layer = cls(first, second)
        layer._split(layer_matrix(conv), conv.bias, rank, _grads(conv))
        return layer

    def to_dense(self) -> nn.Module:
        """The equivalent single conv."""
        f, s = self.first, self.second
        dense = type(f)(
            f.in_channels, s.out_channels, f.kernel_size, stride=f.stride, padding=f.padding,
            dilation=f.dilation, bias=s.bias is not None, padding_mode=f.padding_mode,
            device=f.weight.device, dtype=f.weight.dtype,
        )
        return self._dense_into(dense)

    # What parents read off a conv (e.g. Whisper reads conv1.stride).
    in_channels = property(lambda self: self.first.in_channels)
    out_channels = property(lambda self: self.second.out_channels)
    kernel_size = property(lambda self: self.first.kernel_size)
    stride = property(lambda self: self.first.stride)
    padding = property(lambda self: self.first.padding)
    dilation = property(lambda self: self.first.dilation)
    padding_mode = property(lambda self: self.first.padding_mode)
    groups = property(lambda self: 1)


class FactorizedLinear(FactorizedLayer):
    """A Linear of rank ``r`` as ``Linear(in, r, bias=False)`` then ``Linear(r, out)``."""

    @classmethod
    def from_dense(cls, linear: nn.Module, rank: int) -> FactorizedLinear:
        """Split ``linear`` (an ``nn.Linear`` or HF ``Conv1D``) at ``rank`` (exact when its
        weight has rank ``rank``)."""
        _check_rank(linear, rank)
        matrix = layer_matrix(linear)
        out_features, in_features = matrix.shape
        factory = {"device": matrix.device, "dtype": matrix.dtype}
        first = nn.Linear(in_features, rank, bias=False, **factory)
        second = nn.Linear(rank, out_features, bias=linear.bias is not None, **factory)
        layer = cls(first, second)
        layer._split(matrix, linear.bias, rank, _grads(linear))
        layer.__dict__["_hf_conv1d"] = is_hf_conv1d(linear)  # how a dense weight is stored
        return layer

    def to_dense(self) -> nn.Linear:
        """The equivalent single Linear (an ``nn.Linear``, also for a former HF ``Conv1D``)."""
        dense = nn.Linear(
            self.first.in_features, self.second.out_features, bias=self.second.bias is not None,
            device=self.first.weight.device, dtype=self.first.weight.dtype,
        )
        return self._dense_into(dense)

    in_features = property(lambda self: self.first.in_features)
    out_features = property(lambda self: self.second.out_features)


#: Dense layer type -> its factorized module.
FACTORIZED_TYPES: dict[type[nn.Module], type[FactorizedLayer]] = {
    nn.Conv1d: FactorizedConv,
    nn.Conv2d: FactorizedConv,
    nn.Conv3d: FactorizedConv,
    nn.Linear: FactorizedLinear,
}


def factorized_type(module: nn.Module) -> type[FactorizedLayer]:
    """The factorized module class for ``module`` (a conv, Linear or HF ``Conv1D``)."""
    if is_hf_conv1d(module):
        return FactorizedLinear
    for dense_type, factorized in FACTORIZED_TYPES.items():
        if isinstance(module, dense_type):
            return factorized
    raise TypeError(f"no factorized form for {type(module).__name__}")
