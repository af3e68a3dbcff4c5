"""Short Lightning fits with the callback on models nobody here wrote (a timm CNN, a
torchvision ViT with Linears, a Hugging Face text model): each ends exactly rank r,
decomposed, and ``trainer.test`` runs on the compact model."""
from __future__ import annotations

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
    ("timm_resnet18", False), ("tv_vit", True), ("hf_bert", True)])
def test_fit_ends_rank_r_and_decomposed(name: str, include_linear: bool) -> None:
    module = Wrapper(name)
    callback = LowRankProjectionCallback(rank_ratio=0.25, include_linear=include_linear,
                                         decompose_on_fit_end=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(module)
    ranks = decomposed_ranks(module)
    assert ranks and ranks == {n: r for n, r in callback.state_dict()["ranks"].items()
                               if n in ranks}
    for layer_name in ranks:
        assert isinstance(module.get_submodule(layer_name), FactorizedLayer)
    assert callback.compression is not None and callback.compression.flops_reduction > 0
    (result,) = trainer.test(module, verbose=False)
    assert torch.isfinite(torch.tensor(result["test_loss"]))
