"""The network inside a wrapper module: the child that holds every targeted layer.

A training wrapper (a LightningModule, a model with a loss head) names its layers
``net.conv1``, ``model.layer1.0.conv1``...; FLOPs and budgets are counted on the network
those layers live in, fed the network's own input, and reported under the wrapper's names.
:func:`find_network` finds that network; :class:`Network` turns names between the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from torch import nn

from lrpet_lightning.core.walk import TargetLayer

__all__ = ["Network", "find_network"]

V = TypeVar("V")


@dataclass(frozen=True)
class Network:
    """A network inside ``root``, and how its names relate to ``root``'s.

    Example:
        >>> wrapper = nn.Module(); wrapper.net = nn.Sequential(nn.Conv2d(3, 8, 3))
        >>> network = find_network(wrapper, ["net.0"])
        >>> network.prefix, network.local({"net.0": 4}), network.qualified({"0": 4})
        ('net', {'0': 4}, {'net.0': 4})
    """

    #: The module as it is called (a ``torch.compile`` wrapper stays wrapped): hook its
    #: forward to see the network's input.
    called: nn.Module
    #: The module that runs eagerly (a compiled module's ``_orig_mod``): count FLOPs on it.
    eager: nn.Module
    #: ``eager``'s qualified name in the root module (``""`` for the root itself).
    prefix: str

    def local_name(self, name: str) -> str:
        """A root-relative module name, relative to ``eager``."""
        if not self.prefix:
            return name
        if name == self.prefix:
            return ""
        if not name.startswith(self.prefix + "."):
            raise ValueError(f"{name!r} is not inside the network {self.prefix!r}")
        return name[len(self.prefix) + 1:]

    def qualified_name(self, name: str) -> str:
        """An ``eager``-relative module name, relative to the root (``""`` is ``eager``)."""
        if not self.prefix:
            return name
        return f"{self.prefix}.{name}" if name else self.prefix

    def local(self, by_name: Mapping[str, V]) -> dict[str, V]:
        """``by_name`` with every key made relative to ``eager``."""
        return {self.local_name(name): value for name, value in by_name.items()}

    def qualified(self, by_name: Mapping[str, V]) -> dict[str, V]:
        """``by_name`` with every key made relative to the root."""
        return {self.qualified_name(name): value for name, value in by_name.items()}

    def local_layers(self, layers: Iterable[TargetLayer]) -> list[TargetLayer]:
        """Copies of ``layers`` named relative to ``eager`` (the same live modules)."""
        return [replace(layer, name=self.local_name(layer.name)) for layer in layers]


def find_network(root: nn.Module, layer_names: Iterable[str]) -> Network:
    """The child of ``root`` holding every layer in ``layer_names`` (``self.model``,
    ``self.net``...), else ``root`` itself; a ``torch.compile``'d child is counted on the
    eager module it wraps (no recompiling), which is also how its layers are named.

    The child is only taken when all the layers share its first name component and it is
    not itself one of the layers (a wrapper around one bare layer is its own network).
    """
    names = list(layer_names)
    heads = {name.split(".")[0] for name in names}
    called = root
    if len(heads) == 1:
        (head,) = heads
        if head and head not in names:
            called = root.get_submodule(head)
    eager = getattr(called, "_orig_mod", called)
    prefix = next(name for name, module in root.named_modules(remove_duplicate=False)
                  if module is eager)
    return Network(called=called, eager=eager, prefix=prefix)
