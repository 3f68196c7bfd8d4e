"""Analytic forward FLOPs (2 per multiply-add) for throughput as a fraction of machine peak."""

from __future__ import annotations

from ..config import FlavaConfig, TransformerConfig


def transformer_flops(cfg: TransformerConfig, tokens: int) -> float:
    """One sequence through `cfg.num_layers` blocks: projections, attention and MLP matmuls."""
    d, m, n = cfg.hidden_size, cfg.mlp_size, tokens
    per_layer = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m
    return float(cfg.num_layers * per_layer)


def image_flops(cfg: FlavaConfig) -> float:
    """One image through the image encoder, patch embedding included (ViT-B/16 @ 224: 35.1 G)."""
    ic = cfg.image
    patch = 2 * ic.num_patches * ic.hidden_size * ic.num_channels * ic.patch_size**2
    return patch + transformer_flops(ic, ic.num_patches + ic.num_prefix_tokens)


def text_flops(cfg: FlavaConfig, length: int) -> float:
    return transformer_flops(cfg.text, length)


def multimodal_flops(cfg: FlavaConfig, text_length: int) -> float:
    """Image + text + both mm projections + multimodal encoder, for one pair."""
    ic, tc, mc = cfg.image, cfg.text, cfg.multimodal
    n_img = ic.num_patches + 1
    proj = 2 * n_img * ic.hidden_size * mc.hidden_size + 2 * text_length * tc.hidden_size * mc.hidden_size
    n_mm = n_img + text_length + int(mc.use_cls_token)
    return image_flops(cfg) + text_flops(cfg, text_length) + proj + transformer_flops(mc, n_mm)
