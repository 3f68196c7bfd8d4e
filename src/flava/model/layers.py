"""The transformer block shared by the three encoders (pre-norm; post-norm for BERT-family text towers)."""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import Activation as ActivationName
from ..config import TransformerConfig
from ..syncs import is_sync_free


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
}
assert set(ACTIVATIONS) == set(typing.get_args(ActivationName)), "config.Activation and ACTIVATIONS disagree"


# In-place versions save a large allocation per MLP when no gradient needs the input.
_INPLACE = {
    "gelu": lambda x: torch.ops.aten.gelu_(x),
    "gelu_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "relu": lambda x: x.relu_(),
    "silu": lambda x: F.silu(x, inplace=True),
}


class Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = ACTIVATIONS[name]
        self.fn_ = _INPLACE.get(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn_ is not None and not (torch.is_grad_enabled() and x.requires_grad):
            return self.fn_(x)
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x's rows at `index`, which may repeat a row (a swapped caption, an image several questions
    ask about): the backward sums the repeats' gradients. On the CPU index_select's backward sums
    them in order; indexing's adds them atomically across threads, so its bits changed from run to
    run under load (the demo's joint stage drifted). On CUDA indexing's backward is the one that sorts."""
    return x.index_select(0, index) if x.device.type == "cpu" else x[index]


@dataclass
class Packing:
    """Where the real (unpadded) tokens of a [B, L] batch sit, to run linear layers on them only."""

    index: torch.Tensor
    """[T] flat positions of real tokens in B * L."""
    batch: int
    length: int
    mask: torch.Tensor
    """[B, 1, 1, L] boolean SDPA keep-mask."""

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, size: int | None = None) -> "Packing":
        """`size`: the number of real tokens, when the host knows it (then nothing is read back)."""
        keep = attention_mask.to(torch.bool)
        B, L = keep.shape
        index = keep.flatten().nonzero() if size is None else torch.nonzero_static(keep.flatten(), size=size)
        return cls(index.squeeze(1), B, L, keep[:, None, None, :])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(self.batch * self.length, x.shape[-1])
        return full.index_copy_(0, self.index, x).view(self.batch, self.length, -1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        num_queries: int | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """x [B, N, C] -> [B, num_queries or N, C]; with `packing`, x and the result are [T, C]."""
        qkv = self.qkv(x)
        if packing is not None:
            qkv, attn_mask = packing.unpack(qkv), packing.mask
        B, N, C3 = qkv.shape
        C = C3 // 3
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if num_queries is not None:
            q = q[:, :, :num_queries]
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, -1, C)
        if packing is not None:
            x = packing.pack(x)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = Activation(activation)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(LN(x)), then x + mlp(LN(x)); with `layer_scale`, each branch is scaled by
    learned per-channel factors `ls1`, `ls2` (DINOv2's LayerScale). Post-norm
    (`norm_placement='post'`, BERT's): LN(x + attn(x)), then LN(x + mlp(x)), with norm1 and norm2
    in those places."""

    def __init__(self, cfg: TransformerConfig, layer_scale: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.post_norm = cfg.norm_placement == "post"
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.attention_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(d, cfg.mlp_size, cfg.activation, cfg.dropout)
        self.ls1 = nn.Parameter(torch.ones(d)) if layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(d)) if layer_scale else None

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        num_queries: int | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """`num_queries` updates only the first tokens (all still serve as keys and values)."""
        if self.post_norm:
            a = self.attn(x, attn_mask, num_queries, packing)
            x = self.norm1((x if num_queries is None else x[:, :num_queries]) + a)
            return self.norm2(x + self.mlp(x))
        a = self.attn(self.norm1(x), attn_mask, num_queries, packing)
        if self.ls1 is not None:
            a = a * self.ls1
        x = (x if num_queries is None else x[:, :num_queries]) + a
        m = self.mlp(self.norm2(x))
        return x + (m if self.ls2 is None else m * self.ls2)


class Transformer(nn.Module):
    """A stack of blocks; optionally keeps every block's input (and the final output)."""

    def __init__(self, cfg: TransformerConfig, layer_scale: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, layer_scale) for _ in range(cfg.num_layers))
        self.grad_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        keep_all: bool = False,
        cls_only: bool = False,
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """`cls_only`: the last block updates only token 0, whose state is all that is returned.
        `packing`: the blocks run their linear layers on real tokens only; the result is back in
        the padded layout with zeros at padding (with `cls_only`, token 0 of every row must be
        real)."""
        states = [x] if keep_all else None
        n = len(self.blocks)
        if packing is not None and n > 0 and not keep_all:
            x = packing.pack(x)
        else:
            packing = None
        for i, block in enumerate(self.blocks):
            last = i == n - 1
            if cls_only and last and packing is not None:
                x, packing = packing.unpack(x), None
            queries = 1 if cls_only and last else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, queries, packing, use_reentrant=False)
            else:
                x = block(x, attn_mask, queries, packing)
            if states is not None:
                states.append(x)
        if packing is not None:
            x = packing.unpack(x)
        if cls_only and n == 0:
            x = x[:, :1]
        return x, (tuple(states) if states is not None else None)


class Pooler(nn.Module):
    """tanh(W · h_CLS + b): kept for checkpoint compatibility and classification heads."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


def padding_mask(attention_mask: torch.Tensor | None, dtype_device: torch.Tensor) -> torch.Tensor | None:
    """[B, L] 1/0 keep-mask -> boolean [B, 1, 1, L] SDPA mask, or None when nothing is padded
    (under `sync_free()`, which cannot look, always the mask)."""
    if attention_mask is None:
        return None
    keep = attention_mask.to(device=dtype_device.device, dtype=torch.bool)
    if not is_sync_free() and bool(keep.all()):
        return None
    return keep[:, None, None, :]
