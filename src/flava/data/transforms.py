"""Image preprocessing with PIL and torch (no torchvision here)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import CLIP_MEAN, CLIP_STD  # FLAVA's image processor's statistics (a model's own: its config)

Stats = tuple[float, ...] | list[float]
# The dVAE codebook reads pixels squeezed into [eps, 1 - eps] (DALL-E's `map_pixels`).
LOGIT_LAPLACE_EPS = 0.1
# Longer over shorter side beyond which an image is refused: resizing the shorter side of a
# 30,000,000 x 1 strip (88 KB as a PNG, under the pixel guard) to 224 px would allocate 20 GB.
MAX_ASPECT_RATIO = 100


def extreme_aspect(width: int, height: int) -> bool:
    return max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height))


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """RGB with the full range kept: PIL's convert clips 16- and 32-bit greyscale at 255."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint16:  # the full 16-bit range, as a PIL I;16 image's below
            arr = np.clip(arr / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
        elif arr.dtype != np.uint8:
            arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then the central size x size square. The longer side is
    rounded down, as torchvision's Resize and transformers' `shortest_edge` resize round it: an
    export's processor then gives these pixels exactly (rounded to nearest, they differed by a
    pixel's scale on about half of non-square images)."""
    w, h = image.size
    if extreme_aspect(w, h):  # callers that open images themselves count this earlier (open_image)
        raise ValueError(f"a {w} x {h} image is beyond the aspect ratio of {MAX_ASPECT_RATIO}:1 that can be resized")
    short = min(w, h)
    nw, nh = max(size, size * w // short), max(size, size * h // short)
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, mean: Stats = CLIP_MEAN, std: Stats = CLIP_STD) -> torch.Tensor:
    """[..., C, H, W] pixels in [0, 1] -> (x - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean_t) / std_t


def normalize_uint8(x: torch.Tensor, mean: Stats = CLIP_MEAN, std: Stats = CLIP_STD) -> torch.Tensor:
    """[..., C, H, W] uint8 pixels -> float32 normalised by `mean`/`std` (of [0, 1] pixels), on x's
    device, contiguous. The constants are Python numbers: a tensor of them made on a GPU would
    wait for the device."""
    y = _float_contiguous(x)
    for c, (m, s) in enumerate(zip(mean, std)):
        y[..., c, :, :].sub_(m * 255.0).mul_(1.0 / (s * 255.0))
    return y


def map_uint8(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] uint8 pixels -> float32 in the image codebook's input range, contiguous."""
    return _float_contiguous(x).mul_((1 - 2 * LOGIT_LAPLACE_EPS) / 255.0).add_(LOGIT_LAPLACE_EPS)


def _float_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous float32 in one pass: a channels-last batch (the loader's) is converted and
    transposed together, where `.float().contiguous()` would transpose four times the bytes."""
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return y.copy_(x)


def crop_resize(image: Image.Image | np.ndarray, box: tuple[float, float, float, float], *sizes: int
                ) -> list[torch.Tensor]:
    """[3, size, size] uint8 for each size: `box` (left, top, right, bottom in pixels, rounded to
    whole ones) resized with PIL's antialiased bicubic kernel, computed by torch's uint8 kernel,
    about three times faster than PIL's own resize. `image` is a PIL image or [H, W, 3] uint8.
    The results are channels-last in memory (`stack_views` keeps a batch of them so)."""
    arr = image if isinstance(image, np.ndarray) else np.array(image.convert("RGB"))
    left, top = min(int(round(box[0])), arr.shape[1] - 1), min(int(round(box[1])), arr.shape[0] - 1)
    right, bottom = max(left + 1, int(round(box[2]))), max(top + 1, int(round(box[3])))
    # Copied whole: torch's vectorised uint8 kernel takes only contiguous channels-last input
    # (a crop's view of the image falls to its generic kernel, at the same pixels, 1.6x the time).
    x = torch.from_numpy(arr[top:bottom, left:right]).permute(2, 0, 1)[None].contiguous(
        memory_format=torch.channels_last)
    return [F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)[0] for size in sizes]


def lies_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor whose bytes lie channels-last (and not also as a contiguous one's)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """[B, 3, H, W] uint8 from [3, H, W] views, channels-last in memory: each channels-last view is
    one block of bytes (a contiguous batch would transpose every image here, five times the cost;
    the device's copy to float transposes it at no cost, and the CPU's in the same pass)."""
    return torch.stack([v.permute(1, 2, 0) for v in views]).permute(0, 3, 1, 2)


def codebook_view(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The image codebook's [B, 3, size, size] uint8 view of a batch of the model's views: each
    resized again with the antialiased bicubic kernel, so the image tokens describe exactly what
    the model sees, in one vectorised call for the batch (channels-last in and out)."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    x = pixels.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the image codebook's input range."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def eval_transform(image: Image.Image | np.ndarray, size: int, mean: Stats = CLIP_MEAN,
                   std: Stats = CLIP_STD, squash_to: tuple[int, int] | None = None) -> torch.Tensor:
    """The inference transform: RGB, resize + center crop, normalisation (FLAVA's: CLIP's statistics).
    With `squash_to` (height, width), resized to that first whatever the image's shape, then its
    central square cropped as it is (a transformers FlavaImageProcessor whose size is a height and width)."""
    image = to_rgb(image)
    if squash_to is not None:
        h, w = squash_to
        image = image.resize((w, h), Image.BICUBIC)
        if min(h, w) >= size:
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
    return normalize(to_tensor(resize_center_crop(image, size)), mean, std)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.9, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering `scale` of the area with aspect ratio in `ratio`
    (torchvision's RandomResizedCrop rule, falling back to a central crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        # Scalar math (numpy's per-call overhead is most of the cost at this size).
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@contextlib.contextmanager
def single_threaded():
    """torch on one thread inside the block, as in a DataLoader worker: an image's small resizes and
    normalisations gain nothing from the model's thread pool, whose threads spin between them (on
    two busy cores 2 threads made 11-20 ms a training sample, 7-24 ms an evaluation image, against
    1.5 ms on one)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
