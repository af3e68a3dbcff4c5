"""Baselines at the same ranks and epochs as LRPET (``variant=...``): thin_init,
dense_finetune and dense, through the app and on a tiny model."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import TINY_RUN, Tiny, compose, make_trainer

from lrpet_lightning.app.train import train
from lrpet_lightning.app.variants import DecomposeAt, check_variant, decompose_thin_
from lrpet_lightning.core.transforms import decomposed_ranks

SETTINGS = dict(rank_ratio=0.25, ranks=None, energy_transfer=True, residual_scale=0.0,
                bn_rectification=True, include_linear=False, include=None, exclude=None,
                min_rank=1, svd_method="gram", target_flops_reduction=None,
                target_params_reduction=None, allocation="uniform")


def _run(tmp_path, *overrides: str) -> dict:
    return train(compose(f"output_dir={tmp_path}", *TINY_RUN, *overrides))


def test_every_variant_at_the_same_ranks(tmp_path) -> None:
    found = {v: _run(tmp_path / v, "trainer.max_epochs=3", f"variant={v}")
             for v in ("lrpet", "lrpet_thin", "thin_init", "dense_finetune", "dense")}
    assert {v: r["variant"] for v, r in found.items()} == {v: v for v in found}
    lrpet = found["lrpet"]
    thin = found["lrpet_thin"]  # projected after epochs 0 and 1, thin in epoch 2
    assert thin["lrpet"] is True and thin["num_projections"] == 2 and thin["errors"] == []
    assert thin["flops_reduction"] == pytest.approx(lrpet["flops_reduction"])
    for name in ("thin_init", "dense_finetune"):
        results = found[name]
        assert results["status"] == "finished" and results["errors"] == []
        # the same ranks, so the same measured FLOPs and parameters
        assert results["flops_reduction"] == pytest.approx(lrpet["flops_reduction"])
        assert results["params_reduction"] == pytest.approx(lrpet["params_reduction"])
        assert results["rank_ratio"] == 0.4 and results["lrpet"] is False
        assert results["num_projections"] is None and results["test_acc"] is not None
        saved = torch.load(results["compact_model"], weights_only=False)
        assert saved  # the thin model is saved like LRPET's
    assert found["dense"]["flops_reduction"] == 0.0 and found["dense"]["rank_ratio"] is None
    on_disk = json.loads((tmp_path / "thin_init" / "results.json").read_text())
    assert on_disk["variant"] == "thin_init"


def test_thin_init_trains_the_thin_model_from_the_first_step(tmp_path) -> None:
    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["ranks"] = decomposed_ranks(pl_module.model)

    from lrpet_lightning.app import build as build_mod

    run = build_mod.build(compose(f"output_dir={tmp_path}", *TINY_RUN, "variant=thin_init"))
    run.trainer.callbacks.append(Spy())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert seen["ranks"] and all(r >= 1 for r in seen["ranks"].values())
    assert run.rank_source is not None and run.lrpet is None  # no projections


def _lrs(trainer: L.Trainer) -> float:
    return trainer.optimizers[0].param_groups[0]["lr"]


def test_dense_finetune_decomposes_at_its_epoch_and_keeps_the_schedule() -> None:
    torch.manual_seed(0)
    module = Tiny(scheduler=True)
    lrs: list[tuple[int, float, bool]] = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append((trainer.current_epoch, _lrs(trainer), bool(decomposed_ranks(module.net))))

    decompose = DecomposeAt(module.net, 2, lambda _: decompose_thin_(
        module.net, SETTINGS, torch.zeros(2, 3, 8, 8), truncate_only=True))
    trainer = make_trainer([decompose, Record()], max_epochs=4)
    trainer.fit(module)
    # StepLR(1, 0.5): lr 0.1 * 0.5**epoch, carried on over the rebuilt optimizer
    assert [(e, pytest.approx(0.1 * 0.5 ** e), e >= 2) for e in range(4)] == lrs
    thin = set(map(id, module.parameters()))
    assert {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]} == thin
    assert set(decomposed_ranks(module.net).values()) == {4}


def test_dense_finetune_resumes_from_a_thin_checkpoint(tmp_path) -> None:
    first = _run(tmp_path, "trainer.max_epochs=3", "variant=dense_finetune",
                 "variant.finetune_epochs=2")
    assert first["status"] == "finished"
    again = _run(tmp_path, "trainer.max_epochs=4", "variant=dense_finetune",
                 "variant.finetune_epochs=3", "ckpt_path=last")
    assert again["status"] == "finished" and again["epochs"] == 4
    assert again["flops_reduction"] == pytest.approx(first["flops_reduction"])


@pytest.mark.parametrize(("overrides", "error", "match"), [
    (("variant.name=pruned",), ValueError, "variant.name must be one of"),
    (("variant=dense_finetune", "variant.finetune_epochs=3"), ValueError,
     "variant.finetune_epochs must be"),
    (("variant=dense_finetune", "variant.finetune_epochs=one"), TypeError,
     "variant.finetune_epochs must be"),
    (("variant=thin_init", "callbacks.lrpet=null"), ValueError, "callbacks.lrpet, which is null"),
    (("variant=thin_init", "callbacks.lrpet.rank_ratio=null",
      "callbacks.lrpet.target_flops_reduction=0.5", "callbacks.lrpet.allocation=spectrum"),
     ValueError, "allocation must be uniform"),
])
def test_bad_variant_is_refused(overrides, error, match) -> None:
    with pytest.raises(error, match=match):
        check_variant(compose("trainer.max_epochs=3", *overrides), world_size=1)


def test_lrpet_without_the_callback_is_called_dense() -> None:
    # callbacks.lrpet=null trains a dense model: results.json must not say variant lrpet.
    assert check_variant(compose("callbacks.lrpet=null"), world_size=1) == ("dense", None)
    assert check_variant(compose(), world_size=1) == ("lrpet", None)


@pytest.mark.parametrize("variant", ["dense_finetune", "lrpet_thin"])
def test_a_mid_fit_decomposition_refuses_several_processes(variant: str) -> None:
    with pytest.raises(ValueError, match="one process"):
        check_variant(compose(f"variant={variant}"), world_size=2)


def test_lrpet_thin_is_exact_at_the_switch_and_resumes(tmp_path, recwarn) -> None:
    first = _run(tmp_path, "trainer.max_epochs=3", "variant=lrpet_thin",
                 "variant.finetune_epochs=1")
    assert first["status"] == "finished" and first["num_projections"] == 2
    assert not [w for w in recwarn if "not rank r" in str(w.message)]  # exact decomposition
    again = _run(tmp_path, "trainer.max_epochs=4", "variant=lrpet_thin",
                 "variant.finetune_epochs=2", "ckpt_path=last")
    assert again["status"] == "finished" and again["epochs"] == 4
    assert again["flops_reduction"] == pytest.approx(first["flops_reduction"])


def _fake_run(root, name: str, overrides: list[str], **results) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "results.json").write_text(json.dumps({"status": "finished", **results}))


def test_summarize_gives_mean_and_std_over_seeds_and_plots_the_baselines(tmp_path) -> None:
    from lrpet_lightning.app.summarize import load_runs, summarize

    accs = {("lrpet", 0): 0.90, ("lrpet", 1): 0.94, ("thin_init", 0): 0.80,
            ("thin_init", 1): 0.86, ("dense", 0): 0.97, ("dense", 1): 0.99}
    for i, ((variant, seed), acc) in enumerate(accs.items()):
        reduction = 0.0 if variant == "dense" else 0.6
        _fake_run(tmp_path, str(i), [f"variant={variant}", f"seed={seed}"], variant=variant,
                  lrpet=variant == "lrpet", test_acc=acc, val_acc=acc,
                  flops_reduction=reduction, params_reduction=reduction)
    table = summarize(tmp_path)
    assert "| lrpet | 2 | 92.00 ± 2.83 % |" in table
    assert "| thin_init | 2 | 83.00 ± 4.24 % |" in table
    assert "| dense | 2 | 98.00 ± 1.41 % |" in table
    compressed = {run.results["variant"] for run in load_runs(tmp_path) if run.compressed}
    assert compressed == {"lrpet", "thin_init"}  # dense: a line of the plot, not a point
