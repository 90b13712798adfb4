"""MONAI's ViT, restructured so that Opacus computes correct per-sample gradients.

MONAI's :class:`monai.networks.nets.ViT` cannot be trained with DP-SGD as shipped:

* the class token is a parameter of the ViT module itself, whose ``forward`` returns a tuple
  ``(logits, hidden_states)``; Opacus then falls back to ``functorch`` for that whole module and
  fails (it multiplies the tuple by the backprops);
* every :class:`~monai.networks.blocks.TransformerBlock` owns a ``norm_cross_attn`` LayerNorm that
  is never used without cross-attention; its parameters never receive a gradient, so Opacus has
  no per-sample gradient for them and the DP optimizer refuses to step;
* the learnable position embedding sits on :class:`~monai.networks.blocks.PatchEmbeddingBlock`
  next to the patch convolution; the functorch fallback re-runs that block per sample, which
  breaks (or silently differs) as soon as its dropout is active.

:class:`DPViT` is the same network, built from the same MONAI blocks with the same initialisation,
with three changes: the class token and the position embedding live in two tiny modules with exact
per-sample gradient rules registered with Opacus (:func:`opacus.grad_sample.register_grad_sampler`),
and the unused cross-attention norms are removed. Its output is MONAI's ``(logits, hidden_states)``.
medflower's zoo builds it for ``model.name: vit`` with or without DP, so that the coordinator and
every site hold the same architecture and state-dict keys. :func:`convert_monai_vit_state_dict`
maps a MONAI ViT checkpoint onto it. Nothing like it exists in MONAI or Opacus.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from medflower._preload import require_monai

require_monai()  # MONAI once, under the lock (medflower._preload), before its blocks are imported
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock  # noqa: E402

__all__ = ["AddPositionEmbedding", "ClassToken", "DPViT", "convert_monai_vit_state_dict"]


class ClassToken(nn.Module):
    """Prepends a learnable token to a ``(batch, tokens, hidden)`` sequence."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.weight.expand(x.shape[0], -1, -1), x), dim=1)


class AddPositionEmbedding(nn.Module):
    """Adds a ``(1, tokens, hidden)`` position embedding (learnable, or fixed when not trainable)."""

    def __init__(self, weight: torch.Tensor, *, trainable: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


@register_grad_sampler(ClassToken)
def _class_token_grad_sample(
    layer: ClassToken, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    # d loss_i / d token = gradient at output position 0 of sample i
    return {layer.weight: backprops[:, :1, :].unsqueeze(1).clone()} if layer.weight.requires_grad else {}


@register_grad_sampler(AddPositionEmbedding)
def _position_grad_sample(
    layer: AddPositionEmbedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    # y = x + w  =>  d loss_i / d w = d loss_i / d y_i
    return {layer.weight: backprops.unsqueeze(1).clone()} if layer.weight.requires_grad else {}


class _PatchEmbedding(nn.Module):
    """MONAI's patch embedding (its own convolution/linear projection), then the position module."""

    def __init__(self, block: PatchEmbeddingBlock) -> None:
        super().__init__()
        self.patch_embeddings = block.patch_embeddings
        self.proj_type = block.proj_type
        pos = block.position_embeddings
        self.position_embeddings = AddPositionEmbedding(pos.data, trainable=pos.requires_grad)
        self.dropout = block.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embeddings(x)
        if self.proj_type == "conv":
            x = x.flatten(2).transpose(-1, -2)
        return self.dropout(self.position_embeddings(x))


class DPViT(nn.Module):
    """MONAI's ViT (same arguments, blocks and initialisation), trainable with Opacus DP-SGD."""

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        proj_type: str = "conv",
        pos_embed_type: str = "learnable",
        classification: bool = False,
        num_classes: int = 2,
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        post_activation: str | None = "Tanh",
        qkv_bias: bool = False,
        save_attn: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= dropout_rate <= 1:
            raise ValueError("dropout_rate should be between 0 and 1.")
        if hidden_size % num_heads != 0:
            raise ValueError("hidden_size should be divisible by num_heads.")
        self.classification = classification
        self.patch_embedding = _PatchEmbedding(
            PatchEmbeddingBlock(
                in_channels=in_channels,
                img_size=img_size,
                patch_size=patch_size,
                hidden_size=hidden_size,
                num_heads=num_heads,
                proj_type=proj_type,
                pos_embed_type=pos_embed_type,
                dropout_rate=dropout_rate,
                spatial_dims=spatial_dims,
            )
        )
        self.blocks = nn.ModuleList()
        for _ in range(num_layers):
            blk = TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias, save_attn)
            # never used without cross-attention (see module doc); MONAI declares it a LayerNorm, so
            # the child is replaced through the Module API rather than by attribute assignment
            blk.register_module("norm_cross_attn", nn.Identity())
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(hidden_size)
        if classification:
            self.cls_token = ClassToken(hidden_size)
            head = nn.Linear(hidden_size, num_classes)
            self.classification_head = nn.Sequential(head, nn.Tanh()) if post_activation == "Tanh" else head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embedding(x)
        if self.classification:
            x = self.cls_token(x)
        hidden_states_out = []
        for blk in self.blocks:
            x = blk(x)
            hidden_states_out.append(x)
        x = self.norm(x)
        if self.classification:
            x = self.classification_head(x[:, 0])
        return x, hidden_states_out


def convert_monai_vit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a :class:`monai.networks.nets.ViT` state dict onto :class:`DPViT`'s keys."""
    out = {}
    for key, value in state.items():
        if ".norm_cross_attn." in key or ".cross_attn." in key:
            continue
        if key == "cls_token":
            key = "cls_token.weight"
        elif key == "patch_embedding.position_embeddings":
            key = "patch_embedding.position_embeddings.weight"
        out[key] = value
    return out
