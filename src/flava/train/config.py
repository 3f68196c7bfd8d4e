"""`flava pretrain` settings. Every field can be set with `--set section.field=value`.

The defaults are the paper's (base model, Table A.1's optimisation scaled to the run's batch);
the presets, the CPU demo's settings and the scaling are in `train.presets`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from ..config import (
    FlavaConfig,
    NonNegative,
    NonNegativeInt,
    ObjectivesConfig,
    Positive,
    PositiveInt,
    Probability,
    Range,
    Seed,
    preset,
)
from ..data.shards import is_remote
from ..objectives.dino_config import DinoConfig


@dataclass
class SourceSpec:
    """A data source with the share of its kind's draws it gets."""

    path: str
    """Any data spec (see `data.pairs`)."""
    weight: Positive = 1.0
    """Relative weight among the sources of its kind."""


DataSpec = str | SourceSpec


def anchored(value, existing: bool = False):
    """`value` (a path, a data spec, or a list of them) with its relative local paths made absolute
    against the working folder; remote specs (http, s3, pipe:, file://) as they are. `existing`:
    only paths that exist (a checkpoint setting may be a hub id instead)."""
    if isinstance(value, list):
        return [anchored(v, existing) for v in value]
    if isinstance(value, SourceSpec):
        return dataclasses.replace(value, path=anchored(value.path, existing))
    if not isinstance(value, str) or not value or is_remote(value) or value.startswith("file://"):
        return value
    path = Path(value).expanduser()
    return os.path.abspath(path) if not existing or path.exists() else value


def moved_away(value: str) -> bool:
    """Whether a codebook setting names a place that is no longer there: a codebook that moved
    may then be named where it is (a run's checkpoints hold the one it trained with)."""
    return bool(value) and not Path(anchored(value)).exists()


@dataclass
class DataConfig:
    """Where the samples come from and how they are batched."""

    pairs: list[DataSpec] = field(default_factory=list)
    """Image-text pair sources: WebDataset .tar shards (a file, directory, glob or brace range
    `shards/{00000..06999}.tar`; local, http(s)://, s3:// or `pipe:CMD`; or the index.json of
    `flava prepare`), .csv/.tsv/.jsonl tables (columns image, caption), parquet files, or a Hugging Face
    dataset saved to disk (`DIR`, `DIR:train`, `DIR:train?image=jpg&caption=txt`). Each item a
    spec (sources then weigh by their size) or {"path": spec, "weight": w}. With no data of any
    kind named, the packaged demo data; otherwise an empty kind is left out."""
    images: list[DataSpec] = field(default_factory=list)
    """Image folders, tar shards (`.jpg` + optional `.cls`), parquet files or Hugging Face datasets on
    disk (`?image=col`); items as in `pairs`. Empty: the packaged demo images when no data of any
    kind is named."""
    text: list[DataSpec] = field(default_factory=list)
    """.txt (a text per line) or .jsonl ("text" field) files, optionally compressed (.gz, .bz2, .xz,
    .zst), local or remote; parquet files or Hugging Face datasets on disk (`?text=col`); items as
    in `pairs`. Empty: the packaged demo text when no data of any kind is named."""
    mixing: list[NonNegative] = field(default_factory=lambda: [0.70, 0.15, 0.15])
    """Probability that a step trains on pairs, images, text (paper Table A.2)."""
    batch_size: PositiveInt = 32
    """Samples per step on each process."""
    num_workers: NonNegativeInt | None = None
    """Loader worker processes per data source. null (the default): one on the CPU (the step needs
    the cores); on a GPU the host's cores less one per process, shared by the kinds by their share
    of the steps and by each kind's sources (`data.pipeline.auto_workers`: 1 to 8 a kind), said at
    the start."""
    lanes: NonNegativeInt = 0
    """The most shards each source's stream reads side by side (0: 64). A stream uses the largest
    divisor of the global batch (processes x batch_size) up to this and its shard count, and keeps
    it when resumed. With many processes, a multiple of the process count lets each read only its
    own shards."""
    cache_dir: str = ""
    """Keep remote shards in this directory (read from there after the first epoch); empty: remote
    shards are read into memory each time a stream reaches them."""
    cache_limit_gb: Positive = 50.0
    """Largest size of `cache_dir`; the least recently used shards are removed beyond it. A shard
    removed while a lane reads it stays readable to that lane (its space is freed when the last
    reader closes it: each process keeps up to 128 shards open), so give it room for the shards read
    side by side, lanes x shard size, or the cache fetches them over and over."""
    outage_minutes: Annotated[float, Range(0, 10_080)] = 30.0
    """How long a stream waits for a remote shard whose store cannot serve it now (no connection, no
    answer, or "come back later": HTTP 408, 429, 500, 502, 503, 504, S3's SlowDown), reading it
    again meanwhile; then the run ends with its steps saved, to be resumed. Waiting, not passing over
    the shard, keeps what the run trains on independent of the network, and its resume exact. 0:
    such a shard is counted and passed over at once, as a damaged one is. Under torchrun the
    process group's timeout is at least this plus 30 minutes, so that the others wait as long; a
    stop request is taken at once all the same (the processes agree after each draw)."""
    max_text_length: Annotated[int, Range(3)] = 64
    """Tokens per text, [CLS] and [SEP] included; longer texts are truncated."""
    crop_scale_min: Annotated[float, Range(0, 1, low_open=True)] = 0.9
    """RandomResizedCrop keeps at least this share of the image."""
    mixing_schedule: Literal["constant", "linear", "adaptive"] = "constant"
    """'constant': every step draws its kind by `mixing`; 'linear': the probabilities move in a
    straight line from `mixing` at the first step to `mixing_end` at the last (e.g. from
    unimodal-heavy [0.2, 0.4, 0.4] to pair-heavy [0.8, 0.1, 0.1]); 'adaptive': every
    `mixing_window` steps each kind's share is re-weighted by its loss progress (a kind whose loss
    stops falling gets more steps; train/balancing/mixing.py). Either way the same on every process
    and after a resume."""
    mixing_end: list[NonNegative] = field(default_factory=list)
    """The [pairs, images, text] probabilities a 'linear' mixing_schedule reaches at the last step."""
    mixing_window: PositiveInt = 50
    """Steps over which an 'adaptive' mixing_schedule averages each kind's loss; the mix changes at
    each window's end and is `mixing` for the first two windows."""
    mixing_temperature: Positive = 2.0
    """The 'adaptive' mix's temperature T: larger keeps it nearer `mixing` (DWA's 2)."""


@dataclass
class OptimConfig:
    """AdamW, linear warmup then cosine decay (defaults: the paper's, Table A.1)."""

    lr: Positive = 1e-3
    """Peak learning rate at `reference_batch` (when that is set; else as given). Stage image-dino
    uses `dino.lr` instead."""
    weight_decay: NonNegative = 0.1
    """AdamW weight decay (not applied to norms, biases, tokens and the logit scale). Stage
    image-dino uses DINO's schedule (`dino.weight_decay` -> `dino.weight_decay_end`) instead."""
    beta1: Annotated[float, Range(0, 1, high_open=True)] = 0.9
    """AdamW's first-moment decay."""
    beta2: Annotated[float, Range(0, 1, high_open=True)] = 0.999
    """AdamW's second-moment decay."""
    eps: Positive = 1e-8
    """AdamW's epsilon."""
    warmup_steps: NonNegativeInt = 10_000
    """Steps of linear warmup from 0 to `lr` at `reference_batch` (when that is set; else as given);
    cosine decay after."""
    reference_batch: NonNegativeInt = 8192
    """The global batch `lr` and `warmup_steps` are given for (the paper's 8,192). A run with another
    global batch (processes x data.batch_size x grad_accumulation) scales lr by the square root of
    the ratio (never above lr) and keeps the warm-up's samples, up to the paper's share of the run
    (train/presets.py says why) and prints what it chose. 0: lr and warmup_steps as given."""
    min_lr_ratio: Probability = 0.0
    """Final learning rate as a share of `lr`."""
    init_lr_scale: Probability = 1.0
    """Learning-rate multiplier of the encoders a joint run initialises with init_image, init_text or
    init_multimodal (their embeddings and transformer blocks; projections and heads keep `lr`). 1:
    one rate for everything, as the paper trains; below 1 keeps more of what the unimodal stages
    learned (the CPU demo uses 0.1 for its text encoder: BENCHMARKS.md)."""
    init_lr_scaled: list[Literal["text", "image", "multimodal"]] = field(
        default_factory=lambda: ["text", "image", "multimodal"])
    """Which initialised encoders learn at init_lr_scale x lr (the others at lr), e.g. ["text"]."""
    grad_clip: NonNegative = 1.0
    """Largest global gradient norm; 0 turns clipping off. Stage image-dino clips each parameter's
    gradient to `dino.clip_grad` instead."""
    grad_accumulation: PositiveInt = 1
    """Batches whose gradients are summed before each optimizer step."""
    contrastive_chunks: PositiveInt = 1
    """Encode and back-propagate each batch in this many equal chunks, one after another: the
    activations' memory falls about this many times while the global contrastive loss (softmax or
    sigmoid) stays the whole batch's, by GradCache (the batch's embeddings cached without
    autograd, the loss's gradient on them, then each chunk's backward from it: one more forward
    of the contrastive encoders). The other objectives run per chunk, divided by the whole
    batch's count of masked tokens or ITM rows, so they add up to the batch's loss; ITM draws its
    negatives within a chunk. Image and text steps are split too. Must divide data.batch_size;
    not for stage image-dino. Unlike grad_accumulation, the contrastive loss spans the batch."""


@dataclass
class TrainConfig:
    model: FlavaConfig = field(default_factory=lambda: preset("base"))
    """The model (a preset's fields)."""
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    """Loss weights, ITM negatives, masking."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources, mixing and batching."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    stage: Literal["joint", "text-mlm", "image-mim", "image-dino"] = "joint"
    """'text-mlm' (text encoder alone), 'image-mim' (image encoder alone), 'image-dino' (the image
    encoder by DINO self-distillation on the image data; its teacher's encoder is what a joint run's
    `init_image` takes from it) or 'joint'."""
    dino: DinoConfig = field(default_factory=DinoConfig)
    """DINO's head, loss, schedules and multi-crop views (stage 'image-dino' only)."""
    max_steps: PositiveInt = 214_286
    """Optimizer steps (the paper's: PMD drawn for 150k updates at probability 0.70); the cosine
    decays over them."""
    seed: Seed = 0
    """Seeds initialisation, the data order, crops, masks and ITM negatives."""
    log_every: PositiveInt = 10
    """Write metrics every this many steps."""
    diagnose_every: NonNegativeInt = 100
    """Measure the gradient diagnostics (each objective's gradient norm on each shared encoder and
    their cosines) on the logged step at or after every this many steps, and on the last; 0:
    never. Each measurement costs one backward per objective (a pair step of the `tiny` preset at
    224 px takes 1.7 times as long), so logging every step does not measure every step."""
    save_every: PositiveInt = 200
    """Write a checkpoint every this many steps (and at the last)."""
    keep_last: PositiveInt = 2
    """Checkpoints kept on disk (the newest ones)."""
    keep_every: NonNegativeInt = 0
    """Also save, and keep for good, the checkpoint of every step that is a multiple of this (0:
    none): milestones to evaluate a run's progress by or to go back to, beyond the newest `keep_last`."""
    codebook: str = ""
    """Directory of the image codebook (`flava train-codebook`); needed for MIM/MMM."""
    init: str = ""
    """Checkpoint to start the whole model from: ours (checkpoints/step_N or a run directory) or a
    transformers FLAVA directory. Read at the run's start only: a resumed run reads its own."""
    init_image: str = ""
    """Checkpoint to take the image encoder and image_projection from, after `init`: ours
    (checkpoints/step_N or a run directory, e.g. an `image-mim` stage, or an `image-dino` stage,
    whose teacher's encoder is taken), a transformers FLAVA directory, or a transformers ViT
    directory (the paper starts from DINO ViT-B/16), or another public image tower: DeiT, DINOv2
    (with or without registers), CLIP (vision or whole). A tower decides model.image: its
    architecture, image size (see init_image_size) and pixel statistics; image_projection and
    image_to_mm_projection follow its width. In stage 'image-dino' it starts the student's and
    teacher's encoder (e.g. from facebook/dino-vitb16) and the DINO head is fresh."""
    init_image_size: NonNegativeInt = 0
    """When init_image is a public image tower (a transformers ViT, DeiT, DINOv2 or CLIP): the
    image side to run it at, its position table resized to fit. 0: the tower's own (its
    processor's crop size, else its config's image_size). The tower also decides the rest of
    model.image (architecture, pixel statistics)."""
    init_text: str = ""
    """Checkpoint to take the text encoder and text_projection from, after `init`: ours (e.g. a
    `text-mlm` stage's run directory), a transformers FLAVA directory, or a BERT-family text tower
    (a transformers BERT, MiniLM, RoBERTa, XLM-R, CamemBERT, ELECTRA or DistilBERT directory or hub
    id; `minilm`: the packaged all-MiniLM-L6-v2), whose MLM head is taken too where it fits. The
    model's text settings and its tokenizer follow it."""
    init_multimodal: str = ""
    """Checkpoint to take the multimodal encoder and the image/text-to-multimodal projections from,
    after `init`: ours or a transformers FLAVA directory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (this process's GPU under torchrun when CUDA is present, else the CPU), 'cpu', 'cuda'."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """'fp32', 'bf16' or 'fp16' autocast (LayerNorms and losses stay float32; fp16 adds loss scaling)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass: less memory, about a third more compute."""
    compile: bool = False
    """torch.compile each transformer block (the first steps are slow while it compiles)."""
    compile_backend: str = "inductor"
    """torch.compile backend ('inductor'; 'aot_eager' or 'eager' to debug)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: 'ddp' (replicated weights) or 'fsdp' (weights, gradients and optimizer state
    sharded over the processes)."""
    max_nonfinite_steps: PositiveInt = 5
    """Steps in a row whose loss or gradients are not finite (their updates are skipped and
    counted) before the run stops as diverged."""
    tensorboard: bool = True
    """Also write the logged metrics as TensorBoard events to OUTPUT/tensorboard."""
