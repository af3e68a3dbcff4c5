"""The model zoo of ``test_zoo.py``: models a user might bring, built from configs with random
initialization and tiny sizes (nothing is downloaded), with one small example input each.

``build(name)`` is deterministic (seeded), so a second call builds the very same model: the
save/load round trip loads into such a "fresh" model. BatchNorm running statistics and
affine parameters are randomized so that folding and BN rectification are really tested
(a gamma that is initialized to zero, e.g. timm's zero-init last BN, stays zero).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ZOO", "ZooModel", "build", "forward", "randomize_batchnorms_"]


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    #: A tensor, a tuple of positional args or a dict of keyword args (as the core takes).
    inputs: Any
    #: Builds another input of the same shape and kind (a fresh draw), from a seed.
    make_inputs: Callable[[int], Any]


def forward(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` for a tensor, tuple of args or dict of kwargs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def randomize_batchnorms_(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not isinstance(m, _BatchNorm):
            continue
        n = m.num_features
        if m.running_mean is not None:
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        if m.affine:
            m.weight.mul_(0.5 + torch.rand(n, generator=g))  # zeros stay zero
            m.bias.copy_(0.1 * torch.randn(n, generator=g))


def _images(shape: tuple[int, ...]) -> Callable[[int], torch.Tensor]:
    return lambda seed: torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ids(batch: int, length: int, vocab: int, *keys: str) -> Callable[[int], Any]:
    def make(seed: int) -> Any:
        g = torch.Generator().manual_seed(seed)
        ids = {k: torch.randint(0, vocab, (batch, length), generator=g) for k in keys}
        return ids if len(keys) > 1 or keys[0] != "" else ids[""]
    return make


# ------------------------------------------------------------------------------------ timm
def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return make


def _timm_resnetv2_bit() -> nn.Module:
    """BiT-style ResNetV2 (weight-standardized ``StdConv2d``, GroupNormAct), tiny widths."""
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1, 1, 1], channels=(32, 64, 128, 256), num_classes=10,
                    stem_chs=16, stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8),
                    norm_layer=partial(GroupNormAct, num_groups=8))


# ---------------------------------------------------------------------------- transformers
def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2,
                                      n_head=2, use_cache=False, bos_token_id=0,
                                      eos_token_id=1))


def _hf_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        use_cache=False, tie_word_embeddings=True, decoder_start_token_id=0))


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=16))


def _hf_whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperModel

    return WhisperModel(WhisperConfig(
        vocab_size=100, num_mel_bins=8, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, d_model=32, max_source_positions=16, max_target_positions=16,
        use_cache=False, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1,
        eos_token_id=2))


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64))


def _hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        use_cache=False, bos_token_id=0, eos_token_id=1, pad_token_id=None))


# ----------------------------------------------------------------------------- torchvision
def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from torchvision import models

        return getattr(models, name)(weights=None, **kwargs)
    return make


def _tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                           window_size=[4, 4], num_classes=10)


def _tv_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=10)


def _tv_r3d() -> nn.Module:
    from torchvision.models.video.resnet import (
        BasicBlock,
        BasicStem,
        Conv3DSimple,
        VideoResNet,
    )

    return VideoResNet(BasicBlock, [Conv3DSimple] * 4, [1, 1, 1, 1], BasicStem, num_classes=10)


def _tv_lraspp() -> nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)


# ----------------------------------------------------------------------------- hand-written
class _ConvBNNet(nn.Module):
    """conv1 -> BN -> ReLU -> conv2 -> BN -> ReLU -> pool -> fc (the layers may be wrapped)."""

    def __init__(self, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        super().__init__()
        self.conv1, self.bn1 = wrap(nn.Conv2d(3, 16, 3, padding=1)), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = wrap(nn.Conv2d(16, 24, 3, padding=1)), nn.BatchNorm2d(24)
        self.fc = wrap(nn.Linear(24, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _hw_weight_norm() -> nn.Module:
    """conv1 and fc under ``parametrizations.weight_norm``; conv2 plain."""
    from torch.nn.utils.parametrizations import weight_norm

    net = _ConvBNNet()
    net.conv1, net.fc = weight_norm(net.conv1), weight_norm(net.fc)
    return net


def _hw_spectral_norm() -> nn.Module:
    """conv1 and fc under ``parametrizations.spectral_norm``; conv2 plain."""
    from torch.nn.utils.parametrizations import spectral_norm

    net = _ConvBNNet()
    net.conv1, net.fc = spectral_norm(net.conv1), spectral_norm(net.fc)
    return net


def _hw_legacy_weight_norm() -> nn.Module:
    """The legacy hooks: conv1 under ``torch.nn.utils.weight_norm``, fc under
    ``torch.nn.utils.spectral_norm``; conv2 plain."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated, which is the point
        net = _ConvBNNet()
        net.conv1 = torch.nn.utils.weight_norm(net.conv1)
        net.fc = torch.nn.utils.spectral_norm(net.fc)
    return net


class _SharedModule(nn.Module):
    """One conv registered under two names (``block`` and ``block_again``), run twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.block = nn.Conv2d(16, 16, 3, padding=1)
        self.block_again = self.block
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
        self.head_again = self.fc  # a shared Linear too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.block(x))
        x = F.relu(self.bn(self.block_again(x)))
        return self.head_again(x.mean((2, 3)))


class _TiedLM(nn.Module):
    """A toy language model whose output Linear shares its weight with the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.proj = nn.Linear(16, 32)
        self.lstm = nn.LSTM(32, 32, batch_first=True)
        self.gru = nn.GRU(32, 32, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = F.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        h, _ = self.lstm(self.proj(h))
        h, _ = self.gru(h)
        return self.fc(h[:, -1])


class _ConvTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down, self.bn1 = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.mid, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.up, self.bn3 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.down(x)))
        x = F.relu(self.bn2(self.mid(x)))
        x = F.relu(self.bn3(self.up(x)))
        return self.out(x)


class _Lazy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.LazyConv2d(16, 3, padding=1), nn.LazyBatchNorm2d()
        self.conv2, self.bn2 = nn.LazyConv2d(24, 3, padding=1), nn.LazyBatchNorm2d()
        self.fc = nn.LazyLinear(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _hw_lazy() -> nn.Module:
    net = _Lazy()
    with torch.no_grad():
        net(torch.zeros(1, 3, 16, 16))  # materialize the lazy parameters
    return net


class _Conv1dBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(4, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.conv2, self.bn2 = nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16)
        self.conv3 = nn.Conv1d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.relu(self.conv3(x)).mean(2))


class _ZeroGammaBN(nn.Module):
    """A residual block whose last BatchNorm has gamma = 0 (timm's zero-init last BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        nn.init.zeros_(self.bn2.weight)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def _hw_frozen() -> nn.Module:
    net = _ConvBNNet()
    net.conv1.requires_grad_(False)
    net.fc.weight.requires_grad_(False)
    return net


class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h = h + self.down(F.relu(self.up(h)))
        return self.fc(h.mean(1))


class _TransformerEncoder(nn.Module):
    """``nn.TransformerEncoder``: in eval mode without grad it takes the fused fast path,
    which reads the layers' weights directly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(self.embed(x)).mean(1))


# --------------------------------------------------------------------------------- the zoo
IMG = _images((2, 3, 32, 32))

#: name -> (builder, input maker)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Any]]] = {
    # timm
    "timm_resnet18": (_timm("resnet18"), IMG),  # zero-init last BN of each block
    "timm_efficientnet_b0": (_timm("efficientnet_b0"), IMG),  # BatchNormAct2d, depthwise, SE
    "timm_mobilenetv3_small": (_timm("mobilenetv3_small_100"), IMG),
    "timm_regnetx_002": (_timm("regnetx_002"), IMG),  # grouped convs
    "timm_densenet": (_timm("densenet121", growth_rate=8, block_config=(2, 2, 2, 2)), IMG),
    "timm_vit_tiny": (_timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), IMG),
    "timm_beit": (_timm("beit_base_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                        depth=2, num_heads=2), IMG),  # F.linear(x, self.qkv.weight)
    "timm_resnetv2_bit": (_timm_resnetv2_bit, IMG),  # StdConv2d
    "timm_convnext_atto": (_timm("convnext_atto"), IMG),
    # transformers
    "hf_gpt2": (_hf_gpt2, _ids(2, 8, 100, "input_ids")),  # Conv1D, tied lm_head
    "hf_t5": (_hf_t5, _ids(2, 8, 100, "input_ids", "decoder_input_ids")),  # tied lm_head
    "hf_bert": (_hf_bert, _ids(2, 8, 100, "input_ids")),
    "hf_whisper": (_hf_whisper, lambda seed: {
        "input_features": _images((2, 8, 32))(seed),
        "decoder_input_ids": _ids(2, 4, 100, "")(seed)}),  # reads conv1.stride
    "hf_vit": (_hf_vit, lambda seed: {"pixel_values": IMG(seed)}),
    "hf_llama": (_hf_llama, _ids(2, 8, 100, "input_ids")),
    # torchvision
    "tv_resnet18": (_tv("resnet18", num_classes=10), IMG),
    "tv_mobilenet_v2": (_tv("mobilenet_v2", num_classes=10), IMG),
    "tv_googlenet": (_tv("googlenet", num_classes=10, aux_logits=False, init_weights=True),
                     IMG),  # inception-style
    "tv_swin": (_tv_swin, IMG),  # shifted_window_attention(x, qkv.weight, proj.weight)
    "tv_vit": (_tv_vit, IMG),  # nn.MultiheadAttention
    "tv_r3d": (_tv_r3d, _images((1, 3, 4, 32, 32))),  # Conv3DSimple (a Conv3d subclass)
    "tv_lraspp": (_tv_lraspp, IMG),  # segmentation, dict output
    # hand-written
    "hw_weight_norm": (_hw_weight_norm, IMG),
    "hw_spectral_norm": (_hw_spectral_norm, IMG),
    "hw_legacy_weight_norm": (_hw_legacy_weight_norm, IMG),
    "hw_shared_module": (_SharedModule, IMG),
    "hw_tied_embedding": (_TiedLM, _ids(2, 8, 100, "")),
    "hw_recurrent": (_Recurrent, _ids(2, 8, 100, "")),
    "hw_conv_transpose": (_ConvTranspose, IMG),
    "hw_lazy": (_hw_lazy, IMG),
    "hw_conv1d_bn1d": (_Conv1dBN, _images((2, 4, 32))),
    "hw_zero_gamma_bn": (_ZeroGammaBN, IMG),
    "hw_frozen": (_hw_frozen, IMG),
    "hw_mha": (_MHA, _images((2, 8, 16))),
    "hw_transformer_encoder": (_TransformerEncoder, _images((2, 8, 16))),
}


def build(name: str) -> ZooModel:
    """The zoo model ``name``, seeded (the same weights on every call), in eval mode."""
    builder, make_inputs = ZOO[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = builder()
    randomize_batchnorms_(model)
    model.eval()
    return ZooModel(name, model, make_inputs(0), make_inputs)
