"""Compact checkpoints: thin-layer weights plus the ranks that rebuild them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lrpet_lightning import decompose_, decomposed_ranks, load_compact, project_low_rank_
from lrpet_lightning.core.checkpoint import read_compact, save_compact
from lrpet_lightning.models import build_model


def _compact_resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet20")
    project_low_rank_(model, rank_ratio=0.3, example_inputs=torch.randn(2, 3, 32, 32))
    decompose_(model, rank_ratio=0.3)
    return model.eval()


def test_round_trip_rebuilds_thin_layers_and_outputs(tmp_path: Path) -> None:
    model = _compact_resnet20()
    path = save_compact(model, tmp_path / "m.pt", arch="resnet20")
    fresh = load_compact(build_model("resnet20"), path).eval()
    assert decomposed_ranks(fresh) == decomposed_ranks(model)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x))
    assert read_compact(path)["metadata"] == {"arch": "resnet20"}


def test_reload_is_silent(tmp_path: Path) -> None:
    # Rebuilding from the file's shapes: no "not rank r" warning about the fresh random weights.
    model = _compact_resnet20()
    path = save_compact(model, tmp_path / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = load_compact(build_model("resnet20"), path)
    assert decomposed_ranks(fresh) == decomposed_ranks(model)


def test_file_loads_with_weights_only(tmp_path: Path) -> None:
    path = save_compact(_compact_resnet20(), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)  # no pickled code needed
    assert payload["format"] == "lrpet-compact-v1"
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed into place


def test_dense_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decompose_"):
        save_compact(build_model("resnet20"), tmp_path / "m.pt")


def test_other_architecture_names_the_layer(tmp_path: Path) -> None:
    path = save_compact(_compact_resnet20(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="layer3.*same architecture|same architecture"):
        load_compact(build_model("vgg16_bn"), path)


def test_same_names_other_shapes_name_the_key(tmp_path: Path) -> None:
    path = save_compact(_compact_resnet20(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"linear\.weight.*expects"):
        load_compact(build_model("resnet20", num_classes=100), path)


def test_not_a_compact_file(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not an lrpet_lightning compact model"):
        load_compact(build_model("resnet20"), path)


def test_match_architecture_rebuilds_a_dense_model_for_a_decomposed_state_dict() -> None:
    from lrpet_lightning import match_architecture_

    model = _compact_resnet20()
    dense = build_model("resnet20")
    with pytest.raises(RuntimeError, match="Missing key"):
        dense.load_state_dict(model.state_dict())
    ranks = match_architecture_(dense, model.state_dict())
    assert ranks == decomposed_ranks(model)
    dense.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dense.eval()(x), model(x))


def test_a_dense_state_dict_loads_into_thin_pairs_exactly_when_rank_r_else_warns() -> None:
    """A dense checkpoint (ModelCheckpoint's "best" from before decomposition) loads into a
    decomposed model by splitting each weight: exact when it is rank r; otherwise the load
    truncates it and says so, naming the weight."""
    torch.manual_seed(0)
    projected = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    project_low_rank_(projected, rank_ratio=0.25, bn_rectification=False)
    thin = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    decompose_(thin, ranks={"0": 4, "2": 4})
    x = torch.randn(2, 8, 9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thin.load_state_dict(projected.state_dict())
    torch.testing.assert_close(thin(x), projected(x), rtol=1e-4, atol=1e-5)
    unprojected = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    with pytest.warns(RuntimeWarning, match=r"'0\.weight' loaded into a thin pair of rank 4 "
                      "is not rank 4"):
        thin.load_state_dict(unprojected.state_dict())


def test_a_dense_hf_conv1d_state_dict_loads_into_its_thin_pair_untransposed() -> None:
    """A Hugging Face Conv1D stores its weight as (in, out); square, nothing in the shape
    says so: its thin pair must remember."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(12, 12))
    project_low_rank_(model, rank_ratio=0.25, include_linear=True)
    dense = model.state_dict()
    x = torch.randn(3, 12)
    y = model(x)
    decompose_(model, rank_ratio=0.25, include_linear=True)
    with torch.no_grad():
        model[0].first.weight.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(dense)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_no_unsafe_torch_load_in_the_package() -> None:
    import re

    package = Path(__file__).resolve().parent.parent / "lrpet_lightning"
    for path in package.rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_unreadable_files_are_named_with_what_is_wrong(tmp_path: Path) -> None:
    from lrpet_lightning.app.train import load_compact_model

    good = save_compact(_compact_resnet20(), tmp_path / "m.pt", arch="resnet20")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt' is empty \(0 bytes\)"):
        load_compact_model(empty)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut\.pt' \(1000 bytes\) cannot be read: truncated"):
        read_compact(truncated)
    with pytest.raises(FileNotFoundError, match="nowhere.pt' does not exist"):
        read_compact(tmp_path / "nowhere.pt")
    bare = save_compact(_compact_resnet20(), tmp_path / "bare.pt")  # no metadata at all
    with pytest.raises(ValueError, match=r"bare\.pt' has no arch, num_classes, in_channels, "
                                         r"small_input in its metadata"):
        load_compact_model(bare)
    with pytest.raises(ValueError, match=r"m\.pt' has no num_classes"):
        load_compact_model(good)  # arch alone is not enough to rebuild it


def test_optimizers_match_tells_a_decomposed_model_from_its_dense_optimizer() -> None:
    from lrpet_lightning.core.checkpoint import optimizers_match

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert optimizers_match(model, [optimizer]) and optimizers_match(model, [])
    decompose_(model, rank_ratio=0.25)
    assert not optimizers_match(model, [optimizer])


class _Versioned(nn.Module):
    """A module that refuses a state dict without its version (as torchvision's MNASNet)."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_compact_round_trip_keeps_module_versions(tmp_path) -> None:
    model = _Versioned()
    decompose_(model, rank_ratio=0.25)
    save_compact(model, tmp_path / "c.pt")
    loaded = load_compact(_Versioned(), tmp_path / "c.pt")
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(loaded(x), model(x))


def test_a_rank_the_layer_cannot_have_names_the_layer() -> None:
    from lrpet_lightning.core import match_architecture_

    state = {"0.first.weight": torch.zeros(8, 96, 1, 1), "0.second.weight": torch.zeros(4, 8, 1, 1),
             "0.second.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"holds '0' as a thin pair of rank 8, which this "
                                         r"Conv2d cannot have"):
        match_architecture_(nn.Sequential(nn.Conv2d(96, 4, 1)), state)
