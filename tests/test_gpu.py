"""GPU checks (skipped without CUDA): the callback under fp16 AMP, projection on the device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrpet_lightning import project_low_rank_
from lrpet_lightning.models import build_model

pytestmark = pytest.mark.gpu


def test_projection_runs_on_the_parameters_device() -> None:
    model = build_model("resnet20").cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    records = project_low_rank_(model, rank_ratio=0.25, example_inputs=x)
    assert all(r.skipped is None for r in records)
    w = model.layer1[0].conv1.weight
    assert w.is_cuda and int(torch.linalg.matrix_rank(w.flatten(1), rtol=1e-5)) == 4


def test_callback_under_fp16_amp() -> None:
    import lightning as L
    from test_callback import RANK, Tiny, conv_ranks

    from lrpet_lightning import LowRankProjectionCallback

    model = Tiny()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision="16-mixed", max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[LowRankProjectionCallback(rank_ratio=0.25, report=False)],
    )
    trainer.fit(model)
    assert set(conv_ranks(model).values()) == {RANK}


@pytest.mark.parametrize(("svd_method", "tolerance"), [("gram", 1e-5), ("gram32", 1e-3),
                                                       ("exact", 1e-3)])
def test_cuda_projection_matches_the_float64_cpu_projection(svd_method: str,
                                                            tolerance: float) -> None:
    """The same projection on the GPU as on the CPU in float64: "gram" to float32 round-off
    (it solves in float64 on the GPU too); the float32 solvers (cuSOLVER) to ~1e-4 at random
    init, where the spectrum has no gap at the cut."""
    import copy

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x = torch.randn(4, 3, 32, 32)
    cpu = copy.deepcopy(model).double()
    project_low_rank_(cpu, rank_ratio=0.25, example_inputs=x.double(), svd_method="exact")
    gpu = model.cuda()
    project_low_rank_(gpu, rank_ratio=0.25, example_inputs=x.cuda(), svd_method=svd_method)
    convs = [(n, m.weight.detach()) for n, m in cpu.named_modules() if isinstance(m, nn.Conv2d)]
    gpu_convs = [m.weight.detach() for m in gpu.modules() if isinstance(m, nn.Conv2d)]
    for (name, w_cpu), w_gpu in zip(convs, gpu_convs, strict=True):
        err = float((w_gpu.double().cpu() - w_cpu).norm() / w_cpu.norm())
        assert err < tolerance, (name, err)


def test_prepare_for_inference_on_cuda_keeps_the_outputs() -> None:
    from lrpet_lightning import decompose_
    from lrpet_lightning.core.inference import prepare_for_inference

    torch.manual_seed(0)
    model = build_model("resnet20").eval().cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    project_low_rank_(model, rank_ratio=0.25, example_inputs=x)
    decompose_(model)
    prepared = prepare_for_inference(model, x, repeats=3)
    with torch.no_grad():
        ref, out = model(x), prepared(x)
    # cuDNN may use TF32 for convolutions: compare at its precision.
    assert float((out - ref).norm() / ref.norm()) < 1e-2


def test_cuda_gram_projection_is_exact_under_tf32() -> None:
    """torch.set_float32_matmul_precision("high") (Lightning suggests it on tensor-core GPUs)
    lets float32 products run in TF32; the default "gram" mode then works in float64."""
    from lrpet_lightning.core.linalg import project_matrix

    torch.manual_seed(0)
    M = torch.randn(256, 2304) / 48
    truth = project_matrix(M.double(), 97, svd_method="exact").matrix
    torch.set_float32_matmul_precision("high")
    try:
        out = project_matrix(M.cuda(), 97, svd_method="gram").matrix.double().cpu()
    finally:
        torch.set_float32_matmul_precision("highest")
    assert float((out - truth).norm() / truth.norm()) < 1e-6
