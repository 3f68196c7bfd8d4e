"""From records to typed batches: decoding, the training transforms, tokenization, masking.

Order is a pure function of (seed, epoch, position): each process walks its own stride of a
seeded per-epoch permutation, and every sample's random crop and masks come from a generator
seeded by (seed, record index, epoch). A stream is resumed by its position alone. Records that
fail are skipped and counted by kind; the batch is filled from the following records, which is
deterministic too because a record fails the same way every time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import FlavaConfig, ObjectivesConfig
from ..errors import DataError
from .batch import IGNORE_INDEX, ImageBatch, PairBatch, TextBatch, attention_mask, pad_rows
from .masking import BlockMasking, TextMasking
from .sources import BadSample, ImageRecord, PairRecord, Source, open_image, read_caption
from .tokenizer import PAD_ID, TextTokenizer
from .transforms import map_pixels, normalize, random_resized_crop_box, to_tensor


@dataclass
class SampleSpec:
    """What one sample becomes; built from the model and objectives configs."""

    image_size: int
    codebook_image_size: int
    grid: int
    max_text_length: int
    image_mask_ratio: float = 75 / 196
    text_mask_probability: float = 0.15
    whole_word: bool = False
    crop_scale: tuple[float, float] = (0.9, 1.0)
    max_caption_chars: int = 2000
    """Captions longer than this are treated as broken data (a page pasted into a caption)."""
    tokenizer_file: str | None = None

    @classmethod
    def for_model(cls, model: FlavaConfig, objectives: ObjectivesConfig, max_text_length: int,
                  crop_scale_min: float) -> "SampleSpec":
        """What a model of config `model` trains on under `objectives`."""
        return cls(image_size=model.image.image_size, codebook_image_size=model.codebook_image_size,
                   grid=model.image.grid_size, max_text_length=max_text_length,
                   image_mask_ratio=objectives.image_mask_ratio,
                   text_mask_probability=objectives.text_mask_probability,
                   whole_word=objectives.whole_word_masking, crop_scale=(crop_scale_min, 1.0))


class SampleMaker:
    """Turns one record into tensors (picklable: it runs in loader workers)."""

    def __init__(self, spec: SampleSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.tokenizer = TextTokenizer(spec.tokenizer_file, max_length=spec.max_text_length)
        self.block_masking = BlockMasking.for_grid(spec.grid, spec.image_mask_ratio)
        self.text_masking = TextMasking.from_tokenizer(
            self.tokenizer, probability=spec.text_mask_probability, whole_word=spec.whole_word)

    def _image(self, ref, rng: np.random.Generator) -> dict:
        from PIL import Image

        image = open_image(ref)
        left, top, w, h = random_resized_crop_box(image.width, image.height, rng, self.spec.crop_scale)
        box = (left, top, left + w, top + h)
        s, cs = self.spec.image_size, self.spec.codebook_image_size
        # One crop feeds both the model and the codebook, so the targets describe what the model sees.
        crop = to_tensor(image.resize((s, s), Image.BICUBIC, box=box))
        pixels = normalize(crop)
        # When both inputs have one size (the tiny preset) the codebook reads the same pixels.
        codebook = map_pixels(crop if cs == s else to_tensor(image.resize((cs, cs), Image.BICUBIC, box=box)))
        patch_mask = torch.from_numpy(self.block_masking(rng).reshape(-1))
        return {"pixel_values": pixels, "codebook_pixels": codebook, "patch_mask": patch_mask}

    def _text(self, text: str, rng: np.random.Generator, caption: bool) -> dict:
        if not isinstance(text, str):
            raise BadSample("caption is not text" if caption else "text is not a string")
        text = text.strip()
        if not text:
            raise BadSample("empty caption" if caption else "empty text")
        if caption and len(text) > self.spec.max_caption_chars:
            raise BadSample("over-long caption")
        ids = np.asarray(self.tokenizer.encode([text])[0], dtype=np.int64)
        masked, labels = self.text_masking(ids, rng)
        return {"input_ids": torch.from_numpy(ids), "masked_input_ids": torch.from_numpy(masked),
                "mlm_labels": torch.from_numpy(labels)}

    def __call__(self, kind: str, record, key: tuple[int, int]) -> dict:
        rng = np.random.default_rng([self.seed, *key])
        if kind == "pairs":
            assert isinstance(record, PairRecord)
            caption = read_caption(record.caption)
            text = self._text(caption, rng, caption=True)
            return {**self._image(record.image, rng), **text}
        if kind == "images":
            ref = record.image if isinstance(record, ImageRecord) else record
            return self._image(ref, rng)
        return self._text(record, rng, caption=False)


def collate(kind: str, samples: list[dict]) -> PairBatch | ImageBatch | TextBatch:
    if kind in ("pairs", "text"):
        ids = [s["input_ids"] for s in samples]
        mask = attention_mask(ids)
        masked = pad_rows([s["masked_input_ids"] for s in samples], PAD_ID)
        labels = pad_rows([s["mlm_labels"] for s in samples], IGNORE_INDEX)
    if kind == "text":
        return TextBatch(masked, mask, labels)
    pixels = torch.stack([s["pixel_values"] for s in samples])
    codebook = torch.stack([s["codebook_pixels"] for s in samples])
    patch_mask = torch.stack([s["patch_mask"] for s in samples])
    if kind == "images":
        return ImageBatch(pixels, patch_mask, codebook_pixels=codebook)
    return PairBatch(pixels, pad_rows(ids, PAD_ID), mask, patch_mask, masked, labels, codebook_pixels=codebook)


@dataclass
class StreamOrder:
    """Which record a process reads at each of its positions.

    The records of all processes form one global stream: epoch permutations laid end to end.
    Each process owns every `world`-th block of `block` consecutive entries, so with `block`
    equal to the per-process batch the processes' batches, concatenated in rank order, are
    exactly the batch one process with the global batch size would read.
    """

    num_records: int
    seed: int
    rank: int = 0
    world: int = 1
    block: int = 1

    def __post_init__(self) -> None:
        if self.num_records < self.world * self.block:
            raise DataError(f"{self.num_records} records cannot fill a batch of {self.block} on each of "
                            f"{self.world} processes")
        self._perm_epoch, self._perm = -1, None

    def at(self, position: int) -> tuple[int, int]:
        """(record index, epoch) at this process's `position`."""
        blocks, offset = divmod(position, self.block)
        epoch, index = divmod((blocks * self.world + self.rank) * self.block + offset, self.num_records)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
            self._perm_epoch = epoch
        return int(self._perm[index]), epoch


class _Decoded(IterableDataset):
    """(position, record index, sample or failure kind) from `start` on; loader workers take turns."""

    def __init__(self, kind: str, source: Source, order: StreamOrder, maker: SampleMaker, start: int):
        self.kind, self.source, self.order, self.maker, self.start = kind, source, order, maker, start

    def __iter__(self):
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info is not None else (0, 1)
        position = self.start + k
        while True:
            index, epoch = self.order.at(position)
            try:
                out = self.maker(self.kind, self.source.records[index], (index, epoch))
            except BadSample as e:
                out = e.kind
            yield position, index, out
            position += n


@dataclass
class BatchStream:
    """Batches of one kind for one process, resumable from `position`."""

    kind: str
    source: Source
    maker: SampleMaker
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    num_workers: int = 0
    position: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Draws skipped, by reason (a bad record drawn in three epochs counts three times)."""
    bad: dict[str, set[int]] = field(default_factory=dict)
    """The bad records themselves, by reason (each counted once)."""

    def __post_init__(self) -> None:
        self.order = StreamOrder(len(self.source), self.seed, self.rank, self.world, self.batch_size)
        self._it = None

    def _iterator(self):
        dataset = _Decoded(self.kind, self.source, self.order, self.maker, self.position)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers else None,
                            persistent_workers=False)
        return iter(loader)

    def next_batch(self):
        """The next full batch; failures are skipped, counted, and replaced by later records."""
        if self._it is None:
            self._it = self._iterator()
        samples, misses = [], 0
        while len(samples) < self.batch_size:
            position, index, out = next(self._it)
            self.position = position + 1
            if isinstance(out, str):
                self.skipped[out] += 1
                self.bad.setdefault(out, set()).add(index)
                misses += 1
                if misses > 100 * self.batch_size and not samples:
                    raise DataError(f"{self.source.name}: no usable sample in the last {misses} records")
                continue
            samples.append(out)
        return collate(self.kind, samples)

    def state(self) -> dict:
        return {"position": self.position, "skipped": dict(self.skipped),
                "bad": {k: sorted(v) for k, v in self.bad.items()}}

    def load_state(self, state: dict) -> None:
        self.position = int(state["position"])
        self.skipped = Counter(state.get("skipped", {}))
        self.bad = {k: set(v) for k, v in state.get("bad", {}).items()}
        self._it = None
