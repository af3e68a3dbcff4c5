"""What one forward pass tells about the targeted layers: which BatchNorm follows each,
which layers ran, and whose ``.weight`` is read outside the layer's own forward.

Conv -> BN pairs come from the model's data flow (the BatchNorm whose input *is* the
conv's output in a forward pass), never from module order: real models register modules
in an order unrelated to how they are called (torchvision's ResNet registers ``bn1`` right
after ``conv1`` but a downsample conv's BN lives elsewhere, DenseNet puts BN *before* conv).

A layer whose parent reads its ``.weight`` directly (torchvision's Swin, timm's BEiT,
``F.linear(x, self.qkv.weight)``) cannot be factorized: the thin pair would be rebuilt into
the dense matrix on every read. Such reads are caught by watching attribute access on the
targeted modules while the pass runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrpet_lightning.core.walk import TargetLayer

__all__ = ["BNPairTracer", "InputRecorder", "Trace", "attach_bn_pairs", "first_sample",
           "run_forward", "trace_bn_pairs", "trace_layers"]


@dataclass
class Trace:
    """What a traced forward pass saw."""

    #: ``{layer: (bn name, bn)}`` for each layer whose output feeds exactly one BatchNorm.
    pairs: dict[str, tuple[str, _BatchNorm]] = field(default_factory=dict)
    #: Layers whose output feeds several BatchNorms (no rectification for them).
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    #: Layers whose ``.weight`` was read outside their own forward.
    read_outside: set[str] = field(default_factory=set)
    #: Layers that ran at least once.
    ran: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------- weight reads
_WATCHERS: dict[int, Any] = {}  # id(module) -> the tracer watching its .weight reads
_WATCHING_CLASSES: dict[type, type] = {}


def _watching_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` that reports reads of ``.weight`` to the module's tracer.
    ``nn.Module`` serves parameters through ``__getattr__``, so every read passes here."""
    if cls not in _WATCHING_CLASSES:
        def __getattr__(self: nn.Module, name: str) -> Any:
            if name == "weight":
                tracer = _WATCHERS.get(id(self))
                if tracer is not None:
                    tracer._on_weight_read(self)
            return cls.__getattr__(self, name)

        _WATCHING_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__getattr__": __getattr__, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__})
    return _WATCHING_CLASSES[cls]


class BNPairTracer:
    """Context manager that records, during whatever forward passes run inside it, which
    BatchNorm consumes each target layer's output tensor directly, which layers ran, and
    (``watch_reads``) which layers' ``.weight`` is read outside their own forward but
    within another module's (a parent that reads its child's weight). A read while no
    module of ``model`` runs (a training step's weight penalty, logging) is not one: it
    computes the same from a thin pair's rebuilt weight, only slower.

    Output tensors are kept referenced while tracing, so Python cannot reuse their ``id``
    for another tensor (a freed tensor's id is often handed to the next one).

    Example:
        >>> from lrpet_lightning.core.config import LowRankConfig
        >>> from lrpet_lightning.core.walk import select_layers
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> layers = select_layers(model, LowRankConfig(rank_ratio=0.5))
        >>> with BNPairTracer(model, layers) as tracer:
        ...     _ = model(torch.randn(1, 3, 8, 8))
        >>> sorted(tracer.pairs())
        ['0']
    """

    def __init__(self, model: nn.Module, layers: Iterable[TargetLayer],
                 watch_reads: bool = True) -> None:
        self._model = model
        self._layer_names = {id(layer.module): layer.name for layer in layers}
        self._watch_reads = watch_reads
        self._outputs: dict[int, tuple[Tensor, str, int | None]] = {}
        self._found: dict[str, set[str]] = {}
        self._bns: dict[str, _BatchNorm] = {}
        self._handles: list[Any] = []
        self._swapped: list[tuple[nn.Module, type]] = []
        self._active: dict[int, int] = {}  # id(module) -> forward calls in progress
        self._running = 0  # forward calls of model's modules in progress
        self.ran: set[str] = set()
        self.read_outside: set[str] = set()

    def __enter__(self) -> BNPairTracer:
        seen: set[int] = set()
        if self._watch_reads:
            for module in self._model.modules():
                self._handles.append(module.register_forward_pre_hook(self._on_enter))
                self._handles.append(module.register_forward_hook(self._on_exit,
                                                                  always_call=True))
        for name, module in self._model.named_modules():
            if id(module) in self._layer_names and id(module) not in seen:
                seen.add(id(module))
                self._handles.append(module.register_forward_pre_hook(self._on_layer_input))
                self._handles.append(module.register_forward_hook(self._on_layer_output))
                if self._watch_reads:
                    self._watch(module)
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
        for module, cls in self._swapped:
            module.__class__ = cls
            _WATCHERS.pop(id(module), None)
        self._swapped.clear()
        self._outputs.clear()  # release the activations

    def _watch(self, module: nn.Module) -> None:
        cls = type(module)
        try:
            module.__class__ = _watching_class(cls)
        except TypeError:  # a class that cannot be subclassed or swapped: not watched
            return
        _WATCHERS[id(module)] = self
        self._swapped.append((module, cls))

    def _on_enter(self, module: nn.Module, args: Any) -> None:
        self._running += 1

    def _on_exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self._running -= 1

    def _on_weight_read(self, module: nn.Module) -> None:
        if self._running and not self._active.get(id(module)):
            self.read_outside.add(self._layer_names[id(module)])

    def _on_layer_input(self, module: nn.Module, args: Any) -> None:
        self._active[id(module)] = self._active.get(id(module), 0) + 1
        self.ran.add(self._layer_names[id(module)])

    def _on_layer_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._active[id(module)] -= 1
        # A BatchNorm normalizes dim 1: a conv's output channels (batched), but a Linear's
        # (or HF Conv1D's) features only when its output is 2-D; on (B, L, F) a
        # BatchNorm1d(L) normalizes positions. Only such outputs can pair with a BatchNorm.
        conv = isinstance(module, nn.modules.conv._ConvNd)
        if isinstance(output, Tensor) and (output.dim() >= 3 if conv else output.dim() == 2):
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

    def trace(self) -> Trace:
        """Everything seen so far."""
        out = Trace(read_outside=set(self.read_outside), ran=set(self.ran))
        for layer, bns in self._found.items():
            if len(bns) == 1:
                (bn_name,) = bns
                out.pairs[layer] = (bn_name, self._bns[bn_name])
            else:
                out.ambiguous[layer] = sorted(bns)
        return out

    def pairs(self) -> dict[str, tuple[str, _BatchNorm]]:
        """``{layer_name: (bn_name, bn_module)}`` for each layer feeding exactly one BN."""
        return self.trace().pairs


class InputRecorder:
    """Context manager that keeps one sample of the first input ``module`` is called with
    (``t[:1]`` of every tensor, detached and copied), e.g. to count FLOPs later on the very
    input a training loop feeds, without an extra forward pass. The hook removes itself
    after the first call.

    A module called with both positional and keyword inputs keeps nothing (:func:`run_forward`
    replays one kind only); ``problem`` then says why.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> with InputRecorder(net) as recorder:
        ...     _ = net(torch.randn(8, 4))
        ...     _ = net(torch.randn(3, 4))
        >>> [x.shape for x in recorder.inputs]
        [torch.Size([1, 4])]
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._handle: Any = None
        #: The recorded sample, ready for :func:`run_forward`: the tuple of positional
        #: inputs or the dict of keyword ones (None until the module ran).
        self.inputs: Any = None
        #: Why nothing was kept although the module ran (None otherwise).
        self.problem: str | None = None

    def __enter__(self) -> InputRecorder:
        self._handle = self._module.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.__exit__()
        args, kwargs = first_sample(args), first_sample(kwargs)
        if args and kwargs:
            self.problem = "the model takes positional and keyword inputs (only one kind replays)"
            return
        # A tuple even for one tensor: a lone dict or tuple argument must not be unpacked.
        self.inputs = kwargs or args


def first_sample(inputs: Any) -> Any:
    """The first sample of a batch (``t[:1]`` of every tensor, detached and copied), in the
    same nesting of tuples, lists and dicts; anything else as it is.

    >>> first_sample({"x": torch.zeros(5, 2), "n": 3})["x"].shape
    torch.Size([1, 2])
    """
    if isinstance(inputs, Tensor):
        return inputs[:1].detach().clone() if inputs.dim() > 0 else inputs.detach().clone()
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):  # a namedtuple
        return type(inputs)(*(first_sample(x) for x in inputs))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(first_sample(x) for x in inputs)
    if isinstance(inputs, Mapping):
        return {k: first_sample(v) for k, v in inputs.items()}
    return inputs


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
    except Exception as err:
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


class eval_mode:
    """Context manager: ``model`` in eval mode inside, each module's ``training`` flag
    restored after (eval keeps BatchNorm running statistics untouched)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._modes: dict[nn.Module, bool] = {}

    def __enter__(self) -> nn.Module:
        self._modes = {m: m.training for m in self._model.modules()}
        self._model.eval()
        return self._model

    def __exit__(self, *exc: object) -> None:
        for module, mode in self._modes.items():
            module.training = mode


def trace_layers(model: nn.Module, layers: Iterable[TargetLayer], example_inputs: Any) -> Trace:
    """One eval-mode, no-grad forward pass of ``example_inputs`` under :class:`BNPairTracer`."""
    with eval_mode(model), torch.no_grad(), BNPairTracer(model, layers) as tracer:
        run_forward(model, example_inputs)
    return tracer.trace()


def trace_bn_pairs(
    model: nn.Module, layers: Iterable[TargetLayer], example_inputs: Any
) -> dict[str, tuple[str, _BatchNorm]]:
    """Find each layer's following BatchNorm with one eval-mode, no-grad forward pass."""
    return trace_layers(model, layers, example_inputs).pairs


def attach_bn_pairs(
    layers: Iterable[TargetLayer], pairs: Mapping[str, tuple[str, nn.Module]]
) -> None:
    """Record each layer's following BatchNorm (from ``trace_bn_pairs`` or ``BNPairTracer``)."""
    for layer in layers:
        layer.bn_name, layer.bn = pairs.get(layer.name, (None, None))
