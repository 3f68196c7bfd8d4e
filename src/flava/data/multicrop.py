"""DINO's multi-crop augmentation (Caron et al., 2021, §3.1 and `DataAugmentationDINO`) in PIL
and torch.

Each image gives two global crops (RandomResizedCrop over 40-100 % of the area) and N local
crops (5-40 %, at a smaller size). Every crop is flipped with p = 0.5, colour-jittered with
p = 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order), turned grey
with p = 0.2 and Gaussian-blurred (p = 1.0 for the first global crop, 0.1 for the second, 0.5
for local crops); the second global crop is also solarized with p = 0.2. The crops are then
normalised by the model's pixel statistics (FLAVA's: CLIP's), as its other image inputs are.

Every random choice is drawn from the `numpy.random.Generator` passed in, so with the
pipeline's `default_rng([seed, *position])` a sample's crops are a pure function of
(seed, position) and a resumed run sees the same crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ..errors import DataError
from .transforms import CLIP_MEAN, CLIP_STD, crop_resize, normalize_uint8, random_resized_crop_box, to_rgb

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
    """The crops of one image."""

    global_crops: torch.Tensor
    """[2, 3, global_size, global_size] float32, normalised."""
    local_crops: torch.Tensor
    """[local_crops, 3, local_size, local_size] float32, normalised."""


@dataclass
class MultiCropBatch:
    """The crops of B images, crop-major: rows [k*B, (k+1)*B) are crop k of every image, the
    order the DINO loss pairs teacher and student views by."""

    global_crops: torch.Tensor
    """[2*B, 3, G, G]."""
    local_crops: torch.Tensor | None
    """[N*B, 3, L, L], or None with no local crops."""

    def to(self, device: torch.device | str, non_blocking: bool = False, mean=None, std=None) -> MultiCropBatch:
        """The crops on `device` (normalised already, in the workers: `mean`/`std` are not used)."""
        local = self.local_crops.to(device, non_blocking=non_blocking) if self.local_crops is not None else None
        return MultiCropBatch(self.global_crops.to(device, non_blocking=non_blocking), local)

    def pin_memory(self) -> MultiCropBatch:
        local = self.local_crops.pin_memory() if self.local_crops is not None else None
        return MultiCropBatch(self.global_crops.pin_memory(), local)

    def __len__(self) -> int:
        """Images, not crops."""
        return self.global_crops.shape[0] // 2


def _adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """Rotate the hue by `factor` of a full turn (factor in [-0.5, 0.5]), in PIL's HSV space."""
    h, s, v = image.convert("HSV").split()
    shift = round(factor * 255) % 256
    hue = ((np.asarray(h, dtype=np.int16) + shift) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    """torchvision's ColorJitter: each factor drawn uniformly around 1 (hue around 0), then the
    four adjustments applied in a random order."""
    factors = (rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
               rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
               rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
               rng.uniform(-hue, hue))
    for i in rng.permutation(4):
        f = float(factors[i])
        if i == 0:
            image = ImageEnhance.Brightness(image).enhance(f)
        elif i == 1:
            image = ImageEnhance.Contrast(image).enhance(f)
        elif i == 2:
            image = ImageEnhance.Color(image).enhance(f)
        else:
            image = _adjust_hue(image, f)
    return image


def _crop(image: np.ndarray, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
          spec: MultiCropSpec, rng: np.random.Generator) -> torch.Tensor:
    left, top, w, h = random_resized_crop_box(image.shape[1], image.shape[0], rng, scale)
    # PIL's bicubic kernel as torch's vectorised uint8 code computes it (`crop_resize`: a fifth of
    # PIL's time for a 224-px crop), the crop's later steps in PIL as DINO's are.
    (pixels,) = crop_resize(image, (left, top, left + w, top + h), size)
    crop = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        crop = color_jitter(crop, rng)
    if rng.random() < 0.2:
        crop = crop.convert("L").convert("RGB")
    if rng.random() < blur_p:
        crop = crop.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*spec.blur_radius))))
    if solarize_p and rng.random() < solarize_p:
        crop = ImageOps.solarize(crop, threshold=SOLARIZE_THRESHOLD)
    return normalize_uint8(torch.from_numpy(np.array(crop)).permute(2, 0, 1), spec.mean, spec.std)


def multi_crop(image: Image.Image | np.ndarray, spec: MultiCropSpec, rng: np.random.Generator) -> MultiCropSample:
    """Two global and `spec.local_crops` local crops of `image`, every choice drawn from `rng`."""
    image = np.array(to_rgb(image))  # writable: torch reads it
    g, loc = spec.global_size, spec.local_size
    globals_ = [_crop(image, g, spec.global_scale, 1.0, 0.0, spec, rng),
                _crop(image, g, spec.global_scale, 0.1, 0.2, spec, rng)]
    locals_ = [_crop(image, loc, spec.local_scale, 0.5, 0.0, spec, rng) for _ in range(spec.local_crops)]
    local = torch.stack(locals_) if locals_ else torch.empty(0, 3, loc, loc)
    return MultiCropSample(torch.stack(globals_), local)


def collate_multicrop(samples: list[MultiCropSample]) -> MultiCropBatch:
    """Crop-major batches: [crop 0 of every image, crop 1 of every image, ...]."""
    if not samples:
        raise DataError("no multi-crop samples to collate: the batch is empty")
    global_crops = torch.stack([s.global_crops for s in samples], dim=1).flatten(0, 1)
    n_local = samples[0].local_crops.shape[0]
    if n_local == 0:
        return MultiCropBatch(global_crops, None)
    return MultiCropBatch(global_crops, torch.stack([s.local_crops for s in samples], dim=1).flatten(0, 1))
