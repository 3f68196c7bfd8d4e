"""The image tokenizer: DALL-E's dVAE encoder, giving one discrete token per 8x8 pixel block.

Module names follow the DALL-E encoder (`blocks.input`, `blocks.group_1.block_1.res_path.conv_1`,
...), so foreign checkpoints map onto it by renaming alone.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .config import CodebookConfig
from .errors import InputError

# The dVAE reads pixels squeezed into [eps, 1 - eps] (DALL-E's `map_pixels`).
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the dVAE's input range."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, post_gain: float):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = post_gain
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", nn.Conv2d(n_in, n_hid, 3, padding=1)),
            ("relu_2", nn.ReLU()), ("conv_2", nn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ("relu_3", nn.ReLU()), ("conv_3", nn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ("relu_4", nn.ReLU()), ("conv_4", nn.Conv2d(n_hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(n_blocks: int, n_in: int, n_out: int, post_gain: float, pool: bool) -> nn.Sequential:
    blocks = OrderedDict(
        (f"block_{i + 1}", EncoderBlock(n_in if i == 0 else n_out, n_out, post_gain)) for i in range(n_blocks)
    )
    if pool:
        blocks["pool"] = nn.MaxPool2d(kernel_size=2)
    return nn.Sequential(blocks)


class FlavaImageCodebook(nn.Module):
    """dVAE encoder: image [B, C, H, W] in the `map_pixels` range -> logits [B, vocab, H/8, W/8]."""

    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        self.cfg = cfg
        h, n = cfg.hidden_size, cfg.num_blocks_per_group
        gain = 1.0 / (cfg.num_groups * n) ** 2
        self.blocks = nn.Sequential(OrderedDict([
            ("input", nn.Conv2d(cfg.input_channels, h, 7, padding=3)),
            ("group_1", _group(n, h, h, gain, pool=True)),
            ("group_2", _group(n, h, 2 * h, gain, pool=True)),
            ("group_3", _group(n, 2 * h, 4 * h, gain, pool=True)),
            ("group_4", _group(n, 4 * h, 8 * h, gain, pool=False)),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", nn.Conv2d(8 * h, cfg.vocab_size, 1)),
            ]))),
        ]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.cfg.input_channels:
            raise InputError(
                f"codebook input must be [batch, {self.cfg.input_channels}, H, W]; "
                f"got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[-1] % 8 or pixel_values.shape[-2] % 8:
            raise InputError(f"codebook input size {tuple(pixel_values.shape[-2:])} must be a multiple of 8")
        return self.blocks(pixel_values)

    @torch.no_grad()
    def token_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, H/8 * W/8] the most likely token of each 8x8 block, row-major."""
        return self(pixel_values).argmax(dim=1).flatten(1)
