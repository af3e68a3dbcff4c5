"""Inference-ready models: BatchNorm folded, channels_last where faster, and each
factorized layer in whichever form — two thin convs or one dense conv — runs faster.

FLOPs are not latency (docs/inference.md): two thin convs cost two
kernel launches, two passes over memory and a thin middle tensor that vector units use
badly, so a factorized layer can be slower than the dense conv it replaces even with fewer
FLOPs. :func:`prepare_for_inference` therefore *measures* on the input it is given.

Plain PyTorch: nothing here imports lightning or hydra.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from lrpet_lightning.core.checks import check_int
from lrpet_lightning.core.factorized import FactorizedConv, FactorizedLayer
from lrpet_lightning.core.trace import BNPairTracer, run_forward
from lrpet_lightning.core.walk import CONV_TYPES, TargetLayer, copy_model, hook_count

__all__ = ["FASTER_MARGIN", "FOLDED_ATTR", "PREPARED_ATTR", "RANK_MULTIPLE", "GemmFactorizedConv",
           "can_pad_rank", "fold_batchnorms_", "has_hooks", "is_plain_pair", "is_pointwise_pair",
           "median_ratio", "output_error", "output_rtol", "pad_rank", "pad_ranks",
           "prepare_for_inference", "race", "tensor_leaves", "time_rounds", "use_faster_forms_"]


def prepare_for_inference(
    model: nn.Module,
    example_inputs: Any,
    *,
    channels_last: bool | Literal["auto"] = "auto",
    latency_aware: bool = True,
    repeats: int = 5,
) -> nn.Module:
    """An inference-ready copy of ``model`` (decomposed or dense), in eval mode.

    Three steps, each exact up to float round-off (``model`` itself is not modified):

    1. every plain BatchNorm that directly follows a plain conv is folded into it (for a
       ``FactorizedConv`` into its second, 1x1 conv) and replaced by ``nn.Identity``
       (subclasses, e.g. timm's ``BatchNormAct2d``, are left as they are, and so are
       pairs a hook would see change);
    2. the Conv2d weights are made channels_last (``"auto"``: only if the whole model
       runs faster that way on ``example_inputs``);
    3. with ``latency_aware``, each factorized layer is timed on the activation it
       receives as it is, with its rank padded by zero channels to a multiple of
       ``RANK_MULTIPLE``, as its dense equivalent and, for a pair of 1x1 convs, as two
       matrix products (:class:`GemmFactorizedConv`), and the fastest form is kept; then
       the whole model so prepared is timed against the model with every layer
       factorized and with every layer dense, and the fastest of the three is returned.
       A form other than the all-factorized one (fewest FLOPs, the prior) is taken only
       when it is faster by ``FASTER_MARGIN`` in the median of paired ratios and in
       best-of alike. Layers with hooks keep their form.

    The prepared copy's outputs are then checked against ``model``'s on ``example_inputs``:
    if they differ by more than ``OUTPUT_RTOL`` (relative; in float16 or bfloat16, more
    than 3x as far from ``model`` run in float32 as ``model`` itself is), a warning says so
    and an unprepared eval-mode copy is returned instead.

    Candidates are timed interleaved (one run of each per round, ``repeats`` rounds) and
    compared by the median over rounds of their time relative to the reference run of the
    same round, so that load from other processes, which comes and goes, slows them alike.
    The choices hold for the batch size, device and thread count of
    ``example_inputs`` and the moment: prepare once per deployment shape, on a quiet
    machine. (When other processes keep every core busy, each kernel launch waits for a
    time slice — measured here: 16 ms per conv whatever its size — and the form with fewer
    kernels wins regardless of FLOPs.) With channels_last, feed the
    model channels_last inputs (``x.contiguous(memory_format=torch.channels_last)``);
    contiguous ones work too, at the cost of one conversion in the first conv.

    Args:
        model: any ``nn.Module``, typically after ``decompose_``.
        example_inputs: a tensor (or tuple of args / dict of kwargs) of the deployment shape.
        channels_last: ``True``, ``False`` or ``"auto"`` (measure both, keep the faster).
        latency_aware: choose the form of each factorized layer, then of the whole
            model, by timing.
        repeats: timed rounds per comparison (the median ratio counts), at least 1.

    Returns:
        The prepared copy.

    Raises:
        TypeError: an argument of the wrong type (named in the message).
        ValueError: an argument out of range, or a model that cannot be deep-copied.

    Example:
        >>> from lrpet_lightning import decompose_, project_low_rank_
        >>> from lrpet_lightning.models import build_model
        >>> model, x = build_model("resnet20"), torch.randn(2, 3, 32, 32)
        >>> _ = project_low_rank_(model, ranks={"layer3.*": 16}, example_inputs=x)
        >>> _ = decompose_(model, ranks={"layer3.*": 16})
        >>> fast = prepare_for_inference(model, x, repeats=1)
        >>> fast.training, type(fast.bn1).__name__
        (False, 'Identity')
    """
    if not isinstance(channels_last, bool) and channels_last != "auto":
        error = ValueError if isinstance(channels_last, str) else TypeError
        raise error("channels_last must be True, False or 'auto' (measure both, keep the "
                    f"faster), got {channels_last!r}")
    check_int("repeats", repeats, minimum=1, meaning="timed runs per candidate")

    try:
        reference = copy_model(model).eval()
    except RuntimeError as err:  # copy_model copies legacy weight_norm; this is the rest
        raise ValueError(
            f"prepare_for_inference works on a copy, but this {type(model).__name__} cannot be "
            f"deep-copied ({err})"
        ) from err
    prepared = copy_model(model).eval()
    with torch.no_grad():
        expected = run_forward(reference, example_inputs)
        fold_batchnorms_(prepared, example_inputs)
        if channels_last == "auto":
            channels_last = _channels_last_is_faster(prepared, example_inputs, repeats)
        if channels_last:
            _to_channels_last_(prepared)
        inputs = _to_format(example_inputs, channels_last)
        failure = _run_error(prepared, inputs) if channels_last else None
        if failure is not None:
            raise ValueError(
                f"channels_last=True, but this {type(model).__name__} does not run on "
                f"channels_last tensors ({failure}); pass channels_last=False, or "
                "'auto' (which keeps contiguous tensors where channels_last fails)")
        if latency_aware and any(isinstance(m, FactorizedLayer) for m in prepared.modules()):
            factorized = copy_model(prepared)
            use_faster_forms_(prepared, inputs, repeats, channels_last=channels_last)
            # Per-layer timings can mislead on a loaded machine (a layer's time there is
            # mostly waiting for a time slice); the whole model decides in the end.
            # The prior is the form with the fewest FLOPs: all factorized.
            forms = [factorized, _all_dense(factorized, channels_last)]
            if _layer_forms(prepared) != _layer_forms(factorized):
                forms.append(prepared)
            prepared = forms[_fastest_model(forms, inputs, repeats)]
        error = output_error(run_forward(prepared, inputs), expected)
        tolerance = output_rtol(model)
        if not error <= tolerance and tolerance > OUTPUT_RTOL:
            # Half precision: rounding alone moves the outputs by about the tolerance (BN
            # folding in float16 or bfloat16: 1-1.3x it on ResNet-18). Judged against the
            # model in float32 instead: no further from it than 3x the model itself (measured
            # on ResNet-18, dense and decomposed, every form: 1.1-1.7x).
            error, tolerance = _errors_against_float32(model, prepared, expected, inputs)
    if not error <= tolerance:
        warnings.warn(
            f"prepare_for_inference: the prepared {type(model).__name__} computes something "
            f"else (relative output error {error:.3g} > {tolerance:g}); the model is "
            "returned unprepared (in eval mode)", RuntimeWarning, stacklevel=2)
        return reference
    # save_compact saves it even where every layer was made dense (faster here).
    setattr(prepared, PREPARED_ATTR, True)
    return prepared


#: Largest relative output change :func:`prepare_for_inference` accepts (float32 round-off
#: of folding and re-ordering is ~1e-6).
OUTPUT_RTOL = 1e-4


def _errors_against_float32(model: nn.Module, prepared: nn.Module, expected: Any,
                            inputs: Any) -> tuple[float, float]:
    """The prepared half-precision model's relative output error against ``model`` run in
    float32, and the error it is allowed: 3x ``model``'s own (``expected``) against it."""
    def single(x: Any) -> Any:
        return x.float() if isinstance(x, Tensor) and x.is_floating_point() else x

    full = copy_model(model).float().eval()
    truth = run_forward(full, tree_map(single, inputs))
    got = run_forward(prepared, inputs)
    return output_error(got, truth), max(3 * output_error(expected, truth), OUTPUT_RTOL)


def output_rtol(model: nn.Module) -> float:
    """The output change :func:`prepare_for_inference` accepts for ``model``: ``OUTPUT_RTOL``,
    or twice the machine epsilon of its least precise floating parameters (folding a
    BatchNorm in bfloat16 rounds by ~3e-3 of the outputs; a wrong fold changes them by ~1).

    Example:
        >>> output_rtol(nn.Linear(2, 2)), output_rtol(nn.Linear(2, 2).bfloat16())
        (0.0001, 0.015625)
    """
    eps = [torch.finfo(p.dtype).eps for p in model.parameters() if p.is_floating_point()]
    return max([OUTPUT_RTOL, *(2 * e for e in eps)])


def tensor_leaves(output: Any) -> list[Tensor]:
    """The tensors of a model output, in order (a Hugging Face ``ModelOutput`` as its tuple)."""
    if hasattr(output, "to_tuple"):  # Hugging Face ModelOutput
        output = output.to_tuple()
    return [t for t in tree_leaves(output) if isinstance(t, Tensor)]


def output_error(output: Any, expected: Any) -> float:
    """Largest ``||a - b|| / ||b||`` over the tensors of two model outputs of one structure
    (``inf`` when the structures differ)."""
    got, want = tensor_leaves(output), tensor_leaves(expected)
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want, strict=True)):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if not b.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        a, b = a.double(), b.double()
        norm = float(b.norm())
        diff = float((a - b).norm())
        worst = max(worst, diff / norm if norm > 0 else diff)
    return worst


# ------------------------------------------------------------------------ BN folding
_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def fold_batchnorms_(model: nn.Module, example_inputs: Any) -> list[str]:
    """Fold each BatchNorm that directly follows a conv into that conv, in place; the
    BatchNorm becomes ``nn.Identity``. ``model`` must be in eval mode.

    The pairs come from the data flow of one forward pass on ``example_inputs``. A pair is
    folded only when folding cannot change anything else: the conv runs once, its output
    goes to the BatchNorm alone (not to another op, not out of the model), and the
    BatchNorm runs once, with running statistics, and no hook sees a tensor that folding
    changes (a hook on the conv, the BatchNorm, or a module holding one but not the other).
    The names folded are also listed in the model's ``FOLDED_ATTR`` attribute, which
    ``save_compact`` writes so that ``load_compact`` rebuilds the folded model.

    Returns:
        The names of the BatchNorms folded.

    Raises:
        ValueError: ``model`` is in training mode.
    """
    if model.training:
        raise ValueError("fold_batchnorms_ needs a model in eval mode; call model.eval() first")
    # Only a plain conv (its forward uses .weight as is) into a plain BatchNorm (an affine
    # map in eval): a subclass may do more (timm's BatchNormAct2d also applies the
    # activation; a weight-standardized conv rescales its weight in its forward).
    convs = {n: m for n, m in model.named_modules() if type(m) in CONV_TYPES}
    # A hook on a module that holds the conv or the BatchNorm but not both sees a tensor
    # that folding changes (or is lost with the BatchNorm): such pairs stay as they are.
    hooked = [n for n, m in model.named_modules() if has_hooks(m)]
    pairs = {c: b for c, b in _sole_conv_bn_pairs(model, convs, example_inputs).items()
             if type(model.get_submodule(b)) in _PLAIN_BATCHNORMS
             and not any(_holds(h, c) != _holds(h, b) for h in hooked)}
    for conv_name, bn_name in pairs.items():
        conv, bn = convs[conv_name], model.get_submodule(bn_name)
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        model.set_submodule(bn_name, nn.Identity())
    if pairs:  # save_compact records them, so that load_compact rebuilds this model
        folded = getattr(model, FOLDED_ATTR, [])
        setattr(model, FOLDED_ATTR, [*folded, *pairs.values()])
    return list(pairs.values())


#: Set (to ``True``) on the model :func:`prepare_for_inference` returns prepared.
PREPARED_ATTR = "_lrpet_prepared"

#: The attribute in which :func:`fold_batchnorms_` lists, on the module it folded, the
#: BatchNorms it replaced by ``nn.Identity`` (read by ``save_compact``).
FOLDED_ATTR = "_lrpet_folded_batchnorms"


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has a forward, forward-pre, backward or backward-pre hook."""
    return hook_count(module) > 0


def _hooked(layer: nn.Module) -> bool:
    """Whether ``layer`` or a module inside it has a hook (see :func:`has_hooks`)."""
    return any(has_hooks(m) for m in layer.modules())


def _holds(ancestor: str, name: str) -> bool:
    """Whether the module named ``ancestor`` is the one named ``name`` or contains it."""
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _sole_conv_bn_pairs(
    model: nn.Module, convs: dict[str, nn.Module], example_inputs: Any
) -> dict[str, str]:
    """``{conv name: bn name}`` of the pairs that are safe to fold (see ``fold_batchnorms_``)."""
    # BNPairTracer pairs any layer with the BatchNorm that consumes its output; the rank
    # fields of TargetLayer only matter for projection.
    layers = [TargetLayer(name, conv, rank=0, full_rank=0) for name, conv in convs.items()]
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    calls: dict[str, int] = {}
    outputs: dict[str, Tensor] = {}
    uses = _UseCounter()

    def on_call(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any = None) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, Tensor):  # a conv's output: count who uses it
                outputs[name] = output
                uses.watch(output)

        return hook

    handles = [conv.register_forward_hook(on_call(n)) for n, conv in convs.items()]
    handles += [bn.register_forward_pre_hook(on_call(n)) for n, bn in bns.items()]
    try:
        # Eager, also inside a torch.compile'd submodule: a graph break would hand the
        # counter dynamo's own tensors, and compiled code runs no hooks.
        with (torch.compiler.set_stance("force_eager"), BNPairTracer(model, layers) as tracer,
              uses):
            result = run_forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    returned = {id(t) for t in tree_leaves(result) if isinstance(t, Tensor)}

    def safe(conv_name: str, bn_name: str) -> bool:
        out = outputs[conv_name]
        return (
            calls[conv_name] == 1
            and calls[bn_name] == 1
            and uses.count(out) == 1  # the BatchNorm's own use
            and id(out) not in returned
            and bns[bn_name].running_mean is not None  # else eval uses batch statistics
        )

    return {c: b for c, (b, _) in tracer.pairs().items() if safe(c, b)}


class _UseCounter(TorchFunctionMode):
    """Counts, during a forward pass, how many torch operations take each watched tensor
    as an input. Queries that return no tensor (``x.dim()``, ``x.shape``) are not uses.
    Watched tensors are kept referenced so that Python cannot hand a freed tensor's ``id``
    to another one.
    """

    def __init__(self) -> None:
        super().__init__()
        self._uses: dict[int, tuple[Tensor, int]] = {}

    def watch(self, tensor: Tensor) -> None:
        self._uses[id(tensor)] = (tensor, 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(isinstance(t, Tensor) for t in tree_leaves(out)):
            for t in tree_leaves((args, kwargs)):
                entry = self._uses.get(id(t))
                if entry is not None and entry[0] is t:
                    self._uses[id(t)] = (t, entry[1] + 1)
        return out

    def count(self, tensor: Tensor) -> int:
        entry = self._uses.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else 0


# ------------------------------------------------------------------------ channels_last
def _to_channels_last_(model: nn.Module) -> None:
    # Only 4-D weights have a channels_last layout; Conv1d/Conv3d stay as they are.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)


def _to_format(inputs: Any, channels_last: bool) -> Any:
    """``inputs`` with every 4-D tensor channels_last (or contiguous, when not), at any depth
    of tuples, lists and dicts."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return tree_map(lambda x: x.contiguous(memory_format=fmt)
                    if isinstance(x, Tensor) and x.dim() == 4 else x, inputs)


def _channels_last_is_faster(model: nn.Module, example_inputs: Any, repeats: int) -> bool:
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    candidate = copy_model(model)
    _to_channels_last_(candidate)
    nchw = _to_format(example_inputs, False)
    nhwc = _to_format(example_inputs, True)
    if _run_error(candidate, nhwc) is not None:  # e.g. x.view(n, -1) of a conv's output
        return False
    t_nchw, t_nhwc = time_rounds(
        [partial(run_forward, model, nchw), partial(run_forward, candidate, nhwc)], repeats
    )
    return median_ratio(t_nhwc, t_nchw) < 1


def _run_error(model: nn.Module, inputs: Any) -> str | None:
    """What goes wrong when ``model`` runs on ``inputs`` (``type: message``), or ``None``."""
    try:
        run_forward(model, inputs)
    except ValueError as err:  # run_forward's: the cause is the model's own error
        cause = err.__cause__ or err
        return f"{type(cause).__name__}: {cause}"
    return None


# ------------------------------------------------------------------------ latency-aware
#: A factorized layer whose rank is not a multiple of this is also timed with its rank padded
#: by zero channels up to the next multiple (exact): CPU conv kernels (oneDNN) block channels
#: by the float32 vector width — 8 with AVX2, 16 with AVX-512 — and run a partial block at
#: the cost of a full one plus a remainder loop (ResNet-50, 2 threads: rank 97 -> 104 made
#: those layers 5-20 % faster).
RANK_MULTIPLE = 8


@torch.no_grad()
def use_faster_forms_(
    model: nn.Module, example_inputs: Any, repeats: int = 5, *, channels_last: bool = False
) -> list[str]:
    """Replace, in place, each factorized layer by the fastest exact form on the activation
    it receives from ``example_inputs``: as it is, its rank padded with zero channels to a
    multiple of ``RANK_MULTIPLE`` (only where it is not one already), two matrix products
    (:class:`GemmFactorizedConv`, a pair of 1x1 convs only), or its dense equivalent
    (``channels_last``: make new Conv2d weights channels_last, as the rest of the model
    is). A layer with a hook on itself or a thin layer stays as it is: another form would
    not run the hook, or would feed it other tensors. Returns the names of the layers made
    dense.

    All layers are timed in one race: each round runs every layer in each form once, so a
    burst of load from other processes falls on neighbouring runs alike. The layer as it
    is (fewest FLOPs) stays unless another form is faster by ``FASTER_MARGIN`` both in the
    median over rounds of its time relative to it and in best-of.
    """
    check_int("repeats", repeats, minimum=1, meaning="timed runs per candidate")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    inputs = _layer_inputs(model, layers, example_inputs)
    forms: dict[str, list[nn.Module]] = {}
    for name, layer in layers.items():
        if name not in inputs:  # it never ran
            continue
        forms[name] = [layer]
        if _hooked(layer):
            continue  # another form would not run the hooks, or feed them other tensors
        if can_pad_rank(layer, RANK_MULTIPLE):
            forms[name].append(pad_rank(layer, RANK_MULTIPLE))
        if is_pointwise_pair(layer) and inputs[name].dim() == 4:
            forms[name].append(GemmFactorizedConv.of(layer))
        forms[name].append(layer.to_dense())
        if channels_last:
            for form in forms[name][1:]:
                _to_channels_last_(form)
    forms = {name: fs for name, fs in forms.items() if len(fs) > 1}
    candidates = [partial(form, inputs[name]) for name, fs in forms.items() for form in fs]
    rounds = iter(time_rounds(candidates, repeats) if candidates else [])
    made_dense = []
    for name, fs in forms.items():
        best = _fastest([next(rounds) for _ in fs])
        if best:
            model.set_submodule(name, fs[best])
        if not isinstance(fs[best], FactorizedLayer):
            made_dense.append(name)
    return made_dense


class GemmFactorizedConv(FactorizedConv):
    """A factorized pointwise Conv2d (1x1 kernel, stride 1, no padding) run as two matrix
    products on the channels-last view of its input: the same weights and sums as the two
    1x1 convs, with less per-call overhead at small batches on CPU (ResNet-50 shapes, 2
    threads: 0.70-0.93 of the conv pair's time at batch 1, but 1.2-1.5 at batch 16), so
    :func:`prepare_for_inference` uses it only where it times faster.

    >>> pair = FactorizedConv.from_dense(nn.Conv2d(16, 32, 1), 4)
    >>> x = torch.randn(2, 16, 5, 5)
    >>> torch.allclose(GemmFactorizedConv.of(pair)(x), pair(x), atol=1e-6)
    True
    """

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__(first, second)
        if not is_pointwise_pair(self):
            raise ValueError(f"layer must be a FactorizedConv of a 1x1, stride-1, unpadded "
                             f"Conv2d (groups 1, no bias on the first conv), got "
                             f"{FactorizedConv(first, second)!r}")

    @classmethod
    def of(cls, layer: FactorizedConv) -> GemmFactorizedConv:
        """A copy of ``layer`` (see :func:`is_pointwise_pair`) in this form."""
        if not isinstance(layer, FactorizedConv):
            raise ValueError(f"layer must be a FactorizedConv of a 1x1, stride-1, unpadded "
                             f"Conv2d, got {type(layer).__name__}")
        return cls(copy.deepcopy(layer.first), copy.deepcopy(layer.second))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:  # an unbatched (C, H, W) input: the convs take it as they are
            return self.second(self.first(x))
        y = F.linear(x.permute(0, 2, 3, 1), self.first.weight.flatten(1))
        y = F.linear(y, self.second.weight.flatten(1), self.second.bias).permute(0, 3, 1, 2)
        # The layout a conv would give: channels_last for a channels_last input, else
        # contiguous (code after it may .view() the output).
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()


def is_plain_pair(layer: nn.Module) -> bool:
    """Whether ``layer`` is a factorized layer as ``decompose_`` builds it — plain thin
    convs or linears, groups 1, no bias on the first, no parametrization — which is what
    :func:`pad_rank` and :class:`GemmFactorizedConv` assume."""
    if not isinstance(layer, FactorizedLayer):
        return False
    parts = (layer.first, layer.second)
    return (getattr(layer.first, "bias", None) is None
            and all(type(m) in (*CONV_TYPES, nn.Linear) and getattr(m, "groups", 1) == 1
                    and not hasattr(m, "parametrizations") for m in parts))


def is_pointwise_pair(layer: nn.Module) -> bool:
    """Whether ``layer`` is a factorized 1x1 Conv2d that :class:`GemmFactorizedConv` runs."""
    if not isinstance(layer, FactorizedConv) or not is_plain_pair(layer):
        return False
    first, second = layer.first, layer.second
    return (type(first) is nn.Conv2d and type(second) is nn.Conv2d
            and all(c.kernel_size == (1, 1) and c.stride == (1, 1) and c.dilation == (1, 1)
                    and c.padding in ((0, 0), "valid") for c in (first, second)))


def _layer_forms(model: nn.Module) -> dict[str, tuple[type, int]]:
    return {n: (type(m), m.rank) for n, m in model.named_modules()
            if isinstance(m, FactorizedLayer)}


def pad_rank(layer: FactorizedLayer, multiple: int) -> FactorizedLayer:
    """A copy of ``layer`` with its rank rounded up to a multiple of ``multiple``: the first
    thin layer gets zero output channels, the second zero input channels, so it computes
    the same (up to float round-off of the reordered sums).

    >>> from lrpet_lightning.core.factorized import FactorizedConv
    >>> pad_rank(FactorizedConv.from_dense(nn.Conv2d(16, 32, 3), 5), 8).rank
    8
    """
    check_int("multiple", multiple, minimum=1, meaning="the rank is rounded up to this")
    if not is_plain_pair(layer):
        raise ValueError(f"layer must be a factorized layer of plain thin layers (groups 1, "
                         f"no bias on the first, no parametrization) to pad its rank, got "
                         f"{layer!r}")
    extra = -layer.rank % multiple
    full = _full_rank(layer)
    if layer.rank + extra > full:
        raise ValueError(
            f"rank {layer.rank} padded to a multiple of {multiple} is {layer.rank + extra}, "
            f"above the full rank {full} of this {type(layer).__name__}: the dense layer "
            "costs less, and no thin pair of that rank can be rebuilt from the dense layer")
    first, second = copy.deepcopy(layer.first), copy.deepcopy(layer.second)
    w1, w2 = first.weight, second.weight
    first.weight = nn.Parameter(torch.cat([w1, w1.new_zeros(extra, *w1.shape[1:])]),
                                requires_grad=w1.requires_grad)
    second.weight = nn.Parameter(
        torch.cat([w2, w2.new_zeros(w2.shape[0], extra, *w2.shape[2:])], dim=1),
        requires_grad=w2.requires_grad)
    rank = layer.rank + extra
    for module, attr in ((first, "out_channels"), (second, "in_channels"),
                         (first, "out_features"), (second, "in_features")):
        if hasattr(module, attr):
            setattr(module, attr, rank)
    return type(layer)(first, second)


def _full_rank(layer: FactorizedLayer) -> int:
    """``min(rows, cols)`` of the dense weight matrix that ``layer`` factorizes."""
    return min(layer.first.weight[0].numel(), layer.second.weight.shape[0])


def can_pad_rank(layer: nn.Module, multiple: int) -> bool:
    """Whether :func:`pad_rank` pads ``layer``: a plain pair (:func:`is_plain_pair`) whose
    rank is not a multiple of ``multiple`` and whose next multiple is at most its full rank."""
    if not is_plain_pair(layer) or layer.rank % multiple == 0:
        return False
    return layer.rank - layer.rank % multiple + multiple <= _full_rank(layer)


def pad_ranks(model: nn.Module, multiple: int = RANK_MULTIPLE) -> nn.Module:
    """``model`` itself when every factorized layer's rank is a multiple of ``multiple``,
    else a copy with each other one padded by :func:`pad_rank` (the same outputs). Layers
    that are not plain pairs (:func:`is_plain_pair`: built by hand with groups, a bias on
    the first thin layer or a parametrization) are left as they are, and so are layers
    whose padded rank would exceed their full rank (``min(rows, cols)`` of the dense
    matrix, e.g. a squeeze-excitation conv to 4 channels at rank 1).

    >>> from lrpet_lightning.core.factorized import FactorizedConv
    >>> net = nn.Sequential(FactorizedConv.from_dense(nn.Conv2d(16, 32, 3), 5))
    >>> pad_ranks(net, 8)[0].rank, net[0].rank, pad_ranks(net, 5) is net
    (8, 5, True)
    """
    check_int("multiple", multiple, minimum=1, meaning="the ranks are rounded up to this")
    names = [n for n, m in model.named_modules() if can_pad_rank(m, multiple)]
    if not names:
        return model
    padded = copy_model(model)
    for name in names:
        padded.set_submodule(name, pad_rank(padded.get_submodule(name), multiple))
    return padded


#: A form other than the one with the fewest FLOPs (the cost model's pick) is taken only
#: when it is this much faster, by the median of paired ratios and by best-of alike. On a
#: loaded machine a form with fewer kernels can look faster in a few rounds without being
#: so (measured: all-dense ResNet-50 chosen by a 5-round race at batch 16 under load,
#: 1.00 of dense against 0.70 for all-factorized in the 20 rounds after).
FASTER_MARGIN = 0.05


def _clearly_faster(times: Sequence[float], reference: Sequence[float]) -> float:
    """The median ratio of ``times`` to ``reference`` if both it and the best-of ratio are
    below ``1 - FASTER_MARGIN``, else ``inf``."""
    ratio = median_ratio(times, reference)
    best = min(times) / max(min(reference), 1e-12)
    return ratio if max(ratio, best) < 1 - FASTER_MARGIN else float("inf")


def _fastest(rounds: Sequence[Sequence[float]]) -> int:
    """Index of the fastest candidate; the first (the prior) unless another is clearly
    faster (see ``FASTER_MARGIN``)."""
    ratios = [1.0] + [_clearly_faster(t, rounds[0]) for t in rounds[1:]]
    return min(range(len(rounds)), key=ratios.__getitem__)


def _fastest_model(
    models: Sequence[nn.Module], example_inputs: Any, repeats: int
) -> int:
    """Index of the fastest of ``models`` on ``example_inputs`` (each round runs all of them
    once); the first unless another is clearly faster."""
    rounds = time_rounds([partial(run_forward, m, example_inputs) for m in models], repeats)
    return _fastest(rounds)


def _all_dense(model: nn.Module, channels_last: bool) -> nn.Module:
    """A copy of ``model`` with every factorized layer as its dense equivalent."""
    dense = copy_model(model)
    for name, layer in list(dense.named_modules()):
        if isinstance(layer, FactorizedLayer) and not _hooked(layer):
            form = layer.to_dense()
            if channels_last:
                _to_channels_last_(form)
            dense.set_submodule(name, form)
    return dense


def _layer_inputs(
    model: nn.Module, layers: dict[str, nn.Module], example_inputs: Any
) -> dict[str, Tensor]:
    """The input tensor each layer receives in one forward pass (its first call's)."""
    inputs: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                # clone: a later in-place op (ReLU(inplace=True)) must not alter it.
                inputs.setdefault(name, args[0].clone())

        return hook

    handles = [m.register_forward_pre_hook(keep(n)) for n, m in layers.items()]
    try:
        run_forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def median_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``times[i] / reference[i]``: how much slower than the
    reference a candidate ran beside it (< 1: faster). Pairing runs of one round cancels
    load that comes and goes between rounds.

    >>> median_ratio([2.0, 9.0, 2.2], [1.0, 3.0, 2.0])
    2.0
    """
    return statistics.median(t / max(r, 1e-12) for t, r in zip(times, reference, strict=True))


def time_rounds(candidates: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Wall time in seconds of each candidate in each of ``repeats`` rounds (one run of
    each per round, interleaved, after one warm-up run each), so that load on a shared
    machine hits every candidate alike. Where CUDA is in use the clock stops after the
    GPU's queue has drained (``torch.cuda.synchronize``), so kernels are timed, not their
    launches.

    >>> [len(t) for t in time_rounds([lambda: sum(range(9)), lambda: sorted(range(9))], 3)]
    [3, 3]
    """
    check_int("repeats", repeats, minimum=1, meaning="timed runs per candidate")
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for fn in candidates:
        fn()
    times: list[list[float]] = [[] for _ in candidates]
    for _ in range(repeats):
        for i, fn in enumerate(candidates):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return times


def race(candidates: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Best-of-``repeats`` wall time of each candidate, in seconds, run interleaved (see
    :func:`time_rounds`).

    >>> len(race([lambda: sum(range(100)), lambda: sorted(range(100))], repeats=2))
    2
    """
    return [min(t) for t in time_rounds(candidates, repeats)]
