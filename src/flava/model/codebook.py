"""The image codebook: DALL-E's dVAE encoder, giving one discrete token per 8x8 pixel block, and its
decoder (used to train it).

Module names follow the DALL-E encoder (`blocks.input`, `blocks.group_1.block_1.res_path.conv_1`,
...), so foreign checkpoints map onto it by renaming alone.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import nn

from ..config import CodebookConfig
from ..errors import InputError

class ResBlock(nn.Module):
    """DALL-E's residual block: identity (1x1 conv when widths differ) + gain * four convs on a
    quarter-width path. The encoder's convs are 3-3-3-1 wide kernels, the decoder's 1-3-3-3."""

    def __init__(self, n_in: int, n_out: int, post_gain: float, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = post_gain
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = OrderedDict()
        for i, k in enumerate(kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = nn.Conv2d(widths[i], widths[i + 1], k, padding=k // 2)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _check_tensor(pixel_values) -> None:
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
        # uint8 pixels read as floats had given other tokens without a word (0-255, not map_pixels' range).
        got = f"{pixel_values.dtype} values" if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise InputError(f"the codebook takes a [batch, 3, H, W] float tensor of pixels in [0, 1] mapped by "
                         f"flava.data.transforms.map_pixels; got {got} (a data batch's uint8 codebook pixels are "
                         f"mapped by batch.to(device))")


ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


def _group(n_blocks: int, n_in: int, n_out: int, post_gain: float, kernels, tail: tuple[str, nn.Module] | None
           ) -> nn.Sequential:
    blocks = OrderedDict(
        (f"block_{i + 1}", ResBlock(n_in if i == 0 else n_out, n_out, post_gain, kernels)) for i in range(n_blocks)
    )
    if tail is not None:
        blocks[tail[0]] = tail[1]
    return nn.Sequential(blocks)


class FlavaImageCodebook(nn.Module):
    """dVAE encoder: image [B, C, H, W] in the `data.transforms.map_pixels` range -> logits
    [B, vocab, H/8, W/8]."""

    trained_size: int | None = None
    """The image side it was trained at, where its checkpoint says (`flava.loading.load_codebook`)."""

    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        self.cfg = cfg
        h, n = cfg.hidden_size, cfg.num_blocks_per_group
        gain = 1.0 / (cfg.num_groups * n) ** 2
        self.blocks = nn.Sequential(OrderedDict([
            ("input", nn.Conv2d(cfg.input_channels, h, 7, padding=3)),
            ("group_1", _group(n, h, h, gain, ENCODER_KERNELS, ("pool", nn.MaxPool2d(2)))),
            ("group_2", _group(n, h, 2 * h, gain, ENCODER_KERNELS, ("pool", nn.MaxPool2d(2)))),
            ("group_3", _group(n, 2 * h, 4 * h, gain, ENCODER_KERNELS, ("pool", nn.MaxPool2d(2)))),
            ("group_4", _group(n, 4 * h, 8 * h, gain, ENCODER_KERNELS, None)),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", nn.Conv2d(8 * h, cfg.vocab_size, 1)),
            ]))),
        ]))
        # oneDNN runs these convolutions about twice as fast on NHWC tensors.
        self.to(memory_format=torch.channels_last)

    def fingerprint(self) -> str:
        """A short hash of the weights: prepared image tokens name the codebook that made them."""
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()[:16]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _check_tensor(pixel_values)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.cfg.input_channels:
            raise InputError(
                f"codebook input must be [batch, {self.cfg.input_channels}, H, W]; "
                f"got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[-1] % 8 or pixel_values.shape[-2] % 8:
            raise InputError(f"codebook input size {tuple(pixel_values.shape[-2:])} must be a multiple of 8")
        weight = self.blocks.input.weight
        if pixel_values.dtype != weight.dtype and not torch.is_autocast_enabled(pixel_values.device.type):
            pixel_values = pixel_values.to(weight.dtype)  # float64 or float16 pixels into float32 weights
        return self.blocks(pixel_values.contiguous(memory_format=torch.channels_last))

    @torch.no_grad()
    def token_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, H/8 * W/8] the most likely token of each 8x8 block, row-major. In float32 whatever the
        caller's autocast: an argmax over thousands of bfloat16 logits flips some tokens, and the
        targets a step computes must be the ones `flava prepare` stores."""
        _check_tensor(pixel_values)
        with torch.autocast(pixel_values.device.type, enabled=False), _full_fp32(pixel_values.device):
            return self(pixel_values.float()).argmax(dim=1).flatten(1)


@contextlib.contextmanager
def _full_fp32(device: torch.device):
    """cuDNN convolutions without TF32 (its default): TF32's 10-bit mantissa flips argmax ties, and
    more so between the algorithms cuDNN picks for different batch sizes (a prepared shard's
    batches against a training step's)."""
    if device.type != "cuda":
        yield
        return
    # torch 2.9 added a per-operation setting; reading the old flag after it was used can raise.
    conv = getattr(torch.backends.cudnn, "conv", None)
    owner, name, ieee = (conv, "fp32_precision", "ieee") if hasattr(conv, "fp32_precision") else \
        (torch.backends.cudnn, "allow_tf32", False)
    before = getattr(owner, name)
    setattr(owner, name, ieee)
    try:
        yield
    finally:
        setattr(owner, name, before)


class CodebookDecoder(nn.Module):
    """DALL-E's dVAE decoder: (relaxed) one-hot tokens [B, vocab, h, w] -> pixels [B, C, 8h, 8w]."""

    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        h, n = cfg.hidden_size, cfg.num_blocks_per_group
        n_init = max(8, h // 2)
        gain = 1.0 / (cfg.num_groups * n) ** 2
        self.blocks = nn.Sequential(OrderedDict([
            ("input", nn.Conv2d(cfg.vocab_size, n_init, 1)),
            ("group_1", _group(n, n_init, 8 * h, gain, DECODER_KERNELS, ("upsample", nn.Upsample(scale_factor=2)))),
            ("group_2", _group(n, 8 * h, 4 * h, gain, DECODER_KERNELS, ("upsample", nn.Upsample(scale_factor=2)))),
            ("group_3", _group(n, 4 * h, 2 * h, gain, DECODER_KERNELS, ("upsample", nn.Upsample(scale_factor=2)))),
            ("group_4", _group(n, 2 * h, h, gain, DECODER_KERNELS, None)),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", nn.Conv2d(h, cfg.input_channels, 1)),
            ]))),
        ]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hard token ids [B, h, w] -> pixels [B, C, 8h, 8w]."""
        vocab = self.blocks.input.in_channels
        return self(torch.nn.functional.one_hot(tokens, vocab).permute(0, 3, 1, 2).float())
