"""The image tokenizer: DALL-E's dVAE encoder, giving one discrete token per 8x8 pixel block.

Module names follow the DALL-E encoder (`blocks.input`, `blocks.group_1.block_1.res_path.conv_1`,
...), so foreign checkpoints map onto it by renaming alone.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .config import CodebookConfig
from .errors import InputError

# The dVAE reads pixels squeezed into [eps, 1 - eps] (DALL-E's `map_pixels`).
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the dVAE's input range."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


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
    """dVAE encoder: image [B, C, H, W] in the `map_pixels` range -> logits [B, vocab, H/8, W/8]."""

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

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.cfg.input_channels:
            raise InputError(
                f"codebook input must be [batch, {self.cfg.input_channels}, H, W]; "
                f"got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[-1] % 8 or pixel_values.shape[-2] % 8:
            raise InputError(f"codebook input size {tuple(pixel_values.shape[-2:])} must be a multiple of 8")
        return self.blocks(pixel_values.contiguous(memory_format=torch.channels_last))

    @torch.no_grad()
    def token_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, H/8 * W/8] the most likely token of each 8x8 block, row-major."""
        return self(pixel_values).argmax(dim=1).flatten(1)


# --------------------------------------------------------------------------- training (dVAE)


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


@dataclass
class TokenizerTraining:
    """How `flava train-tokenizer` trains the dVAE."""

    steps: int = 300
    """Optimizer steps (enough for the tiny demo codebook; real data wants thousands)."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay to a tenth after a 5 % warmup)."""
    temperature_start: float = 1.0
    """Gumbel-softmax temperature at the start..."""
    temperature_end: float = 1 / 16
    """...annealed exponentially to this (DALL-E's final value)."""
    kl_weight: float = 0.0
    """Weight of the ELBO's per-position KL(q || uniform), ramped in over the first half."""
    diversity_weight: float = 0.3
    """Weight of KL(mean q over the batch || uniform): penalises a batch that uses few codes
    (wav2vec 2.0's diversity loss), the usual cure for a collapsing codebook."""
    entropy_weight: float = 0.05
    """Weight of the mean per-position entropy H(q): with the diversity term this maximises the
    mutual information between images and codes (sharp per position, spread over the batch)."""
    straight_through: bool = False
    """Decode hard one-hot samples with straight-through gradients instead of soft ones."""
    crop_scale_min: float = 0.35
    """Random crops cover this much of an image at least (augmentation)."""
    seed: int = 0
    log_every: int = 50


def token_usage(token_ids: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Perplexity exp(H) of the token histogram and the share of the vocabulary used."""
    counts = torch.bincount(token_ids.flatten(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "codes_used": float((counts > 0).double().mean()),
            "codes_used_count": int((counts > 0).sum())}


def train_codebook(
    images: list,
    cfg: CodebookConfig,
    image_size: int,
    settings: TokenizerTraining,
    on_step=None,
    eval_images: list | None = None,
) -> tuple[FlavaImageCodebook, CodebookDecoder, dict]:
    """Train encoder + decoder with the Gumbel-softmax relaxation on PIL images; `on_step(step,
    row)` is called after every step, with the logged metrics every `log_every` steps (else None).

    Returns the encoder (the tokenizer), the decoder, and a summary: reconstruction MSE at the
    start and end (on `eval_images`, center crops), codebook perplexity and share of codes used.
    """
    import math

    import numpy as np
    import torch.nn.functional as F

    from .data.transforms import random_resized_crop, resize_center_crop, to_tensor
    from .train.optim import warmup_cosine

    if not images:
        raise InputError("no images to train the image tokenizer on")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    encoder, decoder = FlavaImageCodebook(cfg), CodebookDecoder(cfg)
    decoder.to(memory_format=torch.channels_last)  # as the encoder: faster convolutions
    params = list(encoder.parameters()) + list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = warmup_cosine(max(1, settings.steps // 20), settings.steps, min_ratio=0.1)

    def lr_at(step: int) -> float:
        return settings.lr * schedule(step)

    if eval_images is None:  # a fixed sample, scored with center crops before and after
        pick = np.random.default_rng(settings.seed + 1).choice(len(images), min(512, len(images)), replace=False)
        eval_images = [images[i] for i in sorted(pick)]
    eval_x = torch.stack([to_tensor(resize_center_crop(im, image_size)) for im in eval_images])

    @torch.no_grad()
    def evaluate() -> dict:
        encoder.eval(), decoder.eval()
        mse, ids = 0.0, []
        for chunk in eval_x.split(128):
            tokens = encoder(map_pixels(chunk)).argmax(1)
            ids.append(tokens)
            mse += float(F.mse_loss(decoder.decode_tokens(tokens), chunk, reduction="sum"))
        encoder.train(), decoder.train()
        return {"reconstruction_mse": mse / eval_x.numel(), **token_usage(torch.cat(ids), cfg.vocab_size)}

    start = evaluate()
    history = []
    log_ratio = math.log(settings.temperature_end / settings.temperature_start)
    for step in range(settings.steps):
        pick = rng.integers(0, len(images), settings.batch_size)
        x = torch.stack([
            to_tensor(random_resized_crop(images[i], image_size, rng, (settings.crop_scale_min, 1.0))) for i in pick
        ])
        if rng.random() < 0.5:
            x = x.flip(-1)
        tau = settings.temperature_start * math.exp(log_ratio * step / max(1, settings.steps - 1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = encoder(map_pixels(x))
        z = F.gumbel_softmax(logits, tau=tau, hard=settings.straight_through, dim=1)
        recon = F.mse_loss(decoder(z), x)
        log_q = logits.log_softmax(dim=1)
        q = log_q.exp()
        kl = (q * log_q).sum(1).mean() + math.log(cfg.vocab_size)
        q_mean = q.mean(dim=(0, 2, 3))
        diversity = (q_mean * q_mean.clamp_min(1e-12).log()).sum() + math.log(cfg.vocab_size)
        beta = settings.kl_weight * min(1.0, step / max(1, settings.steps // 2))
        entropy = math.log(cfg.vocab_size) - kl
        loss = recon + beta * kl + settings.diversity_weight * diversity + settings.entropy_weight * entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        row = None
        if step % settings.log_every == 0 or step == settings.steps - 1:
            row = {"step": step, "loss": loss.item(), "reconstruction_mse": recon.item(), "kl": kl.item(),
                   "diversity": diversity.item(), "temperature": tau, "lr": lr_at(step)}
            history.append(row)
        if on_step is not None:
            on_step(step, row)
    end = evaluate()
    summary = {"start": start, "end": end, "history": history, "images": len(images),
               "image_size": image_size, "settings": dataclasses.asdict(settings)}
    return encoder.eval().requires_grad_(False), decoder.eval(), summary
