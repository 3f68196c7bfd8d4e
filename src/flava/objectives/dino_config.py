"""DINO's settings (`DinoConfig`): the head, the loss's temperatures and center, the teacher's
momentum, the multi-crop views, the epoch-based schedules and DINO's optimisation, defaulting to
the reference code's (`main_dino.py`); `flava.objectives.dino` uses them."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import (
    ImageEncoderConfig,
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    Probability,
    check,
)
from ..data.multicrop import MultiCropSpec
from ..errors import ConfigError

# DINO's local crops are 96 px for a 224 px model; other sizes keep the ratio.
LOCAL_TO_GLOBAL = 96 / 224


@dataclass
class DinoConfig:
    """DINO's settings, defaulting to the reference code's (`main_dino.py`)."""

    out_dim: PositiveInt = 65536
    """K, the number of output dimensions of the head (the prototypes); the paper uses 65,536."""
    head_hidden_dim: PositiveInt = 2048
    """Hidden width of the head's MLP."""
    head_bottleneck_dim: PositiveInt = 256
    """Width the head's MLP ends in, L2-normalised before the last layer."""
    head_layers: PositiveInt = 3
    """Linear layers in the head's MLP (GELU between them); 1 is a single linear map."""
    norm_last_layer: bool = True
    """Fix the norm of each row of the weight-normalised last layer to 1 (not trained): steadier
    training, the reference default."""
    warmup_teacher_temp: Positive = 0.04
    """Teacher temperature at epoch 0, raised linearly to `teacher_temp` during warm-up."""
    teacher_temp: Positive = 0.04
    """Teacher temperature after warm-up (the paper's ViT-B/16 runs use 0.07 after 30 epochs)."""
    warmup_teacher_temp_epochs: NonNegativeInt = 0
    """Epochs of the teacher temperature's linear warm-up; 0 starts at `teacher_temp`."""
    student_temp: Positive = 0.1
    """Student temperature."""
    center_momentum: Probability = 0.9
    """EMA momentum of the center subtracted from teacher outputs."""
    center_warm_start: bool = False
    """Start the center at the first batch's mean teacher output instead of 0 (the reference). At
    scale DINO's 10-epoch learning-rate warm-up lets the center settle while the student barely
    moves; in a run of a few hundred steps the student would first learn the untrained teacher's
    mean output, the same for every image, and collapse onto a few dimensions (BENCHMARKS.md)."""
    momentum_teacher: Probability = 0.996
    """Teacher EMA momentum at step 0, raised to 1 on a cosine by the end of training."""
    global_crop_scale_min: Probability = 0.4
    """Smallest share of the image area a global crop covers (the largest is 1)."""
    local_crops: NonNegativeInt = 8
    """Local crops per image (the reference default: 8); 0 trains on the two global crops only."""
    local_crop_scale_min: Probability = 0.05
    """Smallest share of the image area a local crop covers."""
    local_crop_scale_max: Probability = 0.4
    """Largest share of the image area a local crop covers."""
    local_crop_size: PositiveInt | None = None
    """Side of local crops in pixels, a multiple of the patch size; None: 96/224 of the model's image
    size rounded to a patch multiple (96 px at 224)."""
    freeze_last_layer: NonNegativeInt = 1
    """Epochs during which the head's last layer gets no update (its gradient is dropped)."""
    steps_per_epoch: NonNegativeInt = 0
    """Optimizer steps that make one epoch of the epoch-based schedules (teacher temperature
    warm-up, `freeze_last_layer`) in a training run; 0: the image data's size over the global batch."""
    lr: Positive = 5e-4
    """Peak learning rate for a global batch of 256 images, scaled linearly to the run's global
    batch (DINO's rule: 6.25e-5 at batch 32); in stage image-dino it replaces `optim.lr` (the
    warm-up and cosine are `optim`'s)."""
    weight_decay: NonNegative = 0.04
    """Weight decay at the first step, raised on a cosine to `weight_decay_end` at the last; in
    stage image-dino it replaces `optim.weight_decay` (norms, biases and tokens are not decayed)."""
    weight_decay_end: NonNegative = 0.4
    """Weight decay at the last step."""
    clip_grad: NonNegative = 3.0
    """Largest gradient norm of each parameter (DINO clips each on its own, not the global norm);
    in stage image-dino it replaces `optim.grad_clip`; 0 turns clipping off."""

    def local_size(self, image: ImageEncoderConfig) -> int:
        """Side of the local crops for an image encoder of config `image`."""
        if self.local_crop_size is not None:
            return self.local_crop_size
        return max(1, round(LOCAL_TO_GLOBAL * image.image_size / image.patch_size)) * image.patch_size

    def crop_spec(self, image: ImageEncoderConfig) -> MultiCropSpec:
        """The multi-crop augmentation for an image encoder of config `image`."""
        return MultiCropSpec(global_size=image.image_size, local_size=self.local_size(image),
                             local_crops=self.local_crops, global_scale=(self.global_crop_scale_min, 1.0),
                             local_scale=(self.local_crop_scale_min, self.local_crop_scale_max),
                             mean=tuple(image.image_mean), std=tuple(image.image_std))

    def validate(self, image: ImageEncoderConfig) -> DinoConfig:
        """Check every field, then the relations between fields and with the image encoder."""
        check(self)
        if not self.local_crop_scale_min < self.local_crop_scale_max:
            raise ConfigError(f"dino.local_crop_scale_min ({self.local_crop_scale_min}) must be below "
                              f"dino.local_crop_scale_max ({self.local_crop_scale_max})")
        if self.global_crop_scale_min <= 0:
            raise ConfigError("dino.global_crop_scale_min must be above 0")
        if self.out_dim < 2:  # one prototype: the loss is 0 whatever the encoder, which then learns nothing
            raise ConfigError(f"dino.out_dim ({self.out_dim}) must be at least 2: over one output the softmax is 1 "
                              "and the loss 0 (the paper's is 65536)")
        size = self.local_size(image)
        if size > image.image_size:  # a "local" view larger than the global ones is no local view
            raise ConfigError(f"dino.local_crop_size ({size}) is larger than the global crops' "
                              f"model.image.image_size ({image.image_size}); local crops are the small views "
                              f"(the paper's 96 beside 224)")
        if size % image.patch_size:
            raise ConfigError(f"dino.local_crop_size ({size}) must be a multiple of the patch size "
                              f"{image.patch_size}; try {max(1, round(size / image.patch_size)) * image.patch_size}")
        return self
