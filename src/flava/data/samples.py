"""What one record becomes: the sample makers (pretraining's crops, codebook views, masks and
tokenised, masked captions; DINO's multi-crop views), each drawing every choice from a generator
seeded by (seed, position), and how loader workers collate their samples into batches and the
training process joins the workers' parts (a few whole-tensor operations per batch)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..config import FlavaConfig, ObjectivesConfig
from ..errors import DataError
from .batch import IGNORE_INDEX, ImageBatch, PairBatch, TextBatch, attention_mask, pad_rows
from .decode import decode_crop
from .masking import BlockMasking, TextMasking
from .members import BadSample
from .multicrop import MultiCropBatch, MultiCropSpec, collate_multicrop, multi_crop
from .sources import ImageRecord, PairRecord, read_caption
from .tokenizer import TextTokenizer
from .transforms import codebook_view, lies_channels_last, random_resized_crop_box, stack_views


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
    """The model's tokenizer (a tokenizer.json or a directory holding one); None: BERT uncased."""
    image_vocab_size: int | None = None
    """The image tokens the MIM/MMM heads predict (None: no check): prepared ids beyond them are bad samples."""

    @classmethod
    def for_model(cls, model: FlavaConfig, objectives: ObjectivesConfig, max_text_length: int,
                  crop_scale_min: float, tokenizer_file: str | None = None) -> "SampleSpec":
        """What a model of config `model` (whose tokenizer is `tokenizer_file`) trains on under `objectives`."""
        return cls(image_size=model.image.image_size, codebook_image_size=model.codebook_image_size,
                   grid=model.image.grid_size, max_text_length=max_text_length,
                   image_mask_ratio=objectives.image_mask_ratio,
                   text_mask_probability=objectives.text_mask_probability,
                   whole_word=objectives.whole_word_masking, crop_scale=(crop_scale_min, 1.0),
                   tokenizer_file=tokenizer_file)


class SampleMaker:
    """Turns records into batches (picklable: it runs in loader workers, which hand over whole
    batches). Pixels stay uint8 until the device: a batch's `to` normalises them there."""

    def __init__(self, spec: SampleSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.tokenizer = TextTokenizer(spec.tokenizer_file, max_length=spec.max_text_length)
        self.block_masking = BlockMasking.for_grid(spec.grid, spec.image_mask_ratio)
        self.text_masking = TextMasking.from_tokenizer(
            self.tokenizer, probability=spec.text_mask_probability, whole_word=spec.whole_word)

    def _image(self, ref, rng: np.random.Generator, prepared=None) -> dict:
        s = self.spec.image_size
        targets: list[torch.Tensor] = []

        def choose(width: int, height: int) -> tuple[float, float, float, float]:
            if prepared is None:
                left, top, w, h = random_resized_crop_box(width, height, rng, self.spec.crop_scale)
                return left, top, left + w, top + h
            # One of the crops `flava prepare` tokenised, with its stored image-token ids as targets.
            crops, tokens = read_npy(prepared.crops), read_npy(prepared.tokens)
            if crops.ndim != 2 or crops.shape[1] != 4 or tokens.shape != (len(crops), self.spec.grid ** 2):
                raise BadSample("prepared tokens do not fit the model's patch grid")
            # Shards whose index was not found (remote ones named by a glob) are not checked at the start:
            # an id past the heads had ended the run in a traceback from the loss.
            vocab = self.spec.image_vocab_size
            if vocab is not None and tokens.size and int(tokens.max()) >= vocab:
                raise BadSample("prepared tokens beyond the model's image.vocab_size")
            k = int(rng.integers(len(crops)))
            targets.append(torch.from_numpy(tokens[k].astype(np.int64)))
            return tuple(float(v) for v in crops[k] * np.array([width, height] * 2))

        # The codebook's view is made from the batch of these (`collate`), unless it is larger than
        # the model's (patches under 8 px): then from the crop itself, as `flava prepare` tokenises it,
        # both from a decode that covers the larger (prepared or not, the model's pixels are one).
        cs = self.spec.codebook_image_size
        own_view = prepared is None and cs > s
        pixels, *codebook = decode_crop(ref, choose, s, cs) if own_view else \
            decode_crop(ref, choose, s, side=max(s, cs))
        patch_mask = torch.from_numpy(self.block_masking(rng).reshape(-1))
        if prepared is not None:
            return {"pixel_values": pixels, "image_targets": targets[0], "patch_mask": patch_mask}
        if own_view:
            return {"pixel_values": pixels, "codebook_pixels": codebook[0], "patch_mask": patch_mask}
        return {"pixel_values": pixels, "patch_mask": patch_mask}

    def _text(self, text: str, rng: np.random.Generator, caption: bool) -> dict:
        if not isinstance(text, str):
            raise BadSample("caption is not text" if caption else "text is not a string")
        text = text.strip()
        if not text:
            raise BadSample("empty caption" if caption else "empty text")
        if caption and len(text) > self.spec.max_caption_chars:
            raise BadSample("over-long caption")
        ids = np.asarray(self.tokenizer.encode_one(text), dtype=np.int64)
        masked, labels = self.text_masking(ids, rng)
        return {"input_ids": ids, "masked_input_ids": masked, "mlm_labels": labels}

    def __call__(self, kind: str, record, key: tuple[int, ...]) -> dict:
        rng = np.random.default_rng([self.seed, *key])
        if kind == "pairs":
            assert isinstance(record, PairRecord)
            caption = read_caption(record.caption)
            text = self._text(caption, rng, caption=True)
            return {**self._image(record.image, rng, record.prepared), **text}
        if kind == "images":
            if isinstance(record, ImageRecord):
                return self._image(record.image, rng, record.prepared)
            return self._image(record, rng)
        return self._text(record, rng, caption=False)

    def collate(self, kind: str, samples: list[dict]) -> PairBatch | ImageBatch | TextBatch:
        return collate(kind, samples, self.tokenizer.pad_id, self.spec.codebook_image_size)

    def merge(self, parts: list[tuple[list[int], object]]) -> PairBatch | ImageBatch | TextBatch:
        """One batch from the parts loader workers made ((slots, batch) each), in slot order."""
        pad = self.tokenizer.pad_id
        return merge_batches(parts, {"input_ids": pad, "masked_input_ids": pad, "attention_mask": 0,
                                     "mlm_labels": IGNORE_INDEX})


class MultiCropMaker:
    """Turns an image record into DINO's multi-crop views (`multi_crop`), every choice drawn from
    a generator seeded by (seed, position) as `SampleMaker` does, so a resumed run sees the same
    crops. Prepared shards' image tokens are not read: DINO needs none. `colour_on_device`: the
    crops leave the workers as uint8 with their colour rows, and the batch's `to` colours them on
    the device (a GPU's share of the work; on the CPU the workers finish them)."""

    def __init__(self, spec: MultiCropSpec, seed: int, colour_on_device: bool = False):
        self.spec, self.seed, self.colour_on_device = spec, seed, colour_on_device

    def __call__(self, kind: str, record, key: tuple[int, ...]):
        if kind != "images":
            raise DataError(f"DINO trains on images; it got a {kind} source")
        rng = np.random.default_rng([self.seed, *key])
        return multi_crop(record.image if isinstance(record, ImageRecord) else record, self.spec, rng,
                          coloured=not self.colour_on_device)

    def collate(self, kind: str, samples: list) -> MultiCropBatch:
        return collate_multicrop(samples)

    def merge(self, parts: list[tuple[list[int], MultiCropBatch]]) -> MultiCropBatch:
        """Crop-major parts joined image by image, in slot order."""
        parts = [(slots, b) for slots, b in parts if b is not None]
        if len(parts) == 1:
            return parts[0][1]
        order = _slot_order([s for slots, _ in parts for s in slots])

        def join(name: str) -> torch.Tensor | None:
            views = [getattr(b, name) for _, b in parts]
            if views[0] is None:
                return None
            per = [v.unflatten(0, (-1, len(slots))) for v, (slots, _) in zip(views, parts)]
            whole = torch.cat(per, dim=1)
            return (whole if order is None else whole.index_select(1, order)).flatten(0, 1)
        return MultiCropBatch(*(join(f.name) for f in fields(MultiCropBatch)))


def _slot_order(slots: list[int]) -> torch.Tensor | None:
    """The permutation that sorts `slots`, or None when they are in order already."""
    if all(a < b for a, b in zip(slots, slots[1:])):
        return None
    return torch.from_numpy(np.argsort(np.asarray(slots), kind="stable"))


def merge_batches(parts: list[tuple[list[int], object]], pad: dict[str, int]):
    """Workers' parts of one batch -> the batch in slot order: each field concatenated (fields
    padded on their last dimension with `pad[name]` where lengths differ), then reordered by slot.
    A few whole-tensor operations whatever the batch size: the training process does no
    per-sample work."""
    parts = [(slots, b) for slots, b in parts if b is not None]
    if len(parts) == 1:
        return parts[0][1]
    order = _slot_order([s for slots, _ in parts for s in slots])
    first = parts[0][1]
    out: dict = {}
    merged: dict[int, torch.Tensor] = {}
    for f in fields(first):
        values = [getattr(b, f.name) for _, b in parts]
        if values[0] is None:
            out[f.name] = None
            continue
        if id(values[0]) in merged:  # a field sharing another's tensor (the codebook's pixels) still does
            out[f.name] = merged[id(values[0])]
            continue
        if f.name in pad:
            longest = max(v.shape[-1] for v in values)
            values = [torch.nn.functional.pad(v, (0, longest - v.shape[-1]), value=pad[f.name]) for v in values]
        whole = torch.cat(values)  # channels-last parts stay so
        if order is not None:
            # index_select copies whole rows; indexing (`whole[order]`) gathered a uint8 batch's
            # pixels one by one, 15 times slower. It makes its result contiguous: channels-last
            # rows are reordered as the bytes lie.
            whole = whole.permute(0, 2, 3, 1).index_select(0, order).permute(0, 3, 1, 2) \
                if lies_channels_last(whole) else whole.index_select(0, order)
        out[f.name] = merged[id(getattr(first, f.name))] = whole
    return type(first)(**out)


def collate(kind: str, samples: list[dict], pad_id: int = 0, codebook_size: int | None = None
            ) -> PairBatch | ImageBatch | TextBatch:
    """Samples of one kind into a batch, texts padded with `pad_id` (the tokenizer's), pixels
    channels-last (`stack_views`). Unprepared images get the codebook's view of the model's
    (`codebook_view`, at `codebook_size`; None: the model's size) where their samples carry none."""
    if kind in ("pairs", "text"):
        ids = [s["input_ids"] for s in samples]
        mask = attention_mask(ids)
        masked = pad_rows([s["masked_input_ids"] for s in samples], pad_id)
        labels = pad_rows([s["mlm_labels"] for s in samples], IGNORE_INDEX)
    if kind == "text":
        return TextBatch(masked, mask, labels)
    pixels = stack_views([s["pixel_values"] for s in samples])
    patch_mask = torch.stack([s["patch_mask"] for s in samples])
    # A draw comes from one source, so its samples are all prepared (targets) or all raw (codebook input).
    if "image_targets" in samples[0]:
        targets = {"image_targets": torch.stack([s["image_targets"] for s in samples])}
    elif "codebook_pixels" in samples[0]:
        targets = {"codebook_pixels": stack_views([s["codebook_pixels"] for s in samples])}
    else:
        # With one size for both (the tiny preset) the codebook reads the model's own tensor.
        targets = {"codebook_pixels": codebook_view(pixels, codebook_size or pixels.shape[-1])}
    if kind == "images":
        return ImageBatch(pixels, patch_mask, **targets)
    return PairBatch(pixels, pad_rows(ids, pad_id), mask, patch_mask, masked, labels, **targets)


def read_npy(member) -> np.ndarray:
    import io

    try:
        return np.load(io.BytesIO(member.read()), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise BadSample("unreadable prepared tokens") from None
