"""The zoo test (issue 13): every public verb on models nobody here wrote — timm,
transformers, torchvision and small hand-written ones (``zoo_models.py``) — either does the
right thing or says clearly, in one warning, what it left alone.

Per model (each a test id ``test_<check>[<model>]``):

- ``project_convs`` / ``project_with_linear``: every Conv/Linear-like module with a weight
  matrix (plain, subclassed, grouped, transposed, lazy, parametrized, HF ``Conv1D``, LSTM/GRU,
  ``MultiheadAttention.in_proj_weight``) is either projected — the weight *the forward
  actually uses* has rank <= the record's rank — or named in one warning of the call. A
  record that says "projected" must be true of the forward's weight.
- ``decompose_preserves_outputs``: decomposing the projected model reproduces its outputs.
- ``report_consistent``: ``compression_report``'s rows agree with the analytic cost
  (2 * weight numel per output position; thin pair: 2 * r * (rows + cols)), its totals with
  ``torch.utils.flop_counter`` and the parameter counts; what cannot be counted is named.
- ``compact_not_bigger``: the compact model's measured FLOPs and parameters <= dense.
- ``prepare_for_inference``: reproduces the outputs of the dense and the compact model.
- ``save_load_roundtrip``: ``save_compact``/``load_compact`` into a freshly built model.
- ``export``: ``torch.export`` of the compact model works where the dense one exports.

Nothing is downloaded: every model is built from its config with random weights.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("timm")
pytest.importorskip("transformers")

from zoo_models import ZOO, _ConvBNNet, _Lazy, build, forward

from lrpet_lightning import (
    FactorizedLayer,
    compression_report,
    decompose_,
    load_compact,
    prepare_for_inference,
    project_low_rank_,
    save_compact,
)

RATIO = 0.25
OUTPUT_RTOL = 1e-4
#: A singular value counts towards the rank above this fraction of the largest one.
RANK_RTOL = 1e-4
NAMES = list(ZOO)


# ----------------------------------------------------------------------------- helpers
def is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _to_plain(output: Any) -> Any:
    if hasattr(output, "to_tuple"):  # transformers' ModelOutput
        return tuple(_to_plain(v) for v in output.to_tuple())
    if isinstance(output, (list, tuple)):
        return type(output)(_to_plain(v) for v in output) if isinstance(output, list) \
            else tuple(_to_plain(v) for v in output)
    if isinstance(output, dict):
        return {k: _to_plain(v) for k, v in output.items()}
    return output


def leaves(output: Any) -> list[Tensor]:
    return [t.detach() for t in tree_leaves(_to_plain(output)) if isinstance(t, Tensor)]


def relative_error(output: Any, expected: Any) -> float:
    a, b = leaves(output), leaves(expected)
    assert len(a) == len(b), f"{len(a)} output tensors, expected {len(b)}"
    num = den = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape, f"output shape {tuple(x.shape)}, expected {tuple(y.shape)}"
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return math.inf
            continue
        num += float((x.double() - y.double()).norm()) ** 2
        den += float(y.double().norm()) ** 2
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


def run(model: nn.Module, inputs: Any) -> Any:
    model.eval()
    with torch.no_grad():
        return forward(model, inputs)


def layer_kinds(include_linear: bool) -> tuple:
    kinds: list[type] = [nn.modules.conv._ConvNd]  # convs of every kind, transposed, lazy
    if include_linear:
        kinds += [nn.Linear, nn.RNNBase, nn.MultiheadAttention]
    return tuple(kinds)


def weight_layers(model: nn.Module, include_linear: bool) -> dict[str, nn.Module]:
    """Every Conv/Linear-like module holding a weight matrix, by its (first) name."""
    kinds = layer_kinds(include_linear)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, kinds) or (include_linear and is_hf_conv1d(m))}


def _uninitialized(module: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter)
               for p in module.parameters(recurse=False))


_STD_CONVS = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}


def forward_matrices(module: nn.Module) -> list[list[Tensor]] | None:
    """The weight matrices ``module``'s forward computes with (one entry per matrix, each a
    list of admissible orientations), read at forward time; None when uninitialized."""
    if _uninitialized(module):
        return None
    if isinstance(module, nn.RNNBase):
        return [[p.detach()] for n, p in module.named_parameters(recurse=False)
                if p.dim() == 2]
    if isinstance(module, nn.MultiheadAttention):
        ws = [module.in_proj_weight] if module.in_proj_weight is not None else [
            module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        return [[w.detach()] for w in ws]
    w = module.weight.detach()  # a parametrization computes it here
    if is_hf_conv1d(module):
        return [[w.T]]
    if type(module).__name__ in _STD_CONVS:  # timm's weight standardization
        w = torch.nn.functional.batch_norm(
            w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0,
            eps=module.eps).reshape_as(w)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return [[w.reshape(w.shape[0], -1), w.transpose(0, 1).reshape(w.shape[1], -1)]]
    return [[w.reshape(w.shape[0], -1)]]


def matrices_as_forward_sees(model: nn.Module, inputs: Any,
                             modules: dict[str, nn.Module]) -> dict[str, Any]:
    """``forward_matrices`` of each module, captured in a forward pre-hook that runs after
    the module's own pre-hooks (the legacy weight_norm / spectral_norm recompute .weight
    there); modules the forward does not call are read afterwards."""
    seen: dict[str, Any] = {}
    handles = []
    for name, module in modules.items():
        def hook(mod: nn.Module, args: Any, name: str = name) -> None:
            if name not in seen:
                seen[name] = forward_matrices(mod)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    for name, module in modules.items():
        if name not in seen:
            seen[name] = forward_matrices(module)
    return seen


def numerical_rank(M: Tensor) -> int:
    """Singular values above ``RANK_RTOL * s_max``, from the float64 Gram matrix's
    eigenvalues (``s**2``; ten times faster than an SVD, exact enough at this threshold)."""
    M = M.double()
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    ev = torch.linalg.eigvalsh(G)
    top = float(ev[-1]) if ev.numel() else 0.0
    return int((ev > RANK_RTOL**2 * top).sum()) if top > 0 else 0


def max_rank(matrices: list[list[Tensor]] | None) -> int | None:
    if matrices is None:
        return None
    return max((min(numerical_rank(m) for m in alts) for alts in matrices), default=0)


def expected_rank(full_rank: int) -> int:
    return max(1, math.floor(RATIO * full_rank + 1e-9))


def names_in(text: str, names: Iterable[str]) -> set[str]:
    """The module names that ``text`` mentions (as whole dotted names)."""
    return {n for n in names
            if re.search(r"(?<![\w.])" + re.escape(n) + r"(?![\w]|\.[\w])", text)}


def check_one_summary(needed: list[str], messages: list[str], what: str) -> list[str]:
    """Problems, if no single message names every layer of ``needed``."""
    if not needed:
        return []
    found = [names_in(m, needed) for m in messages]
    if any(len(f) == len(needed) for f in found):
        return []
    best = max(found, key=len, default=set())
    missing = [n for n in needed if n not in best]
    speaking = sum(1 for f in found if f)
    return [(f"{what}: {len(missing)} of {len(needed)} layer(s) neither projected to rank r "
             f"(as the forward sees the weight) nor named in one warning of the call "
             f"({speaking} warning(s) named some): {_preview(missing)}")]


def _preview(names: list[str], limit: int = 6) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def project_and_check(model: nn.Module, inputs: Any, include_linear: bool,
                      **kwargs: Any) -> tuple[list, list[str], list[str]]:
    """Project ``model`` in place; return (records, warning texts, problems)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refusal = None
        try:
            records = project_low_rank_(model, rank_ratio=RATIO, include_linear=include_linear,
                                        example_inputs=inputs, **kwargs)
        except ValueError as err:  # a clear refusal counts as the user being told
            records, refusal = [], str(err)
    messages = [str(w.message) for w in caught] + ([refusal] if refusal else [])
    problems: list[str] = []
    all_names = {n for n, _ in model.named_modules(remove_duplicate=False)}
    by_name = {}
    for r in records:
        if r.name not in all_names:
            problems.append(f"record {r.name!r} names no module of the model (names must be "
                            "relative to the module passed in)")
        by_name[r.name] = r
    layers = weight_layers(model, include_linear)
    # Records of layers this check does not know as weight layers are still checked.
    for r in records:
        if r.name not in layers and r.name in dict(model.named_modules()):
            layers[r.name] = model.get_submodule(r.name)
    seen = matrices_as_forward_sees(model, inputs, layers)
    needed = []
    for name, module in layers.items():
        rank = max_rank(seen[name])
        rec = by_name.get(name)
        if rec is not None and rec.skipped is None:
            if rank is None or rank > rec.rank:
                problems.append(
                    f"{name} ({type(module).__name__}): the record says projected to rank "
                    f"{rec.rank} (relative change {rec.relative_change:.3g}) but the weight its "
                    f"forward uses has rank {rank}")
                continue
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not isinstance(
                    module, nn.modules.conv._ConvTransposeNd):
                full = min(seen[name][0][0].shape)
                if (rec.full_rank, rec.rank) != (full, expected_rank(full)):
                    problems.append(f"{name}: record rank {rec.rank}/{rec.full_rank}, expected "
                                    f"{expected_rank(full)}/{full} at rank_ratio={RATIO}")
            continue
        if rec is not None and rank is not None and rank <= rec.rank:
            continue  # e.g. "rank >= full rank": it is rank r anyway
        needed.append(name)
    problems += check_one_summary(needed, messages, "project_low_rank_")
    return records, messages, problems


def measured_flops(model: nn.Module, inputs: Any) -> tuple[int, dict[str, int], set[str]]:
    """Total FLOPs, FLOPs per module name and the modules that ran, of one eval forward."""
    ran: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda *_, n=n: ran.add(n))
               for n, m in model.named_modules()]
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    root = type(model).__name__
    per = {k[len(root) + 1:]: sum(v.values()) for k, v in counter.get_flop_counts().items()
           if k.startswith(root + ".")}
    return counter.get_total_flops(), per, ran


def layer_positions(model: nn.Module, inputs: Any, names: Iterable[str]) -> dict[str, int]:
    """Output positions (output numel / output channels) per module, summed over calls."""
    positions = dict.fromkeys(names, 0)
    modules = dict(model.named_modules())
    handles = []
    for name in positions:
        module = modules[name]
        out_dim = (module.nf if is_hf_conv1d(module) else
                   module.out_features if isinstance(module, nn.Linear) else
                   module.out_channels)

        def hook(mod: nn.Module, args: Any, out: Tensor, name: str = name,
                 out_dim: int = out_dim) -> None:
            positions[name] += out.numel() // out_dim
        handles.append(module.register_forward_hook(hook))
    try:
        run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return positions


def _is_report_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or is_hf_conv1d(m)


def _matrix_shape(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    if is_hf_conv1d(m):
        return w.shape[1], w.shape[0]
    return w.shape[0], w[0].numel()


def uncounted_modules(model: nn.Module, inputs: Any) -> list[str]:
    """Top-most modules that ran, hold weight matrices (not embeddings) in their subtree
    and were counted 0 FLOPs: ``torch.utils.flop_counter`` has no formula for their ops."""
    _, per, ran = measured_flops(model, inputs)
    out: list[str] = []
    # A parametrization computes a layer's weight (weight_norm's g * v / |v|): not compute
    # of the model's own that a FLOPs count would miss.
    skip = [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.utils.parametrize.ParametrizationList)]
    for name, module in model.named_modules():
        if not name or name not in ran or per.get(name, 0):
            continue
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if any(name.startswith(u + ".") for u in out):
            continue
        mats = [p for sub in module.modules() if not isinstance(sub, (nn.Embedding,
                                                                      nn.EmbeddingBag))
                for p in sub.parameters(recurse=False) if p.dim() >= 2]
        if mats:
            out.append(name)
    return out


def export_args(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


# ---------------------------------------------------------------------------- fixtures
class Entry:
    """One zoo model and what the checks derive from it, each built once (lazily) and
    shared by that model's tests; a failed step re-raises in every test that needs it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, make: Any) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = ("ok", make())
            except Exception as err:  # noqa: BLE001 - re-raised in each dependent test
                self._cache[key] = ("error", err)
        status, value = self._cache[key]
        if status == "error":
            raise RuntimeError(f"{key} step failed: {type(value).__name__}: "
                               f"{str(value)[:500]}") from value
        return value

    @property
    def dense(self):  # the untouched model (never modified by a test)
        return self._get("build", lambda: build(self.name))

    def fresh(self) -> nn.Module:
        """Another copy of the dense model, built again (some models, e.g. with the legacy
        weight_norm hook, cannot be deep-copied)."""
        return build(self.name).model

    def _project(self) -> nn.Module:
        m = self.fresh()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                project_low_rank_(m, rank_ratio=RATIO, include_linear=True,
                                  example_inputs=self.dense.inputs)
            except ValueError as err:  # clearly refused (test_project_* checks the message)
                self._cache["refused"] = ("ok", str(err))
        return m

    @property
    def projected(self) -> nn.Module:
        """Projected with include_linear=True (the dense reference of the compact model)."""
        model = self._get("project_low_rank_(include_linear=True)", self._project)
        self._skip_if_refused()
        return model

    def _skip_if_refused(self) -> None:
        refused = self._cache.get("refused")
        if refused is not None:
            pytest.skip(f"nothing projectable, clearly refused: {refused[1][:300]}")

    @property
    def compact(self) -> nn.Module:
        """The same projection (deterministic), then decomposed."""
        self.projected  # noqa: B018 - a failed projection is reported as such
        self._skip_if_refused()
        def make() -> nn.Module:
            m = self._project()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decompose_(m, rank_ratio=RATIO, include_linear=True,
                           example_inputs=self.dense.inputs)
            return m.eval()
        return self._get("decompose_", make)


@pytest.fixture(scope="module", params=NAMES, ids=NAMES)
def zoo(request: pytest.FixtureRequest) -> Entry:
    # Module scope + params: pytest runs all checks of one model together, then drops it.
    return Entry(request.param)


# ------------------------------------------------------------------------------- checks
def test_project_convs(zoo: Entry) -> None:
    model = zoo.fresh()
    _, _, problems = project_and_check(model, zoo.dense.inputs, include_linear=False)
    assert not problems, "\n".join(problems)


def test_project_with_linear(zoo: Entry) -> None:
    model = zoo.fresh()
    _, _, problems = project_and_check(model, zoo.dense.inputs, include_linear=True)
    assert not problems, "\n".join(problems)


def test_decompose_preserves_outputs(zoo: Entry) -> None:
    x = zoo.dense.inputs
    expected = run(zoo.projected, x)
    error = relative_error(run(zoo.compact, x), expected)
    assert error <= OUTPUT_RTOL, (f"decompose_ after projection changed the outputs: relative "
                                  f"error {error:.3g}")


def test_report_consistent(zoo: Entry) -> None:
    dense, compact, x = zoo.projected, zoo.compact, zoo.dense.inputs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compression_report(dense, compact, x)
    messages = [str(w.message) for w in caught]
    problems: list[str] = []
    dense_modules = dict(dense.named_modules())
    compact_modules = dict(compact.named_modules())
    rows = {row.name: row for row in report.layers}
    expected_rows = [n for n, m in dense_modules.items() if _is_report_layer(m)]
    missing = [n for n in expected_rows if n not in rows]
    if missing:
        problems.append(f"no report row for {len(missing)} layer(s): {_preview(missing)}")
    unknown = [n for n in rows if n not in dense_modules]
    if unknown:
        problems.append(f"report rows name no module of the dense model: {_preview(unknown)}")
    positions = layer_positions(dense, x, [n for n in rows if n in dense_modules])
    bad: list[str] = []
    for name, row in rows.items():
        if name not in dense_modules:
            continue
        module = dense_modules[name]
        rows_, cols = _matrix_shape(module)
        bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
        dense_flops = 2 * rows_ * cols * positions[name]
        dense_params = rows_ * cols + bias
        if module._parameters.get("weight") is None:  # weight_norm's g and v, spectral...
            dense_params = sum(p.numel() for p in module.parameters())
        thin = compact_modules.get(name)
        if isinstance(thin, FactorizedLayer):
            r = thin.rank
            compact_flops = 2 * r * (rows_ + cols) * positions[name]
            compact_params = r * (rows_ + cols) + bias
            rank = r
        else:
            compact_flops, compact_params, rank = dense_flops, dense_params, None
        got = (row.dense_flops, row.compact_flops, row.dense_params, row.compact_params,
               row.rank)
        want = (dense_flops, compact_flops, dense_params, compact_params, rank)
        if got != want:
            bad.append(f"{name}: (dense FLOPs, compact FLOPs, dense params, compact params, "
                       f"rank) = {got}, analytic {want}")
    if bad:
        problems.append(f"{len(bad)} report row(s) disagree with the analytic cost: "
                        + "; ".join(bad[:4]) + (" ..." if len(bad) > 4 else ""))
    dense_total, _, _ = measured_flops(dense, x)
    compact_total, _, _ = measured_flops(compact, x)
    totals = {
        "dense_flops": (report.dense_flops, dense_total),
        "compact_flops": (report.compact_flops, compact_total),
        "dense_params": (report.dense_params, sum(p.numel() for p in dense.parameters())),
        "compact_params": (report.compact_params, sum(p.numel() for p in compact.parameters())),
    }
    for key, (got, want) in totals.items():
        if got != want:
            problems.append(f"report {key} = {got}, measured {want}")
    # What flop_counter cannot count must be said (by module), never shown as measured.
    declared = set(getattr(report, "uncounted", {}) or {})
    for label, model in (("dense", dense), ("compact", compact)):
        for name in uncounted_modules(model, x):
            inside = {n for n, _ in model.named_modules()
                      if n == name or n.startswith(name + ".")}
            if inside & declared or any(names_in(m, inside) for m in messages):
                continue
            problems.append(f"{label} module {name} ran with 0 FLOPs counted (no FLOPs formula "
                            "for its ops) but the report does not name it as uncounted")
    assert not problems, "\n".join(problems)


def factorized_weight_reads(model: nn.Module, inputs: Any) -> list[str]:
    """Factorized layers whose ``.weight`` (the dense matrix, rebuilt from the thin pair on
    every read: the FLOPs the factorization saves) is read during one forward pass."""
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    reads: list[str] = []
    patched = {}
    for cls in {type(m) for m in model.modules() if isinstance(m, FactorizedLayer)}:
        original = next(c.__dict__["weight"] for c in cls.__mro__ if "weight" in c.__dict__)

        def getter(self: nn.Module, original: Any = original) -> Any:
            reads.append(names.get(id(self), "?"))
            return original.__get__(self, type(self))
        patched[cls] = cls.__dict__.get("weight")
        cls.weight = property(getter)  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(model, inputs)
    finally:
        for cls, before in patched.items():
            if before is None:
                del cls.weight
            else:
                cls.weight = before  # type: ignore[attr-defined]
    return sorted(set(reads))


def test_compact_not_bigger(zoo: Entry) -> None:
    dense, compact, x = zoo.dense.model, zoo.compact, zoo.dense.inputs
    dense_flops, dense_per, _ = measured_flops(dense, x)
    compact_flops, compact_per, _ = measured_flops(compact, x)
    dense_params = sum(p.numel() for p in dense.parameters())
    compact_params = sum(p.numel() for p in compact.parameters())
    problems = []
    if compact_flops > dense_flops:
        problems.append(f"compact FLOPs {compact_flops} > dense {dense_flops} "
                        f"({100 * (compact_flops / dense_flops - 1):+.1f} %)")
    if compact_params > dense_params:
        problems.append(f"compact params {compact_params} > dense {dense_params} "
                        f"({100 * (compact_params / dense_params - 1):+.1f} %)")
    # Per module too: a parent whose FLOPs grow rebuilds a dense weight it reads.
    grown = [f"{n} ({dense_per[n]} -> {compact_per[n]})" for n in dense_per
             if n in compact_per and compact_per[n] > dense_per[n]]
    if grown:
        problems.append(f"{len(grown)} module(s) cost more FLOPs in the compact model: "
                        f"{_preview(grown, 4)}")
    dense_modules = dict(dense.named_modules())
    bigger = [f"{n} ({sum(p.numel() for p in dense_modules[n].parameters())} -> "
              f"{sum(p.numel() for p in m.parameters())})"
              for n, m in compact.named_modules() if n in dense_modules
              and sum(p.numel() for p in m.parameters())
              > sum(p.numel() for p in dense_modules[n].parameters())]
    if bigger:
        problems.append(f"{len(bigger)} module(s) hold more parameters in the compact model: "
                        f"{_preview(bigger, 4)}")
    reads = factorized_weight_reads(compact, x)
    if reads:
        problems.append(f"the forward reads .weight of {len(reads)} factorized layer(s) (the "
                        f"dense matrix is rebuilt on every read): {_preview(reads)}")
    assert not problems, "; ".join(problems)


def test_prepare_for_inference(zoo: Entry) -> None:
    x, other = zoo.dense.inputs, zoo.dense.make_inputs(1)
    problems = []
    for label, get in (("dense", lambda: zoo.dense.model), ("compact", lambda: zoo.compact)):
        model = get()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                prepared = prepare_for_inference(model, x, repeats=1)
            except ValueError as err:  # a clear refusal (e.g. a model it cannot copy)
                assert str(err), f"{label} model: prepare_for_inference refused without a reason"
                continue
        for which, inputs in (("example input", x), ("another input", other)):
            error = relative_error(run(prepared, inputs), run(model, inputs))
            if not error <= OUTPUT_RTOL:
                problems.append(f"{label} model, {which}: prepared outputs differ, relative "
                                f"error {error:.3g}")
    assert not problems, "; ".join(problems)


def test_save_load_roundtrip(zoo: Entry, tmp_path) -> None:
    compact, x = zoo.compact, zoo.dense.inputs
    path = save_compact(compact, tmp_path / "compact.pt")
    fresh = build(zoo.name).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_compact(fresh, path)
    loaded.eval()
    ours, theirs = compact.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys(), (
        f"state dict keys differ: {sorted(set(ours) ^ set(theirs))[:6]}")
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"loaded tensors differ: {differ[:6]}"
    for a, b in zip(leaves(run(loaded, x)), leaves(run(compact, x)), strict=True):
        assert torch.equal(a, b), "outputs of the loaded model differ"


@pytest.mark.slow
def test_export(zoo: Entry) -> None:
    args, kwargs = export_args(zoo.dense.inputs)
    compact = zoo.compact
    try:
        exported = torch.export.export(compact, args, kwargs)
    except Exception as compact_err:
        try:  # only then export the dense one (half the time when the compact one works)
            torch.export.export(zoo.fresh(), args, kwargs)
        except Exception as err:  # noqa: BLE001
            pytest.skip(f"the dense model does not export either: {type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}")
        raise AssertionError(f"the dense model exports, the compact one does not: "
                             f"{type(compact_err).__name__}: {str(compact_err)[:300]}") \
            from compact_err
    error = relative_error(exported.module()(*args, **kwargs), run(compact, zoo.dense.inputs))
    assert error <= 1e-5, f"exported compact model: relative error {error:.3g}"


# ----------------------------------------------------------------------- specific models
def test_gpt2_conv1d_projected_decomposed_tie_kept() -> None:
    z = build("hf_gpt2")
    model, x = z.model, z.inputs
    dense_params = sum(p.numel() for p in model.parameters())
    dense_flops, _, _ = measured_flops(model, x)
    records, messages, problems = project_and_check(model, x, include_linear=True)
    conv1d = [n for n, m in model.named_modules() if is_hf_conv1d(m)]
    by_name = {r.name: r for r in records}
    not_projected = [n for n in conv1d if n not in by_name or by_name[n].skipped is not None]
    assert not not_projected, f"HF Conv1D layers not projected: {not_projected}"
    assert not problems, "\n".join(problems)
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte, "projection untied lm_head from the embedding"
    head_told = any(names_in(m, ["lm_head"]) for m in messages)
    if "lm_head" not in by_name or by_name["lm_head"].skipped is not None:
        assert head_told, "lm_head neither projected nor named in the warning"
    expected = run(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decompose_(model, rank_ratio=RATIO, include_linear=True, example_inputs=x)
    modules = dict(model.named_modules())
    decompose_text = "\n".join(str(w.message) for w in caught)
    dense_left = []
    for n in conv1d:
        if isinstance(modules.get(n), FactorizedLayer):
            continue
        rows, cols = _matrix_shape(modules[n])
        r = by_name[n].rank
        saves = r * (rows + cols) < rows * cols
        if saves or not names_in(decompose_text, [n]):
            dense_left.append(f"{n} (rank {r} of {rows}x{cols})")
    assert not dense_left, f"HF Conv1D layers not decomposed (nor named): {dense_left}"
    error = relative_error(run(model, x), expected)
    assert error <= OUTPUT_RTOL, f"decompose_ changed GPT-2's outputs: {error:.3g}"
    head = model.lm_head
    if isinstance(head, FactorizedLayer):
        # factorized: the embedding must use the same thin pair (or the tie is lost)
        assert model.get_output_embeddings() is head and not any(
            p is wte for p in model.parameters()), "lm_head factorized but the tie is lost"
    else:
        assert head.weight is model.transformer.wte.weight, "decompose_ untied lm_head"
        if "lm_head" not in by_name or by_name["lm_head"].skipped is not None:
            assert any(names_in(str(w.message), ["lm_head"]) for w in caught) or head_told, \
                "lm_head kept dense without a word"
    compact_params = sum(p.numel() for p in model.parameters())
    assert compact_params <= dense_params, f"compact params {compact_params} > {dense_params}"
    compact_flops, _, _ = measured_flops(model, x)
    assert compact_flops <= dense_flops, f"compact FLOPs {compact_flops} > {dense_flops}"


def test_zero_gamma_bn_conv_is_projected() -> None:
    """A conv followed by a BatchNorm with gamma = 0 is projected without rectification,
    not labelled 'all-zero' and left full rank."""
    z = build("hw_zero_gamma_bn")
    records, _, problems = project_and_check(z.model, z.inputs, include_linear=False)
    rec = {r.name: r for r in records}.get("conv2")
    assert rec is not None and rec.skipped is None, f"conv2 not projected: {rec}"
    assert not problems, "\n".join(problems)


def test_frozen_layers_stay_frozen() -> None:
    z = build("hw_frozen")
    model = z.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        project_low_rank_(model, rank_ratio=RATIO, include_linear=True, example_inputs=z.inputs)
        decompose_(model, rank_ratio=RATIO, include_linear=True, example_inputs=z.inputs)
    for name, frozen in (("conv1", True), ("conv2", False), ("fc", True)):
        layer = model.get_submodule(name)
        assert isinstance(layer, FactorizedLayer), f"{name} not decomposed"
        weights = [layer.first.weight, layer.second.weight]
        assert all(w.requires_grad is not frozen for w in weights), (
            f"{name}: thin weights requires_grad {[w.requires_grad for w in weights]}, the "
            f"dense weight's was {not frozen}")


def test_decompose_is_transactional_on_nan() -> None:
    torch.manual_seed(0)
    model = _ConvBNNet().eval()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decompose_(model, rank_ratio=RATIO, include_linear=True)
    assert not isinstance(model.conv2, FactorizedLayer), "a NaN layer was decomposed"
    assert isinstance(model.conv1, FactorizedLayer), "the finite layers were not decomposed"
    assert any(names_in(str(w.message), ["conv2"]) for w in caught), "NaN layer not warned"


def test_decompose_warns_on_truncating_a_full_rank_layer() -> None:
    torch.manual_seed(0)
    model = _ConvBNNet().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decompose_(model, rank_ratio=0.25)
    assert any(names_in(str(w.message), ["conv1", "conv2"]) == {"conv1", "conv2"}
               for w in caught), "truncating full-rank layers was silent"


def test_decompose_warns_when_nothing_is_decomposed() -> None:
    torch.manual_seed(0)
    model = _ConvBNNet().eval()  # full rank: nothing to read off the weights
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ranks = decompose_(model)
        except ValueError:
            return  # a clear refusal is fine
    assert ranks or caught, "decompose_ decomposed nothing, silently"


def test_min_rank_above_every_rank_warns() -> None:
    torch.manual_seed(0)
    model = _ConvBNNet().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            project_low_rank_(model, rank_ratio=RATIO, min_rank=1000,
                              example_inputs=torch.randn(2, 3, 8, 8))
        except ValueError:
            return
    assert caught, "min_rank above every layer's rank compressed nothing, silently"


def test_meta_device_model_clear_message() -> None:
    with torch.device("meta"):
        model = _ConvBNNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            project_low_rank_(model, rank_ratio=RATIO)
        except (ValueError, TypeError, NotImplementedError) as err:
            assert "meta" in str(err), f"unclear error on a meta-device model: {err}"
            return
    assert any("meta" in str(w.message) for w in caught), (
        "a meta-device model was 'projected' without a word")


def test_uninitialized_lazy_model() -> None:
    """Never projected silently-not: projected (after materializing) or named."""
    torch.manual_seed(0)
    model = _Lazy().eval()
    x = torch.randn(2, 3, 16, 16)
    _, _, problems = project_and_check(model, x, include_linear=True)
    assert not problems, "\n".join(problems)


def test_readme_states_the_zoo_size() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"on {len(ZOO)} models built from configs" in readme
