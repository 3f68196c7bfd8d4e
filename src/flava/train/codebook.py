"""Training the dVAE image codebook that gives MIM/MMM targets, and `flava train-codebook`.

DALL-E's encoder is trained with a decoder through the Gumbel-softmax relaxation, with
batch-level diversity and per-position sharpness terms that keep codes in use. Images stream
from any source `flava pretrain` reads (loader workers crop them; uint8 batches go to the
device), the step runs on the GPU when there is one (bf16 autocast), and the run saves itself
every `save_every` steps into `OUTPUT/training/`, so `--resume` continues it exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from safetensors.torch import load_file, save_file

from .. import stopping
from ..config import CodebookConfig, FlavaConfig, NonNegative, NonNegativeInt, Positive, PositiveInt, Range, Seed, \
    check_rgb, from_dict, to_dict
from ..data.codebook_crops import CodebookCrops
from ..data.pipeline import BatchStream, KindStream, auto_workers
from ..data.registry import check_disjoint, check_distinct, demo_source, estimated_size, open_source, refuse_empty
from ..data.shards import is_remote
from ..data.registry import image_sources as open_images  # this module's image_sources adds demo and pairs
from ..data.sources import OUTAGE_S, Source, StoreOutage
from ..data.transforms import map_pixels
from ..distributed import resolve_device
from ..errors import CheckpointError, ConfigError, DataError, DivergedError, first_line, saved_before
from ..io.checkpoint import (check_replaceable, damage, save_state, write_checkpoint_dir, write_checkpoint_files,
                             write_checksums)
from ..io.files import check_not_current, read_json, recover_replaced, replace_dir, write_json_atomic
from ..io.runs import CODEBOOK_STATE, RunDir, codebook_progress, codebook_state
from ..loading import refuse_non_finite
from ..model.codebook import CodebookDecoder, FlavaImageCodebook
from ..optim import warmup_cosine
from ..progress import progress_bar
from .accounting import DataAccounting, source_notes
from .config import anchored


@dataclass
class CodebookTraining:
    """How `flava train-codebook` trains the dVAE."""

    steps: PositiveInt = 300
    """Optimizer steps (enough for the tiny demo codebook; real data wants thousands)."""
    batch_size: PositiveInt = 32
    """Images per step."""
    lr: Positive = 2e-3
    """Peak AdamW learning rate (cosine decay to a tenth after a 5 % warmup)."""
    temperature_start: Positive = 1.0
    """Gumbel-softmax temperature at the start..."""
    temperature_end: Positive = 1 / 16
    """...annealed exponentially to this (DALL-E's final value)."""
    kl_weight: NonNegative = 0.0
    """Weight of the ELBO's per-position KL(q || uniform), ramped in over the first half."""
    diversity_weight: NonNegative = 0.3
    """Weight of KL(mean q over the batch || uniform): penalises a batch that uses few codes
    (wav2vec 2.0's diversity loss), the usual cure for a collapsing codebook."""
    entropy_weight: NonNegative = 0.05
    """Weight of the mean per-position entropy H(q): with the diversity term this maximises the
    mutual information between images and codes (sharp per position, spread over the batch)."""
    straight_through: bool = False
    """Decode hard one-hot samples with straight-through gradients instead of soft ones."""
    crop_scale_min: Annotated[float, Range(0, 1, low_open=True)] = 0.35
    """Random crops cover this much of an image at least (augmentation)."""
    seed: Seed = 0
    log_every: PositiveInt = 50
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the step runs: 'auto' takes the GPU when there is one."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto': bf16 autocast on CUDA, fp32 on the CPU."""
    num_workers: NonNegativeInt | None = None
    """Loader worker processes; None: none on the CPU, up to 8 beside a GPU."""
    save_every: PositiveInt = 100
    """Steps between the resumable saves in OUTPUT/training/."""
    eval_images: PositiveInt = 512
    """Images (center crops) in the fixed sample scored before and after."""
    outage_minutes: Annotated[float, Range(0, 10_080)] = 30.0
    """How long a remote shard whose store cannot serve it now is waited for (as `flava
    pretrain`'s data.outage_minutes); 0: passed over, counted."""
    max_nonfinite_steps: PositiveInt = 5
    """Steps in a row whose loss or gradients are not finite (their updates are skipped and
    counted) before the run stops as diverged (as `flava pretrain`'s)."""


def token_usage(token_ids: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Perplexity exp(H) of the token histogram and the share of the vocabulary used."""
    counts = torch.bincount(token_ids.flatten(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "codes_used": float((counts > 0).double().mean()),
            "codes_used_count": int((counts > 0).sum())}


def _pixels(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 host pixels -> [0, 1] floats on the device, channels-last (faster convolutions)."""
    x = x.pin_memory() if device.type == "cuda" else x
    x = x.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def _gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool, generator: torch.Generator) -> torch.Tensor:
    """F.gumbel_softmax with its noise from `generator`, so a resumed run draws the same noise."""
    noise = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(
        generator=generator).log()
    y = ((logits + noise) / tau).softmax(dim=1)
    if not hard:
        return y
    one_hot = torch.zeros_like(y).scatter_(1, y.argmax(1, keepdim=True), 1.0)
    return one_hot - y.detach() + y


class CodebookRun:
    """One codebook training: encoder, decoder, optimiser, image stream and step, saved and
    resumed whole (`save`, `load`)."""

    def __init__(self, cfg: CodebookConfig, image_size: int, settings: CodebookTraining, stream: KindStream,
                 eval_pixels: torch.Tensor, device: torch.device):
        self.cfg, self.size, self.settings, self.stream, self.device = cfg, image_size, settings, stream, device
        torch.manual_seed(settings.seed)
        self.encoder = FlavaImageCodebook(cfg).to(device)
        self.decoder = CodebookDecoder(cfg).to(device).to(memory_format=torch.channels_last)
        self.params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        # Fused: it skips a non-finite step's update on the device (`found_inf`), without a host sync.
        self.opt = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0, fused=True)
        self.schedule = warmup_cosine(max(1, settings.steps // 20), settings.steps, min_ratio=0.1)
        self.eval_pixels = eval_pixels
        bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda")
        self.dtype = torch.bfloat16 if bf16 else None
        self.step, self.history, self.start_metrics = 0, [], None
        self.saved_at = 0
        """The step of the latest save (this run's or the one it resumed from); 0: none."""
        self.nonfinite_steps, self.nonfinite_run, self.diverged_at = 0, 0, -1
        """Updates skipped for a non-finite loss or gradient, how many of them end at the step reached,
        and the step a run of `max_nonfinite_steps` of them ended at (-1: none), as last read."""
        self._nonfinite = torch.tensor([0, 0, -1], device=device)
        """The same counts kept on the device, step by step: read at the steps that sync anyway."""

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    @torch.no_grad()
    def evaluate(self, stoppable: bool = False) -> dict | None:
        """Reconstruction MSE, perplexity and codes used on the fixed evaluation sample; None when
        `stoppable` and a stop is requested before it is done."""
        self.encoder.eval(), self.decoder.eval()
        mse, ids = 0.0, []
        for chunk in self.eval_pixels.split(128):
            if stoppable and stopping.requested():
                self.encoder.train(), self.decoder.train()
                return None
            x = _pixels(chunk, self.device)
            tokens = self._tokens(x)  # the tokens pretraining reads (float32), not bf16's argmax
            with self._autocast():
                recon = self.decoder.decode_tokens(tokens).float()
            ids.append(tokens.cpu())
            mse += float(F.mse_loss(recon, x, reduction="sum"))
        self.encoder.train(), self.decoder.train()
        return {"reconstruction_mse": mse / self.eval_pixels.numel(),
                **token_usage(torch.cat(ids), self.cfg.vocab_size)}

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.token_ids(map_pixels(x)).view(x.shape[0], x.shape[-2] // 8, x.shape[-1] // 8)

    def train_step(self) -> dict | None:
        """One step; the logged metrics every `log_every` steps (the only host syncs), else None."""
        st, step, vocab = self.settings, self.step, self.cfg.vocab_size
        with stopping.abandonable():  # a stop request ends a stalled read: nothing has moved yet
            x = _pixels(self.stream.next_batch().pixels, self.device)
        tau = st.temperature_start * math.exp(
            math.log(st.temperature_end / st.temperature_start) * step / max(1, st.steps - 1))
        lr = st.lr * self.schedule(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        generator = torch.Generator(self.device).manual_seed(st.seed * 1_000_003 + step)
        with self._autocast():
            logits = self.encoder(map_pixels(x)).float()
            z = _gumbel_softmax(logits, tau, st.straight_through, generator)
            recon = F.mse_loss(self.decoder(z).float(), x)
        log_q = logits.log_softmax(dim=1)
        q = log_q.exp()
        kl = (q * log_q).sum(1).mean() + math.log(vocab)
        q_mean = q.mean(dim=(0, 2, 3))
        diversity = (q_mean * q_mean.clamp_min(1e-12).log()).sum() + math.log(vocab)
        beta = st.kl_weight * min(1.0, step / max(1, st.steps // 2))
        entropy = math.log(vocab) - kl
        loss = recon + beta * kl + st.diversity_weight * diversity + st.entropy_weight * entropy
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        # A diverging step (a NaN, an infinity) leaves the weights and the optimizer's moments as they were.
        norms = torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
        finite = torch.isfinite(loss.detach()) & torch.isfinite(torch.stack(norms).sum())
        self.opt.found_inf = (~finite).float()
        self.opt.step()
        self._count_nonfinite(finite, step)
        self.step += 1
        if step % st.log_every and step != st.steps - 1:
            return None
        values = torch.cat([torch.stack([loss, recon, kl, diversity]).detach().double(),
                            finite.double().reshape(1), self._nonfinite.double()]).tolist()
        self._read_nonfinite(values[-3:])
        row = {"step": step, **dict(zip(("loss", "reconstruction_mse", "kl", "diversity"), values)),
               "temperature": tau, "lr": lr, "update_skipped": not values[4]}
        self.history.append(row)
        return row

    # ------------------------------------------------------------------ divergence

    def _count_nonfinite(self, finite: torch.Tensor, step: int) -> None:
        """Count a skipped update on the device: the total, the run of them ending here, and the
        step where such a run first reached `max_nonfinite_steps` (a run that ended between two
        reads still stops it: where it stops does not depend on when the host looks)."""
        total, run, diverged = self._nonfinite.unbind()
        skipped = (~finite).long()
        run = (run + 1) * skipped
        diverged = torch.where((diverged < 0) & (run >= self.settings.max_nonfinite_steps), step, diverged)
        self._nonfinite = torch.stack([total + skipped, run, diverged])

    def _read_nonfinite(self, values: list[float]) -> None:
        self.nonfinite_steps, self.nonfinite_run, self.diverged_at = (int(v) for v in values)

    def check_finite(self, state: Path, read: bool = True) -> None:
        """Raise DivergedError when `max_nonfinite_steps` updates in a row were skipped since the run
        began, naming the latest save (in `state`) and the cure. `read`: the device's counts (a sync),
        else those a logged step read."""
        if read:
            self._read_nonfinite(self._nonfinite.tolist())
        if self.diverged_at >= 0:
            n = self.settings.max_nonfinite_steps
            # Steps named alone: only logged ones have rows in the metrics file.
            self._diverged(f"the loss or its gradients were not finite for {n} steps in a row (steps "
                           f"{self.diverged_at - n + 1}-{self.diverged_at}; their updates were skipped, "
                           "--max-nonfinite-steps)", state)

    def _diverged(self, what: str, state: Path) -> None:
        lr = self.settings.lr
        if self.saved_at:
            cure = (f"its latest save (step {self.saved_at} in {state}, made after a finite step) is kept: continue "
                    f"it with a lower learning rate, --resume --lr {lr / 10:g} (now {lr:g})")
        else:
            cure = f"nothing was saved yet: run it again with a lower learning rate, --lr {lr / 10:g} (now {lr:g})"
        raise DivergedError(f"{what}, so the codebook training stopped; {cure}")

    def _finite_weights(self, weights: dict[str, torch.Tensor], state: Path) -> dict[str, torch.Tensor]:
        """`weights`, refused when any holds a NaN or an infinity (finite steps that grew one): never saved."""
        bad = [k for k, v in weights.items()
               if v.is_floating_point() and v.numel() and not all(map(torch.isfinite, torch.aminmax(v)))]
        if bad:
            self._diverged(f"the codebook's weights are no longer finite at step {self.step} (e.g. {bad[0]}), so "
                           "they were not saved", state)
        return weights

    # ------------------------------------------------------------------ saving and resuming

    def save(self, directory: Path, meta: dict) -> bool:
        """Everything a resumed run needs, replacing `directory` whole; whether it did. A run that
        diverged raises DivergedError instead. While updates are skipped the weights are those that
        gave the latest non-finite loss, and the latest save (the only one) is kept: a resume from
        them with a lower learning rate would diverge again."""
        self.check_finite(directory)
        if self.nonfinite_run:
            return False
        weights = {**{f"encoder.{k}": v for k, v in self.encoder.state_dict().items()},
                   **{f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}}
        weights = self._finite_weights({k: v.detach().cpu().contiguous() for k, v in weights.items()}, directory)

        def fill(tmp: Path) -> None:
            save_file(weights, str(tmp / "weights.safetensors"))
            save_state(self.opt.state_dict(), tmp / "optimizer.pt")
            write_json_atomic(tmp / "state.json", {**meta, "step": self.step, "history": self.history,
                                                   "start": self.start_metrics, "stream": self.stream.state(),
                                                   "nonfinite_steps": self.nonfinite_steps})
            write_checksums(tmp)
        replace_dir(directory, fill)
        self.saved_at = self.step
        stopping.saved(f"step {self.step} in {directory}")
        return True

    def load(self, directory: Path) -> dict:
        why = damage(directory)
        try:
            if why:
                raise CheckpointError(why)
            state = read_json(directory / "state.json", "codebook training state", CheckpointError, expect=dict)
            weights = load_file(str(directory / "weights.safetensors"))
            refuse_non_finite(weights, "codebook", directory)
            self.encoder.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("encoder.")})
            self.decoder.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("decoder.")})
            optimizer = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
            for group in optimizer["param_groups"]:  # a save of an earlier release's unfused AdamW too
                group.update(fused=True, foreach=None)
            self.opt.load_state_dict(optimizer)
        except Exception as e:  # safetensors, torch and the file system raise many types for a damaged file
            raise CheckpointError(f"the saved codebook training in {directory} is damaged ({first_line(e)}); delete "
                                  "it and run without --resume to train the codebook from the start") from None
        self.stream.load_states([state["stream"]])
        self.step, self.history, self.start_metrics = int(state["step"]), state["history"], state["start"]
        self.saved_at = self.step
        # A save is made after a finite step only: no run of skipped updates goes on past it.
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self._nonfinite = torch.tensor([self.nonfinite_steps, 0, -1], device=self.device)
        return state


# --------------------------------------------------------------------------- the command


METRICS = "codebook_metrics.jsonl"
OUTAGE_SETTING = "--outage-minutes"
"""`CodebookTraining.outage_minutes` as the command sets it, named when a store's outage outlasts it."""
RESUMABLE = ("steps", "lr", "save_every", "log_every", "outage_minutes", "max_nonfinite_steps")
"""Settings a resume takes when they are given (the data's order depends on none of them): how long
to run, the learning rate's peak (the cure for a run that diverged), how often to save and log, how
long to wait for a store, and the divergence patience. Where it runs (device, num_workers) is taken
whether given or not."""
STATE = CODEBOOK_STATE


def image_sources(images: list[str], pairs: list[str]) -> list[Source]:
    """The sources named: 'demo' (the packaged demo images, or pairs); image files and globs gathered into
    one source; folders, shards, tables and parquet as `flava pretrain` opens them (the images
    of pairs)."""
    check_distinct([*images, *pairs], "train-codebook", " (--images and --pairs together)")
    demo = [demo_source("images")] if "demo" in images else []
    sources = demo + open_images([s for s in images if s != "demo"]) + [
        demo_source("pairs") if spec == "demo" else open_source("pairs", spec) for spec in pairs]
    check_disjoint(sources, "train-codebook", " (it would be drawn twice as often)", pairs_as_images=True)
    for source in sources:  # as pretrain refuses it (its evaluation sample had divided by no images)
        refuse_empty(source)
    return sources


def _stream(sources: list[Source], maker: CodebookCrops, batch: int, seed: int, workers: int,
            outage_s: float) -> KindStream:
    streams = [BatchStream("images", src, maker, batch, seed=seed + 7919 * i, num_workers=workers,
                           outage_s=outage_s, outage_setting=OUTAGE_SETTING)
               for i, src in enumerate(sources)]
    outage = (outage_s, OUTAGE_SETTING)
    weights = [float(estimated_size(src, outage)) for src in sources] if len(sources) > 1 else [1.0]
    return KindStream("images", streams, weights, seed, estimated=len(sources) > 1)


def _evaluation_sample(sources: list[Source], size: int, seed: int, wanted: int,
                       outage_s: float = OUTAGE_S) -> torch.Tensor:
    """The fixed sample scored before and after training: up to `wanted` center crops from every
    source in proportion to its size, each image once (sizes of local shards without an index are
    estimated from their first and their bytes; remote ones, which would be fetched for it, count
    as `wanted`).
    One batch drawn by weight took it all from one source, and 512 from 60 images repeated them."""
    sizes = [s.known_size if s.known_size is not None else
             wanted if is_remote(str(getattr(s.shards[0], "url", ""))) else estimated_size(s) for s in sources]
    n = max(1, min(wanted, sum(sizes)))
    exact = [n * k / sum(sizes) for k in sizes]
    shares = [max(1, min(k, math.floor(e))) for k, e in zip(sizes, exact)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: math.floor(exact[i]) - exact[i])
    while sum(shares) < n and any(shares[i] < sizes[i] for i in by_remainder):  # what rounding down left
        for i in by_remainder:
            if sum(shares) < n and shares[i] < sizes[i]:
                shares[i] += 1
    while sum(shares) > n and max(shares) > 1:  # a share of 1 for each small source
        shares[shares.index(max(shares))] -= 1
    crops, pixels = CodebookCrops(size, seed, train=False), []
    for i, (source, share, whole) in enumerate(zip(sources, shares, sizes)):
        # A source taken whole is read by one lane: lanes over uneven shards wrapped around the short
        # ones and repeated their images (36 of 40); a part of a larger one is spread over its shards.
        stream = BatchStream("images", source, crops, share, seed=seed + 7919 * i, outage_s=outage_s,
                             lanes=1 if share >= whole else 0, outage_setting=OUTAGE_SETTING)
        try:  # a source with no readable image, named (alone) before training
            stream.probe()
            pixels.append(stream.next_batch().pixels)
        except DataError as e:
            raise _no_images(e, [source]) from None
    # A draw replaces an unreadable image by another of its source, and a source smaller than its
    # estimate wraps around: either repeats an image (a center crop, the same pixels), kept once.
    whole = torch.cat(pixels)
    _, first = np.unique(whole.flatten(1).numpy(), axis=0, return_index=True)
    return whole if len(first) == len(whole) else whole[torch.from_numpy(np.sort(first))]


def _no_images(e: DataError, sources: list[Source]) -> DataError:
    if isinstance(e, StoreOutage):  # the images may be fine: the store is down
        return e
    names = ", ".join(s.name for s in sources)
    return DataError(f"no image of {names} could be read ({e})")


def reconstruction_grid(run: CodebookRun, path: Path) -> None:
    """Originals (top row) over their reconstructions from the discrete tokens (bottom row)."""
    x = _pixels(run.eval_pixels[:8], run.device)
    tokens = run._tokens(x)
    with torch.no_grad(), run._autocast():
        recon = run.decoder.decode_tokens(tokens).float().clamp(0, 1)
    rows = [torch.cat(list(t.float().cpu()), dim=2) for t in (x, recon)]
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def _check_start(output: Path, resume: bool) -> dict | None:
    """The saved state to resume from, or None for a new run; refuses what was not asked for."""
    # A save killed between its renames left the previous state beside its place; it is read there
    # and moved back only under the lock (a running holder may be between those renames now).
    state = codebook_state(output)
    # A codebook is saved with its decoder and report; other weights are a model's checkpoint.
    other = (output / "model.safetensors").is_file() and not (output / "decoder.safetensors").is_file() and \
        not (output / "codebook_report.json").is_file()
    if other:
        raise ConfigError(f"{output} holds a model's checkpoint, not a codebook training; choose another --output")
    if resume:
        if state is not None:
            return read_json(state, "codebook training state", expect=dict)
        if (output / "model.safetensors").is_file():
            raise ConfigError(f"{output} holds a finished codebook, whose training state is not kept once it is "
                              "written: there is nothing to resume; to train one longer, start a new run with more "
                              "--steps in another --output")
        if (output / ".lock").is_file():  # a run that has not saved yet: said to be running, not to be missing
            with RunDir(output).lock():
                pass
        raise ConfigError(f"--resume: {output} holds no codebook training to resume; check the path, or leave out "
                          "--resume to start one")
    if state is not None:
        saved = read_json(state, "codebook training state", expect=dict)
        raise ConfigError(f"{output} holds an unfinished codebook training ({codebook_progress(saved)}): add "
                          "--resume to continue it, or choose another --output")
    if (output / "model.safetensors").is_file():
        raise ConfigError(f"{output} already holds a trained codebook; choose another --output (or remove it to "
                          "train again there)")
    check_replaceable(output, (METRICS, STATE, ".lock"))
    return None


def _anchored(specs: list[str]) -> list[str]:
    return [s if s == "demo" else anchored(s) for s in specs]


def _gone(specs: list[str]) -> bool:
    """Whether none of a run's local data specs names anything any more (moved, or another node's
    mount); remote ones cannot be told so."""
    import glob

    from ..data.shards import GLOB_CHARS, expand_urls

    def there(part: str) -> bool:
        return bool(glob.glob(part)) if any(c in part for c in GLOB_CHARS) else Path(part).exists()

    local = [s for s in specs if s != "demo" and not is_remote(s)]
    return bool(local) and len(local) == len(specs) and not any(there(p) for s in local for p in expand_urls(s))


def run_train_codebook(images_spec: list[str], output: Path, cfg: FlavaConfig, settings: CodebookTraining,
                       console: Console, pairs_spec: list[str] | None = None, resume: bool = False,
                       given: set[str] | None = None) -> dict:
    """Train (or, `resume`, continue) the codebook in `output`. `given`: the settings the user set
    (the command line's flags, and "config"/"set" for the model); a resumed run keeps its own and
    names those it ignores (without `given`, settings that differ from the defaults count as set)."""
    output = Path(output)
    check_not_current(output)  # the finished codebook replaces it whole
    saved = _check_start(output, resume)
    tokens = cfg.codebook.vocab_size
    if cfg.image.vocab_size != tokens:  # the image tokens are the codebook's (as a run saves them)
        cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, vocab_size=tokens))
        if saved is None:
            console.print(f"note: image.vocab_size set to the codebook's {tokens} tokens")
    if saved is not None:
        asked, asked_model = dataclasses.asdict(settings), to_dict(cfg)
        cfg = from_dict(FlavaConfig, saved["model"])
        defaults = dataclasses.asdict(CodebookTraining())
        own = {**defaults, **saved["settings"]}  # a save from before a setting existed ran with its default
        # Set explicitly and unlike the run's: where it runs is taken, and the RESUMABLE ones.
        changed = [k for k in asked if asked[k] != own.get(k)
                   and (k in given if given is not None else asked[k] != defaults[k])]
        taken = {k: asked[k] for k in changed if k in RESUMABLE}
        steps = taken.get("steps", own["steps"])
        settings = from_dict(CodebookTraining, {**own, "device": settings.device,
                                                "num_workers": settings.num_workers, **taken})
        data = {k: _anchored(asked_spec) for k, asked_spec in (("images", images_spec), ("pairs", pairs_spec or []))
                if asked_spec and _anchored(asked_spec) != _anchored(saved[k])}
        # It reads its own data; data named where the run's is gone (moved, another node's mount) is
        # taken as that data, and said so.
        moved = {k: v for k, v in data.items() if _gone(saved[k]) and len(v) == len(saved[k])}
        changed += [k for k in data if k not in moved]
        if asked_model != to_dict(cfg):  # and keeps its own codebook
            changed += sorted({"config", "set"} & (given or set()))
        for k, specs in moved.items():
            console.print(f"note: the run's {k} ({', '.join(saved[k])}) are gone: reading {', '.join(specs)} in their "
                          "place, as the same data moved (the resume is exact if it is)")
        images_spec, pairs_spec = moved.get("images", saved["images"]), moved.get("pairs", saved["pairs"])
        if isinstance(saved.get("step"), int) and saved["step"] > steps:  # before any note, and any image read
            raise _cannot_go_back(steps, saved["step"], output)
        if "steps" in changed:
            console.print(f"note: steps {saved['settings']['steps']} -> {steps} (the learning-rate and temperature "
                          "schedules now run to that)")
        if others := [k for k in taken if k != "steps"]:
            console.print("note: resuming with " + ", ".join(f"{k} {own[k]:g} -> {taken[k]:g}" for k in others))
        ignored = [k for k in changed if k not in ("device", "num_workers", *RESUMABLE)]
        if ignored:
            console.print(f"note: resuming with the run's own settings; ignored: {', '.join(ignored)}")
    else:  # saved absolute: a --resume from another folder reads the same files
        images_spec, pairs_spec = _anchored(images_spec), _anchored(pairs_spec or [])
    check_rgb(cfg)
    size = cfg.codebook_image_size
    device = resolve_device(settings.device)
    workers = settings.num_workers if settings.num_workers is not None else \
        (auto_workers({"images": 1.0})["images"] if device.type == "cuda" else 0)
    pairs_spec = list(pairs_spec or [])
    sources = image_sources(images_spec, pairs_spec)
    try:  # reading thousands of images may take a while; this process alone reads them
        with stopping.abandonable(), stopping.interruptible():
            eval_pixels = _evaluation_sample(sources, size, settings.seed + 1, settings.eval_images,
                                             settings.outage_minutes * 60)
    except stopping.Abandoned as e:
        raise _stopped_first(e.signum, saved is not None) from None
    stream = _stream(sources, CodebookCrops(size, settings.seed, settings.crop_scale_min), settings.batch_size,
                     settings.seed, workers, settings.outage_minutes * 60)
    run = CodebookRun(cfg.codebook, size, settings, stream, eval_pixels, device)
    meta = {"model": to_dict(cfg), "settings": dataclasses.asdict(settings), "images": images_spec,
            "pairs": pairs_spec}
    with RunDir(output).lock():
        recover_replaced(output / STATE)  # the one writer now: a killed save's staging copies go
        if saved is not None:
            run.load(output / STATE)
            if run.step > settings.steps:  # it would save a codebook "finished" past its own end
                raise _cannot_go_back(settings.steps, run.step, output)
            console.print(f"resuming the codebook training in {output} at step {run.step} of {settings.steps}")
        else:
            console.print(f"training an image codebook of {cfg.codebook.vocab_size} tokens on "
                          f"{', '.join(s.name for s in sources)} at {size} px ({cfg.image.grid_size}x"
                          f"{cfg.image.grid_size} tokens each), {settings.steps} steps on {device.type}"
                          + (" (bf16)" if run.dtype is not None else ""))
        # As pretraining says them: bad rows, missing files and shards, fewer images than a batch.
        for note in source_notes({"images": stream}, settings.batch_size, lambda kind, source: source.name,
                                 "--batch-size"):
            console.print(f"note: {escape(note)}")
        if saved is None:
            if signum := stopping.requested():
                raise _stopped_first(signum)
            run.start_metrics = run.evaluate()
        summary = _train(run, output, meta, console)
    return summary


def _cannot_go_back(steps: int, reached: int, output: Path) -> ConfigError:
    return ConfigError(f"--steps {steps} is below the step the codebook training in {output} reached ({reached}): a "
                       f"run cannot go back; resume with --steps {reached} or more")


def _stopped_first(signum: int, resumed: bool = False) -> stopping.Stopped:
    """A stop before this run's first step: nothing new to save (a resumed run's state is as it was)."""
    if resumed:
        return stopping.Stopped(signum, f"stopped by {stopping.name(signum)} before resuming; its saved state is as it "
                                        "was: run the same command again to continue", "before resuming")
    return stopping.stopped_before_first_step(signum)


def _step_of(row: str) -> float:
    """A metrics line's step; a line a kill cut short has none (and is logged again)."""
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _train(run: CodebookRun, output: Path, meta: dict, console: Console) -> dict:
    settings, cfg = run.settings, run.cfg
    metrics_path = output / METRICS
    if run.step == 0:
        metrics_path.write_text("")
    else:  # rows logged after the saved step will be logged again
        kept = [r for r in metrics_path.read_text().splitlines() if _step_of(r) < run.step] \
            if metrics_path.is_file() else []
        metrics_path.write_text("".join(r + "\n" for r in kept))
    start, first = time.perf_counter(), run.step
    logged = first, start
    with progress_bar(console) as progress, metrics_path.open("a") as metrics:
        task = progress.add_task("dVAE", total=settings.steps, completed=run.step, info="")
        info = ""
        while run.step < settings.steps:
            try:
                row = run.train_step()
            except DataError as e:
                failed = _no_images(e, [s.source for s in run.stream.streams])
                if run.step > run.saved_at:  # the batch is drawn first: no stream moved for the failed step
                    run.save(output / STATE, meta)
                    failed = saved_before(failed, run.saved_at, output / STATE) if run.saved_at else failed
                raise failed from None
            except stopping.Abandoned:
                row = None  # the step's batch never came: the stop below saves the step before it
            if row is not None:
                now = time.perf_counter()
                row["images_per_s"] = (run.step - logged[0]) * settings.batch_size / (now - logged[1])
                logged = run.step, now
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                info = f"mse {row['reconstruction_mse']:.4f}"
                run.check_finite(output / STATE, read=False)  # the counts this row read
            rate = (run.step - first) * settings.batch_size / (time.perf_counter() - start)
            progress.update(task, completed=run.step, info=f"{info}  {rate:.0f} img/s")
            if run.step % settings.save_every == 0 and run.saved_at < run.step < settings.steps:
                run.save(output / STATE, meta)
            if (signum := stopping.requested()) and run.step < settings.steps:
                if run.step == 0:
                    raise _stopped_first(signum)
                if run.step > run.saved_at:
                    run.save(output / STATE, meta)
                at = f"at step {run.step} of {settings.steps}"
                stopped = f"stopped by {stopping.name(signum)} {at}"
                if run.saved_at == run.step:
                    raise stopping.Stopped(signum, f"{stopped}; saved in {output / STATE}: continue with the same "
                                                   "command and --resume", at)
                # Updates are being skipped: the save before them is kept (`CodebookRun.save`).
                go_on = f"step {run.saved_at} is kept in {output / STATE}: continue with the same command and " \
                        "--resume" if run.saved_at else "nothing was saved: run the same command again"
                raise stopping.Stopped(signum, f"{stopped}; its latest updates were skipped (not finite), so {go_on}, "
                                               "with a lower --lr if it diverges", at)
    run.check_finite(output / STATE)
    if run.saved_at < run.step:  # a stop at once in the final evaluation and writing keeps every step trained
        run.save(output / STATE, meta)
    encoder = run._finite_weights({k: v.detach().cpu() for k, v in run.encoder.state_dict().items()}, output / STATE)
    decoder = run._finite_weights({k: v.detach().cpu().contiguous() for k, v in run.decoder.state_dict().items()},
                                  output / STATE)
    end = run.evaluate(stoppable=True)
    if end is None:  # a stop after the last step: the evaluation and writing are left
        signum = stopping.requested()
        stopped = f"stopped by {stopping.name(signum)} after the last step, before the final evaluation"
        if run.saved_at == run.step:
            go_on = f"every step is saved in {output / STATE}: continue with the same command and --resume to " \
                    "evaluate and write the codebook"
        else:  # the last steps' updates were skipped (not finite): their save was withheld
            go_on = f"its latest updates were skipped (not finite), so step {run.saved_at} is kept in " \
                    f"{output / STATE}: continue with the same command and --resume" if run.saved_at else \
                "its latest updates were skipped (not finite) and nothing was saved: run the same command again"
        raise stopping.Stopped(signum, f"{stopped}; {go_on}", f"at step {run.step} of {settings.steps}")
    bad: dict[str, set] = {}
    for s in run.stream.streams:
        for reason, ids in s.bad.items():
            bad.setdefault(reason, set()).update(ids)
    outage = (settings.outage_minutes * 60, OUTAGE_SETTING)
    listed = sum(s.source.known_size or estimated_size(s.source, outage) for s in run.stream.streams)
    # As pretraining reports them: bad records, and those rejected while listing a source or
    # indexing a shard (a truncated shard, a sample without its image).
    rejected, where = DataAccounting({"images": run.stream}, 1).bad_records_where()
    if rejected:  # those met while listing first, then records in the order their first comes in the data
        order = [r for r in rejected if r not in bad] + sorted(bad, key=lambda r: min(bad[r]))
        console.print(escape("skipped " + ", ".join(
            f"{rejected[r]} ({r}" + (f", e.g. in {where[r]})" if r in where else ")") for r in order)))
    if run.nonfinite_steps:
        console.print(f"updates skipped for a non-finite loss or gradient: {run.nonfinite_steps}")
    # A source of shards without an index is sized from its first shard: the count is then an estimate.
    estimated = any(s.source.known_size is None for s in run.stream.streams)
    summary = {"start": run.start_metrics, "end": end, "history": run.history,
               "images": listed - sum(len(v) for v in bad.values()), "images_estimated": estimated,
               "bad_records": rejected, "bad_records_in": where,
               "nonfinite_steps": run.nonfinite_steps, "image_size": run.size, "device": run.device.type,
               "settings": dataclasses.asdict(settings)}

    def fill(tmp: Path) -> None:
        write_checkpoint_files(tmp, meta["model"], {"codebook": encoder},
                               extra={"codebook_training": {k: v for k, v in summary.items() if k != "history"}})
        save_file(decoder, str(tmp / "decoder.safetensors"))
        write_json_atomic(tmp / "codebook_report.json", summary)
        (tmp / METRICS).write_bytes(metrics_path.read_bytes())
        reconstruction_grid(run, tmp / "reconstructions.png")

    write_checkpoint_dir(output, fill, (METRICS, STATE, ".lock"))
    s, e = summary["start"], summary["end"]
    table = Table(title=f"image codebook before and after training (a fixed sample of {len(run.eval_pixels)} "
                        "training images, center crops)")
    for col in ("", "reconstruction MSE", "perplexity", "codes used"):
        table.add_column(col, justify="right")
    for name, r in (("start", s), ("end", e)):
        table.add_row(name, f"{r['reconstruction_mse']:.4f}", f"{r['perplexity']:.1f}",
                      f"{r['codes_used_count']}/{cfg.vocab_size} ({r['codes_used']:.0%})")
    console.print(table)
    console.print(f"saved to {output} (load with flava.load_codebook); reconstructions in "
                  f"{output / 'reconstructions.png'}")
    return summary
