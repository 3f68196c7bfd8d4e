"""DINO's multi-crop augmentation (Caron et al., 2021, §3.1 and `DataAugmentationDINO`) in torch.

Each image gives two global crops (RandomResizedCrop over 40-100 % of the area) and N local
crops (5-40 %, at a smaller size). Every crop is flipped with p = 0.5, colour-jittered with
p = 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order), turned grey
with p = 0.2 and Gaussian-blurred (p = 1.0 for the first global crop, 0.1 for the second, 0.5
for local crops); the second global crop is also solarized with p = 0.2. The crops are then
normalised by the model's pixel statistics (FLAVA's: CLIP's), as its other image inputs are.

The decoding (at the DCT scale the crops need) and the geometry (crop, resize, flip) are per image,
in a loader worker; the photometric steps take a whole batch of uint8 crops and each crop's drawn
choices (a colour row), so on a GPU they run there and a worker's share of an image is its decoding
and crops alone.

Every random choice is drawn from the `numpy.random.Generator` passed in, so with the
pipeline's `default_rng([seed, *position])` a sample's crops are a pure function of
(seed, position) and a resumed run sees the same crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from .decode import Box, check_size, decode_boxes
from .members import ImageRef
from .transforms import CLIP_MEAN, CLIP_STD, Stats, crop_resize, random_resized_crop_box, to_rgb

# The reference recipe is written for 224 px global crops; blur radii scale from there.
REFERENCE_SIZE = 224
BLUR_RADIUS = (0.1, 2.0)
"""Gaussian blur radius range, in pixels of a 224 px crop."""
SOLARIZE_THRESHOLD = 128


@dataclass(frozen=True)
class MultiCropSpec:
    """What one image is cut into."""

    global_size: int
    """Side of the two global crops: the model's image size."""
    local_size: int
    """Side of the local crops (DINO: 96 px for a 224 px model)."""
    local_crops: int = 8
    """Number of local crops per image (DINO's default: 8)."""
    global_scale: tuple[float, float] = (0.4, 1.0)
    """Share of the image area a global crop covers."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Share of the image area a local crop covers."""
    mean: tuple[float, ...] = CLIP_MEAN
    """Per-channel mean the crops are normalised with (the model's image_mean)."""
    std: tuple[float, ...] = CLIP_STD
    """Per-channel standard deviation the crops are normalised with (the model's image_std)."""

    @property
    def blur_radius(self) -> tuple[float, float]:
        """The reference radius range scaled to this global size, so a blur removes the same
        share of detail at any model size (exactly DINO's at 224 px)."""
        f = self.global_size / REFERENCE_SIZE
        return BLUR_RADIUS[0] * f, BLUR_RADIUS[1] * f


@dataclass
class MultiCropSample:
    """The crops of one image: float32 and normalised, or (`multi_crop(coloured=False)`) uint8
    with the colour rows `colour` finishes them with."""

    global_crops: torch.Tensor
    """[2, 3, global_size, global_size]."""
    local_crops: torch.Tensor
    """[local_crops, 3, local_size, local_size]."""
    global_colour: torch.Tensor | None = None
    """[2, COLOUR_ROW] for uint8 crops, else None."""
    local_colour: torch.Tensor | None = None

    def coloured(self, mean: Stats, std: Stats) -> "MultiCropSample":
        if self.global_colour is None:
            return self
        return MultiCropSample(colour(self.global_crops, self.global_colour, mean, std),
                               colour(self.local_crops, self.local_colour, mean, std))


@dataclass
class MultiCropBatch:
    """The crops of B images, crop-major: rows [k*B, (k+1)*B) are crop k of every image, the
    order the DINO loss pairs teacher and student views by. Finished (float32, normalised), or
    uint8 with colour rows: `to` finishes them on the device."""

    global_crops: torch.Tensor
    """[2*B, 3, G, G]."""
    local_crops: torch.Tensor | None
    """[N*B, 3, L, L], or None with no local crops."""
    global_colour: torch.Tensor | None = None
    """[2*B, COLOUR_ROW] for uint8 crops, else None."""
    local_colour: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False, mean: Stats = CLIP_MEAN,
           std: Stats = CLIP_STD) -> MultiCropBatch:
        """The crops on `device`, uint8 ones coloured and normalised (by `mean`/`std`, the model's) there."""
        def finish(crops: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
            if crops is None:
                return None
            crops = crops.to(device, non_blocking=non_blocking)
            return crops if rows is None else colour(crops, rows.cpu(), mean, std)
        return MultiCropBatch(finish(self.global_crops, self.global_colour),
                              finish(self.local_crops, self.local_colour))

    def pin_memory(self) -> MultiCropBatch:
        """The crops in page-locked memory (the colour rows are read on the host)."""
        local = self.local_crops.pin_memory() if self.local_crops is not None else None
        return MultiCropBatch(self.global_crops.pin_memory(), local, self.global_colour, self.local_colour)

    def __len__(self) -> int:
        """Images, not crops."""
        return self.global_crops.shape[0] // 2


# A crop's colour row: what its photometric steps drew (in the order DINO draws them), so that the
# steps can run on a whole batch wherever it is (a GPU) with the same choices as in a worker.
JITTER, FACTORS, ORDER, GREY, SIGMA, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11
COLOUR_ROW = 12
JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
"""Brightness, contrast and saturation factors and the hue shift (of a turn): DINO's ColorJitter(0.4, 0.4, 0.2, 0.1)."""


def _draw(width: int, height: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
          spec: MultiCropSpec, rng: np.random.Generator) -> tuple[Box, bool, np.ndarray]:
    """A crop's choices, drawn in DINO's order: its box (in the stored image's pixels), whether it
    is flipped, and its colour row."""
    left, top, w, h = random_resized_crop_box(width, height, rng, scale)
    flip = bool(rng.random() < 0.5)
    row = np.zeros(COLOUR_ROW, dtype=np.float32)
    if rng.random() < 0.8:
        row[JITTER] = 1
        row[FACTORS] = [rng.uniform(*r) for r in JITTER_RANGES]
        row[ORDER] = rng.permutation(4)  # the four adjustments in a random order, as ColorJitter
    row[GREY] = rng.random() < 0.2
    if rng.random() < blur_p:
        row[SIGMA] = rng.uniform(*spec.blur_radius)
    if solarize_p and rng.random() < solarize_p:
        row[SOLARIZE] = 1
    return (left, top, left + w, top + h), flip, row


def multi_crop(image: ImageRef | np.ndarray, spec: MultiCropSpec, rng: np.random.Generator,
               coloured: bool = True) -> MultiCropSample:
    """Two global and `spec.local_crops` local crops of `image` (a stored image, decoded here at the
    smallest fast DCT scale that still gives every crop its size; or one in memory), every choice drawn
    from `rng`. An image too large or too thin raises BadSample, as decoding it does.
    `coloured=False`: uint8 crops and their colour rows, for `colour` to finish where the batch goes."""
    g, loc = spec.global_size, spec.local_size
    kinds = [(g, spec.global_scale, 1.0, 0.0), (g, spec.global_scale, 0.1, 0.2),
             *[(loc, spec.local_scale, 0.5, 0.0)] * spec.local_crops]
    drawn: list = []

    def plan(width: int, height: int) -> list[tuple[Box, int]]:
        drawn[:] = [_draw(width, height, *k[1:], spec, rng) for k in kinds]
        return [(box, k[0]) for (box, _, _), k in zip(drawn, kinds)]
    if isinstance(image, np.ndarray):
        arr = np.array(to_rgb(image))  # writable: torch reads it
        check_size(arr.shape[1], arr.shape[0])  # as a decoded image is
        boxes = [box for box, _ in plan(arr.shape[1], arr.shape[0])]
    else:
        arr, boxes = decode_boxes(image, plan)
    pixels = []
    for box, (_, flip, _), (size, *_) in zip(boxes, drawn, kinds):
        (crop,) = crop_resize(arr, box, size)
        pixels.append(crop.flip(-1) if flip else crop)
    rows = torch.from_numpy(np.stack([row for _, _, row in drawn]))
    local = torch.stack(pixels[2:]) if spec.local_crops else torch.empty(0, 3, loc, loc, dtype=torch.uint8)
    sample = MultiCropSample(torch.stack(pixels[:2]), local, rows[:2], rows[2:])
    return sample.coloured(spec.mean, spec.std) if coloured else sample


def _grey(y: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] -> [n, 1, H, W] luma (ITU-R 601-2, PIL's "L")."""
    return (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)


def _blend(y: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (y * f).add_(other * (1 - f)).clamp_(0, 1)


def _hue(y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each crop's hue turned by `shift` of a full turn; saturation and value kept."""
    v, largest = y.max(1, keepdim=True)
    c = v - y.amin(1, keepdim=True)
    # Hue in sixths of a turn: 2 x the largest channel's index, plus (next - the one after) / chroma.
    d = y.roll(-1, 1).sub_(y.roll(-2, 1)).gather(1, largest)
    h = d.div_(torch.where(c > 0, c, 1.0)).add_(2 * largest).add_(6 * shift.view(-1, 1, 1, 1))
    # Each channel from the turned hue (the closed form of HSV to RGB): v - c * clamp(min(k, 4 - k), 0, 1).
    k = torch.cat([h + n for n in (5, 3, 1)], 1).remainder_(6)
    return v - c * torch.minimum(k, 4 - k).clamp_(0, 1)


def _blur(y: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Each crop blurred by a Gaussian of its own `sigma` (pixels), separably, edges repeated;
    `radius`: at least the largest 3 sigma."""
    n, ch, hh, ww = y.shape
    t = torch.arange(-radius, radius + 1, device=y.device, dtype=y.dtype)
    # Each kernel cut at its own 3 sigma, so a crop's blur does not depend on the batch it is in.
    sigma = sigma.view(-1, 1)
    k = torch.exp(-t.square() / (2 * sigma.square())) * (t.abs() <= torch.ceil(3 * sigma))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # [n * ch, 2 radius + 1]
    x = torch.nn.functional.pad(y.reshape(1, n * ch, hh, ww), (radius, radius, radius, radius), mode="replicate")
    x = torch.nn.functional.conv2d(x, k.view(n * ch, 1, 1, -1), groups=n * ch)
    x = torch.nn.functional.conv2d(x, k.view(n * ch, 1, -1, 1), groups=n * ch)
    return x.view(n, ch, hh, ww)


_JITTER_STEPS = (
    lambda y, f: (y * f).clamp_(0, 1),                                    # brightness: towards black
    lambda y, f: _blend(y, _grey(y).mean((1, 2, 3), keepdim=True), f),    # contrast: towards the mean grey
    lambda y, f: _blend(y, _grey(y), f),                                  # saturation: towards its grey
    lambda y, f: _hue(y, f),
)


def colour(pixels: torch.Tensor, rows: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """DINO's photometric steps, batched: [n, 3, S, S] uint8 crops on any device and their colour
    rows ([n, COLOUR_ROW], on the host: which crops take which step is worked out there) ->
    float32 normalised by `mean`/`std`. Colour jitter with p = 0.8 (its four adjustments in the
    crop's order), greyscale, Gaussian blur and solarization, as DINO's PIL steps, in floating
    point rather than rounded to 8 bits after each. The crops' index lists and factors reach a
    GPU in two copies that do not wait for it."""
    host = rows.numpy()
    steps: list[tuple[int, np.ndarray]] = []  # (step, crops): jitter steps 0-3, grey 4, blur 5, solarize 6
    jitter = host[:, JITTER] > 0
    for position in range(4):
        for step in range(4):
            steps.append((step, np.flatnonzero(jitter & (host[:, ORDER.start + position] == step))))
    steps += [(4, np.flatnonzero(host[:, GREY] > 0)), (5, np.flatnonzero(host[:, SIGMA] > 0)),
              (6, np.flatnonzero(host[:, SOLARIZE] > 0))]
    steps = [(step, crops) for step, crops in steps if len(crops)]
    values = [host[crops, FACTORS.start + step] if step < 4 else host[crops, SIGMA] if step == 5
              else np.zeros(0, np.float32) for step, crops in steps]
    index = torch.from_numpy(np.concatenate([c for _, c in steps] or [np.zeros(0, np.int64)]))
    factor = torch.from_numpy(np.concatenate(values or [np.zeros(0, np.float32)]).astype(np.float32))
    device = pixels.device
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
        factor = factor.pin_memory().to(device, non_blocking=True)
    else:
        index, factor = index.to(device), factor.to(device)
    index = index.split([len(c) for _, c in steps])
    factor = factor.split([len(v) for v in values])
    radius = math.ceil(3 * float(host[:, SIGMA].max())) if len(host) else 0
    y = pixels.float().div_(255)
    for (step, _), at, f in zip(steps, index, factor):
        part = y.index_select(0, at)
        if step < 4:
            part = _JITTER_STEPS[step](part, f.view(-1, 1, 1, 1))
        elif step == 4:
            part = _grey(part).expand(-1, 3, -1, -1)
        elif step == 5:
            part = _blur(part, f, radius)
        else:
            part = torch.where(part >= SOLARIZE_THRESHOLD / 255, 1 - part, part)
        y.index_copy_(0, at, part)
    for c, (m, sd) in enumerate(zip(mean, std)):
        y[:, c].sub_(m).div_(sd)
    return y


def collate_multicrop(samples: list[MultiCropSample]) -> MultiCropBatch:
    """Crop-major batches: [crop 0 of every image, crop 1 of every image, ...]."""
    if not samples:
        raise DataError("no multi-crop samples to collate: the batch is empty")

    def stack(name: str) -> torch.Tensor | None:
        if getattr(samples[0], name) is None:
            return None
        return torch.stack([getattr(s, name) for s in samples], dim=1).flatten(0, 1)
    if samples[0].local_crops.shape[0] == 0:
        return MultiCropBatch(stack("global_crops"), None, stack("global_colour"), None)
    return MultiCropBatch(*(stack(f) for f in ("global_crops", "local_crops", "global_colour", "local_colour")))
