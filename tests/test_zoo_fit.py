"""Short Lightning fits with the callback on models nobody here wrote (a timm CNN with
BatchNormAct2d and depthwise convs, a torchvision ViT with MultiheadAttention, GPT-2 with
HF Conv1D and a tied head): each ends exactly rank r as the forward sees the weights,
decomposed, with every weight matrix left alone named in one warning, one name per layer
in records, report and checkpointed ranks, and ``trainer.test`` runs on the compact model."""
from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils._pytree import tree_leaves
from zoo_models import build, forward

from lrpet_lightning import FactorizedLayer, decomposed_ranks
from lrpet_lightning.callback import LowRankProjectionCallback

pytest.importorskip("timm")
pytest.importorskip("transformers")

from test_zoo import (
    check_one_summary,
    matrices_as_forward_sees,
    max_rank,
    weight_layers,
)

RATIO = 0.25


class Wrapper(L.LightningModule):
    """Any model, trained to shrink its first floating output (a loss every model has)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        zoo = build(name)
        self.model, self.make_inputs = zoo.model.train(), zoo.make_inputs

    def _loss(self, seed: int) -> torch.Tensor:
        output = forward(self.model, self.make_inputs(int(seed)))
        if hasattr(output, "to_tuple"):
            output = output.to_tuple()
        first = next(t for t in tree_leaves(output) if torch.is_tensor(t) and t.is_floating_point())
        return first.square().mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._loss(batch[0])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch[0]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def _seeds(self) -> Any:
        return torch.utils.data.DataLoader(list(range(3)), batch_size=1)

    train_dataloader = test_dataloader = _seeds


@pytest.mark.parametrize(("name", "include_linear"), [
    ("timm_mobilenetv3_small", False), ("tv_vit", True), ("hf_gpt2", True)])
def test_fit_ends_rank_r_and_decomposed(name: str, include_linear: bool) -> None:
    module = Wrapper(name)
    callback = LowRankProjectionCallback(rank_ratio=RATIO, include_linear=include_linear,
                                         decompose_on_fit_end=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    messages = [str(w.message) for w in caught]
    ranks = decomposed_ranks(module)
    assert ranks and ranks == {n: r for n, r in callback.state_dict()["ranks"].items()
                               if n in ranks}
    for layer_name in ranks:
        assert isinstance(module.get_submodule(layer_name), FactorizedLayer)
    # Exactly rank r: every layer of the final projection is a thin pair at its rank, or
    # dense with rank <= r as its forward sees the weight.
    records = {r.name: r for r in callback.last_records if r.skipped is None}
    assert records, "the final projection projected nothing"
    modules = dict(module.named_modules())
    unknown = [n for n in records if n not in modules]
    assert not unknown, f"records name no module of the LightningModule: {unknown[:4]}"
    inputs = module.make_inputs(0)
    module.eval()
    dense = {n: modules[n] for n, r in records.items()
             if not isinstance(modules[n], FactorizedLayer)}
    seen = matrices_as_forward_sees(module.model, inputs, {
        n: m for n, m in module.model.named_modules() if m in dense.values()})
    wrong = []
    for n, rec in records.items():
        m = modules[n]
        if isinstance(m, FactorizedLayer):
            if m.rank != rec.rank:
                wrong.append(f"{n}: thin pair rank {m.rank}, projected at {rec.rank}")
            continue
        inner = next(k for k, v in module.model.named_modules() if v is m)
        rank = max_rank(seen[inner])
        if rank is None or rank > rec.rank:
            wrong.append(f"{n}: left dense with rank {rank} > {rec.rank}")
    assert not wrong, "not exactly rank r after fit: " + "; ".join(wrong[:6])
    # Every weight matrix is decomposed/rank r, or named in one warning of the fit.
    thin = [n for n, m in module.named_modules() if isinstance(m, FactorizedLayer)]
    needed = [f"model.{n}" for n in weight_layers(module.model, include_linear)
              if f"model.{n}" not in records
              and not any(f"model.{n}".startswith(t + ".") for t in thin)]
    problems = check_one_summary(needed, messages, "LowRankProjectionCallback")
    assert not problems, "\n".join(problems)
    # One name per layer: the report's rows, the records, the checkpointed ranks and the
    # decomposed modules use the same names.
    assert callback.compression is not None and callback.compression.flops_reduction > 0
    reported = {row.name for row in callback.compression.layers if row.rank is not None}
    assert reported == set(ranks), (
        f"the report names the decomposed layers otherwise than the model: "
        f"{sorted(reported)[:3]} vs {sorted(ranks)[:3]}")
    (result,) = trainer.test(module, verbose=False)
    assert torch.isfinite(torch.tensor(result["test_loss"]))


def test_bn_recalibration_on_timm_batchnorm_act_layers() -> None:
    # timm's BatchNormAct2d (a BatchNorm2d subclass that also applies the activation) runs
    # its own forward: after the fit every norm holds the average of the last 2 training
    # batches (the final projection's recalibration), and outputs stay finite.
    from torch.nn.modules.batchnorm import _BatchNorm

    module = Wrapper("timm_mobilenetv3_small")
    callback = LowRankProjectionCallback(rank_ratio=RATIO, bn_recalibration=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(module)
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    assert any(type(m).__name__ == "BatchNormAct2d" for m in norms)
    assert {int(m.num_batches_tracked) for m in norms} == {2}
    assert all(torch.isfinite(m.running_var).all() and (m.running_var >= 0).all() for m in norms)
    (result,) = trainer.test(module, verbose=False)
    assert torch.isfinite(torch.tensor(result["test_loss"]))
