"""Training augmentation and test-time resizing, as pure functions of an explicit random generator.

The recipe is Mask2Former's semantic-segmentation input pipeline (configs/ade20k/semantic-segmentation/
Base-ADE20K-SemanticSegmentation.yaml, the one CoMFormer and CisDQ train with, reference §4.1):
``ResizeShortestEdge`` with the short side drawn from ``int(x * 0.1 * 512)``, x = 5..20 (0.5-2.0 x the crop)
and the long side capped at 2048 (4 x the crop); ``RandomCrop_CategoryAreaConstraint`` 512 x 512 that
re-draws (10 tries in detectron2) until the crop contains a class; horizontal flip; SSD colour jitter
(``ColorAugSSDTransform``); test-time short side 512 = the crop size. Here the short side is drawn
uniformly from the same 0.5-2.0 range instead of the 16-value grid, and a crop is accepted once it holds
a pixel of a target of the step (CisDQ's variant of the constraint). Instance datasets use the same
pipeline; masks left empty by the crop are dropped (detectron2 ``filter_empty_instances``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmark.errors import ConfigError

# ImageNet mean / std in 0-255 RGB: Mask2Former's PIXEL_MEAN / PIXEL_STD for ResNet and Swin backbones.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class AugConfig:
    """Training augmentation (module docstring gives the source of each default).

    crop_size:       square crop side (64 for the CPU presets, 512 for the paper schedules).
    scale_range:     short side after resizing, as a multiple of ``crop_size`` (Mask2Former 256..1024 for 512).
    max_size_ratio:  long side cap, as a multiple of ``crop_size`` (Mask2Former MAX_SIZE_TRAIN 2048 for 512).
    flip:            random horizontal flip with probability 0.5.
    color_jitter:    SSD photometric jitter (brightness, contrast, saturation, hue, each with p = 0.5).
    crop_retries:    crop draws until one contains a target of the step (detectron2 draws 10).
    test_size:       test-time short side; None = ``crop_size`` (Mask2Former MIN_SIZE_TEST 512 for 512 crops).
    """

    crop_size: int = 64
    scale_range: tuple[float, float] = (0.5, 2.0)
    max_size_ratio: float = 4.0
    flip: bool = True
    color_jitter: bool = True
    crop_retries: int = 10
    test_size: int | None = None

    def __post_init__(self):
        if self.crop_size < 8:
            raise ConfigError(f"data.crop_size must be at least 8, got {self.crop_size}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"data.scale_range must be two numbers 0 < low <= high, got {self.scale_range}")
        if self.max_size_ratio < self.scale_range[1]:
            raise ConfigError(f"data.max_size_ratio ({self.max_size_ratio}) must be at least the largest scale "
                              f"({self.scale_range[1]})")
        if self.crop_retries < 1:
            raise ConfigError(f"data.crop_retries must be at least 1, got {self.crop_retries}")
        if self.test_size is not None and self.test_size < 8:
            raise ConfigError(f"data.test_size must be at least 8 (or none), got {self.test_size}")

    @property
    def eval_size(self) -> int:
        return self.test_size or self.crop_size


def resized_shape(height: int, width: int, short: float, max_long: float | None) -> tuple[int, int]:
    """(h, w) with the short side ``short`` and the long side at most ``max_long`` (detectron2's rule)."""
    scale = short / min(height, width)
    if max_long is not None and max(height, width) * scale > max_long:
        scale = max_long / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == shape:
        return image
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))


def resize_label(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if label.shape == shape:
        return label
    return np.asarray(Image.fromarray(label).resize((shape[1], shape[0]), Image.NEAREST))


def resize_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """[n, H, W] bool -> [n, h, w] bool, nearest neighbour."""
    if masks.shape[1:] == shape or masks.shape[0] == 0:
        return masks if masks.shape[1:] == shape else np.zeros((0, *shape), bool)
    resized = F.interpolate(torch.from_numpy(masks.astype(np.uint8))[None], size=shape, mode="nearest")[0]
    return resized.numpy().astype(bool)


def choose_crop(height: int, width: int, crop: int, rng: np.random.Generator,
                accept: Callable[[slice, slice], bool], retries: int) -> tuple[slice, slice]:
    """A crop window of at most ``crop`` x ``crop``; redrawn up to ``retries`` times until ``accept``."""
    ch, cw = min(crop, height), min(crop, width)
    window = (slice(0, ch), slice(0, cw))
    if ch == height and cw == width:
        return window
    for _ in range(retries):
        top, left = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
        window = (slice(top, top + ch), slice(left, left + cw))
        if accept(*window):
            break
    return window


def color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD photometric distortion (detectron2 ColorAugSSDTransform: deltas 32, 0.5-1.5, 0.5-1.5, hue 18/180)."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img = np.clip(img + rng.uniform(-32, 32), 0, 255)

    def contrast(x):
        return np.clip(x * rng.uniform(0.5, 1.5), 0, 255) if rng.random() < 0.5 else x

    def saturation_hue(x):
        do_sat, sat = rng.random() < 0.5, rng.uniform(0.5, 1.5)
        do_hue, hue = rng.random() < 0.5, int(rng.integers(-25, 26))   # 18 of 180 OpenCV hue units, on 256
        if not (do_sat or do_hue):
            return x
        hsv = np.asarray(Image.fromarray(x.astype(np.uint8)).convert("HSV")).astype(np.int16)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + hue) % 256
        return np.asarray(Image.fromarray(hsv.astype(np.uint8), mode="HSV").convert("RGB")).astype(np.float32)

    if rng.random() < 0.5:
        img = saturation_hue(contrast(img))
    else:
        img = contrast(saturation_hue(img))
    return img.astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [3, H, W] float32 normalised with ImageNet mean / std."""
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (x - mean) / std


def _scale_and_crop_shape(height: int, width: int, cfg: AugConfig, rng: np.random.Generator) -> tuple[int, int]:
    short = cfg.crop_size * rng.uniform(*cfg.scale_range)
    return resized_shape(height, width, short, cfg.max_size_ratio * cfg.crop_size)


def augment_semantic(image: np.ndarray, label: np.ndarray, classes, cfg: AugConfig,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resize, crop (retrying until a class of ``classes`` is inside), flip and jitter an image + id map."""
    shape = _scale_and_crop_shape(*label.shape, cfg, rng)
    image, label = resize_image(image, shape), resize_label(label, shape)
    wanted = np.zeros(256, dtype=bool)
    wanted[list(classes)] = True
    ys, xs = choose_crop(*shape, cfg.crop_size, rng, lambda y, x: bool(wanted[label[y, x]].any()), cfg.crop_retries)
    image, label = image[ys, xs], label[ys, xs]
    if cfg.flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if cfg.color_jitter:
        image = color_jitter(image, rng)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def augment_instance(image: np.ndarray, masks: np.ndarray, cfg: AugConfig,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same pipeline for [n, H, W] instance masks; returns (image, kept masks, indices of the kept masks)."""
    shape = _scale_and_crop_shape(*image.shape[:2], cfg, rng)
    image, masks = resize_image(image, shape), resize_masks(masks, shape)
    ys, xs = choose_crop(*shape, cfg.crop_size, rng,
                         lambda y, x: masks.shape[0] == 0 or bool(masks[:, y, x].any()), cfg.crop_retries)
    image, masks = image[ys, xs], masks[:, ys, xs]
    if cfg.flip and rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    if cfg.color_jitter:
        image = color_jitter(image, rng)
    keep = np.flatnonzero(masks.reshape(masks.shape[0], -1).any(1))
    return np.ascontiguousarray(image), np.ascontiguousarray(masks[keep]), keep


def resize_for_test(image: np.ndarray, size: int | None, max_size: int | None = None) -> np.ndarray:
    """Short side to ``size`` (aspect kept, long side at most ``max_size``); None keeps the image."""
    if size is None:
        return image
    return resize_image(image, resized_shape(*image.shape[:2], size, max_size))
