"""Factorized layers: a rank-r layer as two thin layers (ALGORITHM.md §6).

``FactorizedConv``: a conv of the original kind, kernel, stride, padding, dilation and
padding_mode mapping ``C -> r`` without bias, then a 1x1 conv ``r -> N`` with the
original bias. ``FactorizedLinear``: ``Linear(in, r, bias=False)`` then ``Linear(r, out)``.

Both keep read-only ``weight`` and ``bias`` properties equal to the dense layer's, so
code that reads a child's ``.weight`` directly (e.g. the fused fast path of
``nn.TransformerEncoderLayer``) keeps computing the right thing.
"""

from __future__ import annotations

from torch import Tensor, nn

from lrpet_lightning.core.linalg import factorize_matrix, weight_to_matrix

__all__ = ["FACTORIZED_TYPES", "FactorizedConv", "FactorizedLayer", "FactorizedLinear"]


class FactorizedLayer(nn.Module):
    """Base of the two-thin-layer modules: ``second(first(x))``."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @property
    def rank(self) -> int:
        return self.first.weight.shape[0]

    @property
    def weight(self) -> Tensor:
        """The equivalent dense weight ``second @ first`` (computed, not a parameter)."""
        dense = weight_to_matrix(self.second.weight) @ weight_to_matrix(self.first.weight)
        out_features = self.second.weight.shape[0]
        return dense.reshape(out_features, *self.first.weight.shape[1:])

    @property
    def bias(self) -> Tensor | None:
        return self.second.bias

    def _split(self, dense: nn.Module, rank: int) -> None:
        """Fill ``first``/``second`` from the SVD of ``dense``'s weight, truncated at ``rank``."""
        w = dense.weight.detach()
        A, B = factorize_matrix(weight_to_matrix(w).double(), rank)
        self.first.weight.data.copy_(B.reshape(self.first.weight.shape))
        self.second.weight.data.copy_(A.reshape(self.second.weight.shape))
        if dense.bias is not None:
            self.second.bias.data.copy_(dense.bias.detach())

    def _dense_into(self, dense: nn.Module) -> nn.Module:
        dense.weight.data.copy_(self.weight.detach())
        if dense.bias is not None:
            dense.bias.data.copy_(self.second.bias.detach())
        return dense

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Accept the dense layer's keys (``weight``/``bias``): a dense checkpoint saved
        # before decomposition (e.g. ModelCheckpoint's "best" during LRPET training) loads
        # into the decomposed model by splitting its weight at this layer's rank — exact
        # when that weight was projected to this rank.
        dense_key = prefix + "weight"
        if dense_key in state_dict and prefix + "first.weight" not in state_dict:
            w = state_dict.pop(dense_key)
            A, B = factorize_matrix(weight_to_matrix(w).double(), self.rank)
            state_dict[prefix + "first.weight"] = B.reshape(self.first.weight.shape)
            state_dict[prefix + "second.weight"] = A.reshape(self.second.weight.shape)
            if prefix + "bias" in state_dict:
                state_dict[prefix + "second.bias"] = state_dict.pop(prefix + "bias")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class FactorizedConv(FactorizedLayer):
    """A Conv1d/2d/3d (groups=1) of rank ``r`` as ``kxk C->r`` then ``1x1 r->N``."""

    @classmethod
    def from_dense(cls, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, rank: int) -> FactorizedConv:
        """Split ``conv`` at ``rank`` (exact when its weight has rank ``rank``)."""
        if conv.groups != 1:
            raise ValueError(f"conv.groups must be 1 to factorize, got {conv.groups}")
        kind = type(conv)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        first = kind(
            conv.in_channels, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **factory,
        )
        second = kind(rank, conv.out_channels, 1, bias=conv.bias is not None, **factory)
        layer = cls(first, second)
        layer._split(conv, rank)
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


class FactorizedLinear(FactorizedLayer):
    """A Linear of rank ``r`` as ``Linear(in, r, bias=False)`` then ``Linear(r, out)``."""

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int) -> FactorizedLinear:
        """Split ``linear`` at ``rank`` (exact when its weight has rank ``rank``)."""
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        first = nn.Linear(linear.in_features, rank, bias=False, **factory)
        second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **factory)
        layer = cls(first, second)
        layer._split(linear, rank)
        return layer

    def to_dense(self) -> nn.Linear:
        """The equivalent single Linear."""
        dense = nn.Linear(
            self.first.in_features, self.second.out_features, bias=self.second.bias is not None,
            device=self.first.weight.device, dtype=self.first.weight.dtype,
        )
        return self._dense_into(dense)


#: Dense layer type -> its factorized module.
FACTORIZED_TYPES: dict[type[nn.Module], type[FactorizedLayer]] = {
    nn.Conv1d: FactorizedConv,
    nn.Conv2d: FactorizedConv,
    nn.Conv3d: FactorizedConv,
    nn.Linear: FactorizedLinear,
}
