"""The NVIDIA DALI data path (``--use_dali``): the same views and the same loader contract as the torch path.

One DALI pipeline serves all clients of a rank. Each step's batch is the flat, client-major list of the
rows that ``FederatedSchedule.step_plan`` assigns to the pool clients; the pipeline turns it into the
crops of the view spec (MoCo: two 32-pixel views; SwAV: multi-crop), crop-major, normalised NCHW float32.

Every random choice of a crop (window, jitter factors and order, grayscale, blur and flip coins) is drawn
in numpy from the sample's key and the seed, and fed to the pipeline with ``fn.external_source``. The views
of a sample therefore do not depend on how rows are grouped into batches, on restarts or on ranks, and
DALI's own random generators are never used.

Augmentation follows ``multicropdataset._colour_chain`` after a RandomResizedCrop:
- crop: torchvision's RandomResizedCrop window (ten tries, then a central crop), bilinear with antialias;
- colour jitter (p=0.8): brightness, contrast, saturation, hue in a random order, clipped after each one,
  hue shifted on the HSV hexcone; the pipeline has fixed stages, so each sample's order is laid out over
  six blend slots around one hue stage, the unused slots being identities;
- grayscale (p=0.2, ITU-R 601 luma), Gaussian blur (sigma in (0.1, 2), p=0.5), horizontal flip (p=0.5),
  normalisation. The blur is PIL's (MocoSFL's): three box-blur passes per axis with edges repeated, the box's
  fractional radius following sigma (functions.data.blur), fed to ``fn.filter`` as one kernel per row; a view spec with
  a fixed ``blur_kernel_size`` uses ``fn.gaussian_blur`` of that window instead.
Unlike the PIL path, intermediate images stay float instead of being rounded to uint8 after each operation (for
the blur: PIL rounds after each of its six passes).

The memory and test loaders are the torch path's ``NormalisedImageLoader``: a fixed-order normalisation of
in-memory images gains nothing from a DALI pipeline.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.data_node import DataNode
from nvidia.dali.plugin.pytorch import feed_ndarray

from functions.core.errors import UserError
from functions.data.blur import PIL_BLUR_PASSES, box_kernel_length, identity_kernel, pil_box_kernels
from functions.data.datasets import ImageDataset
from functions.data.image_folder import ImageFiles
from functions.data.loaders import (
    FederatedLoaders,
    FederatedSchedule,
    NormalisedImageLoader,
    StepBatch,
    check_image_array,
    check_mean_std,
    splitmix64_finalize,
)
from functions.data.views import BLUR_SIGMA, SIGMA_FOLLOWING_BLUR, ViewSpec

# The torch path's augmentation constants (multicropdataset: RandomResizedCrop, _colour_chain).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
JITTER_PROBABILITY = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.4, 0.1
GRAYSCALE_PROBABILITY = 0.2
BLUR_PROBABILITY = 0.5
# Taps of the per-row box kernel of the sigma-following blur: enough for the largest sigma (5 at sigma 2).
BOX_KERNEL_TAPS = box_kernel_length(BLUR_SIGMA[1])
FLIP_PROBABILITY = 0.5

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 as in PIL's convert("L") (torchvision tensors: 0.2989 red)
# A 3x3 Gaussian with this sigma has side weights exp(-1 / (2 sigma^2)) == 0 in float32: an exact identity,
# so "no blur" needs no extra select stage.
NO_BLUR_SIGMA = 1e-3
# HSV hexcone phase of the R, G, B outputs: channel c = max - (max - min) * clamp(min(k, 4 - k), 0, 1)
# with k = (phase_c + 6 * hue) mod 6.
HUE_CHANNEL_PHASE = (5.0, 3.0, 1.0)

# Jitter operations, numbered as in torchvision's ColorJitter (its random order permutes these).
_BRIGHTNESS_OP, _CONTRAST_OP, _SATURATION_OP, _HUE_OP = 0, 1, 2, 3
BLEND_SLOTS = 6  # three blend stages before the hue stage and three after it
_SLOTS_BEFORE_HUE = BLEND_SLOTS // 2

# Draw numbers of one crop in its uniform stream (each crop owns a disjoint block of _DRAW_STRIDE draws).
_DRAW_STRIDE = 64
_SCALE_DRAWS = slice(0, CROP_TRIES)
_RATIO_DRAWS = slice(CROP_TRIES, 2 * CROP_TRIES)
_TOP_DRAW, _LEFT_DRAW = 2 * CROP_TRIES, 2 * CROP_TRIES + 1
_JITTER_COIN = 2 * CROP_TRIES + 2
_FACTOR_DRAWS = slice(_JITTER_COIN + 1, _JITTER_COIN + 5)  # brightness, contrast, saturation, hue
_ORDER_DRAWS = slice(_JITTER_COIN + 5, _JITTER_COIN + 9)
_GRAY_COIN = _JITTER_COIN + 9
_BLUR_COIN, _SIGMA_DRAW, _FLIP_COIN = _GRAY_COIN + 1, _GRAY_COIN + 2, _GRAY_COIN + 3
_DRAWS_PER_CROP = _FLIP_COIN + 1
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's counter increment
_SEED_TAG = 0x44414C49  # "DALI": keeps these draws apart from other streams keyed by the same seed

DALI_DEVICES = ("cpu", "gpu")


# ------------------------------------------------------------------------------------------ parameters
@dataclass
class CropParameters:
    """Per-row augmentation parameters of one crop of a batch (N rows); what the pipeline is fed."""

    anchor: np.ndarray  # (N, 2) float32: top, left of the crop window in source pixels
    window: np.ndarray  # (N, 2) float32: height, width of the crop window
    blend: np.ndarray  # (N, BLEND_SLOTS, 3) float32: weights of (image, its luma, its mean luma) per slot
    hue_shift: np.ndarray  # (N,) float32: hue rotation in turns, applied between slots 2 and 3
    grayscale: np.ndarray  # (N,) bool
    blur_sigma: np.ndarray  # (N,) float32: Gaussian sigma, NO_BLUR_SIGMA when not blurred
    flip: np.ndarray  # (N,) bool: horizontal flip

    def __post_init__(self) -> None:
        rows = self.anchor.shape[0]
        expected = {"anchor": (rows, 2), "window": (rows, 2), "blend": (rows, BLEND_SLOTS, 3), "hue_shift": (rows,),
                    "grayscale": (rows,), "blur_sigma": (rows,), "flip": (rows,)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"CropParameters.{name} has shape {getattr(self, name).shape}, expected {shape}")

    @property
    def num_rows(self) -> int:
        """Rows the parameters describe."""
        return int(self.anchor.shape[0])

    @classmethod
    def identity(cls, rows: int, height: int, width: int) -> "CropParameters":
        """Parameters that keep every image as it is: whole-image window, no colour change, blur or flip."""
        blend = np.zeros((rows, BLEND_SLOTS, 3), dtype=np.float32)
        blend[:, :, 0] = 1.0
        return cls(
            anchor=np.zeros((rows, 2), dtype=np.float32),
            window=np.tile(np.float32([height, width]), (rows, 1)),
            blend=blend,
            hue_shift=np.zeros(rows, dtype=np.float32),
            grayscale=np.zeros(rows, dtype=bool),
            blur_sigma=np.full(rows, NO_BLUR_SIGMA, dtype=np.float32),
            flip=np.zeros(rows, dtype=bool),
        )

    def box_kernels(self) -> np.ndarray:
        """(N, 1, BOX_KERNEL_TAPS) float32: each row's one-pass PIL box kernel, the identity where not blurred."""
        blurred = self.blur_sigma > NO_BLUR_SIGMA
        kernels = np.where(blurred[:, None], pil_box_kernels(np.where(blurred, self.blur_sigma, 1.0), BOX_KERNEL_TAPS),
                           identity_kernel(BOX_KERNEL_TAPS)[None, :])
        return kernels.astype(np.float32).reshape(self.num_rows, 1, BOX_KERNEL_TAPS)

    def pipeline_inputs(self, sigma_following_blur: bool = True) -> list[np.ndarray]:
        """The arrays fed to the pipeline for this crop, in the order _augment_crop reads them (the blur as box
        kernels, or as sigmas for a fixed-window Gaussian)."""
        luma_rows = np.tile(np.float32(LUMA_WEIGHTS), (3, 1))
        colour_matrix = np.where(self.grayscale[:, None, None], luma_rows, np.eye(3, dtype=np.float32))
        hue_phase = np.float32(HUE_CHANNEL_PHASE) + 6.0 * self.hue_shift[:, None].astype(np.float32)
        blend_weights = [np.ascontiguousarray(self.blend[:, slot, part], dtype=np.float32)
                         for slot in range(BLEND_SLOTS) for part in range(3)]
        return [
            np.ascontiguousarray(self.anchor, dtype=np.float32),
            np.ascontiguousarray(self.window, dtype=np.float32),
            *blend_weights,
            np.ascontiguousarray(hue_phase, dtype=np.float32),
            np.ascontiguousarray(colour_matrix, dtype=np.float32),
            self.box_kernels() if sigma_following_blur else np.ascontiguousarray(self.blur_sigma, dtype=np.float32),
            self.flip.astype(np.int32),
        ]


_INPUTS_PER_CROP = 2 + 3 * BLEND_SLOTS + 4


def uniform_draws(keys: np.ndarray, seed: int, crop_index: int, count: int) -> np.ndarray:
    """(len(keys), count) floats in [0, 1), a pure function of (sample key, seed, crop index, draw number)."""
    if not 0 <= count <= _DRAW_STRIDE:
        raise ValueError(f"a crop has at most {_DRAW_STRIDE} draws, asked for {count}")
    seed_mix = splitmix64_finalize(np.array([(int(seed) ^ _SEED_TAG) & ((1 << 64) - 1)], dtype=np.uint64))[0]
    stream = splitmix64_finalize(np.asarray(keys, dtype=np.uint64) ^ seed_mix)
    counters = (np.arange(count, dtype=np.uint64) + np.uint64(crop_index * _DRAW_STRIDE + 1)) * _GOLDEN_GAMMA
    with np.errstate(over="ignore"):
        bits = splitmix64_finalize(stream[:, None] + counters[None, :])
    # The top 53 bits give every double in [0, 1) on a 2**-53 grid, as numpy's own generators do.
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def crop_windows(draws: np.ndarray, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float] = CROP_RATIO) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, crop height, crop width) per row: torchvision's RandomResizedCrop.get_params, vectorised.

    `draws` is (N, >= 2 * CROP_TRIES + 2) uniforms: CROP_TRIES area draws, CROP_TRIES log-ratio draws, then
    the top and left position draws.
    """
    area = float(height * width)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[:, _SCALE_DRAWS])
    aspect = np.exp(log_low + (log_high - log_low) * draws[:, _RATIO_DRAWS])
    tried_w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)
    tried_h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (tried_w > 0) & (tried_w <= width) & (tried_h > 0) & (tried_h <= height)
    first_fit = np.argmax(fits, axis=1)
    rows = np.arange(draws.shape[0])
    crop_h, crop_w = tried_h[rows, first_fit], tried_w[rows, first_fit]
    top = np.floor(draws[:, _TOP_DRAW] * (height - crop_h + 1)).astype(np.int64)
    left = np.floor(draws[:, _LEFT_DRAW] * (width - crop_w + 1)).astype(np.int64)
    # No try fitted: torchvision's central crop, its aspect ratio clamped into `ratio`.
    missed = ~fits.any(axis=1)
    if missed.any():
        image_ratio = width / height
        if image_ratio < min(ratio):
            fallback_w, fallback_h = width, int(round(width / min(ratio)))
        elif image_ratio > max(ratio):
            fallback_w, fallback_h = int(round(height * max(ratio))), height
        else:
            fallback_w, fallback_h = width, height
        crop_h[missed], crop_w[missed] = fallback_h, fallback_w
        top[missed], left[missed] = (height - fallback_h) // 2, (width - fallback_w) // 2
    return top, left, crop_h, crop_w


def colour_jitter_slots(factors: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend-slot weights (N, BLEND_SLOTS, 3) and hue shift (N,) that apply the jitter in each row's order.

    `factors` (N, 4) holds brightness, contrast, saturation factors and the hue shift in turns; `order` (N, 4)
    is a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue) per row. The operations before the hue
    go to the slots just before the hue stage, those after it to the slots just after; the rest stay identity.
    """
    rows = factors.shape[0]
    blend = np.zeros((rows, BLEND_SLOTS, 3), dtype=np.float64)
    blend[:, :, 0] = 1.0
    row_index = np.arange(rows)
    hue_position = np.argmax(order == _HUE_OP, axis=1)
    for position in range(4):
        op = order[:, position]
        slot = np.where(position < hue_position, _SLOTS_BEFORE_HUE - hue_position + position,
                        _SLOTS_BEFORE_HUE + position - hue_position - 1)
        factor = factors[row_index, op]
        # Brightness blends towards black, contrast towards the image's mean luma, saturation towards the
        # pixel's luma: weights of (image, luma, mean luma).
        weights = np.stack([factor, np.where(op == _SATURATION_OP, 1.0 - factor, 0.0),
                            np.where(op == _CONTRAST_OP, 1.0 - factor, 0.0)], axis=1)
        is_blend = op != _HUE_OP
        blend[row_index[is_blend], slot[is_blend]] = weights[is_blend]
    return blend.astype(np.float32), factors[:, _HUE_OP].astype(np.float32)


def draw_crop_parameters(keys: np.ndarray, seed: int, crop_index: int, scale: tuple[float, float],
                         image_size: tuple[int, int], blur_probability: float = BLUR_PROBABILITY) -> CropParameters:
    """The random augmentation of crop `crop_index` of every row, drawn from the rows' sample keys."""
    draws = uniform_draws(keys, seed, crop_index, _DRAWS_PER_CROP)
    height, width = image_size
    top, left, crop_h, crop_w = crop_windows(draws, height, width, scale)

    jitter = draws[:, _JITTER_COIN] < JITTER_PROBABILITY
    low_high = np.array([[1 - BRIGHTNESS, 1 + BRIGHTNESS], [1 - CONTRAST, 1 + CONTRAST],
                         [1 - SATURATION, 1 + SATURATION], [-HUE, HUE]])
    factors = low_high[:, 0] + (low_high[:, 1] - low_high[:, 0]) * draws[:, _FACTOR_DRAWS]
    # Rows without jitter get identity factors: the order then does not matter.
    factors = np.where(jitter[:, None], factors, np.array([1.0, 1.0, 1.0, 0.0]))
    order = np.argsort(draws[:, _ORDER_DRAWS], axis=1, kind="stable")  # a uniform random permutation
    blend, hue_shift = colour_jitter_slots(factors, order)

    blurred = draws[:, _BLUR_COIN] < blur_probability
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * draws[:, _SIGMA_DRAW]
    return CropParameters(
        anchor=np.stack([top, left], axis=1).astype(np.float32),
        window=np.stack([crop_h, crop_w], axis=1).astype(np.float32),
        blend=blend,
        hue_shift=hue_shift,
        grayscale=draws[:, _GRAY_COIN] < GRAYSCALE_PROBABILITY,
        blur_sigma=np.where(blurred, sigma, NO_BLUR_SIGMA).astype(np.float32),
        flip=draws[:, _FLIP_COIN] < FLIP_PROBABILITY,
    )


def draw_view_parameters(keys: np.ndarray, seed: int, view_spec: ViewSpec,
                         image_size: tuple[int, int]) -> list[CropParameters]:
    """Parameters of every crop of the view spec for rows with the given sample keys."""
    return [draw_crop_parameters(keys, seed, crop_index, scale, image_size, view_spec.blur_probability)
            for crop_index, (_, scale) in enumerate(view_spec.crops())]


# ------------------------------------------------------------------------------------------ pipeline graph
def _blend_slot(image: DataNode, image_weight: DataNode, luma_weight: DataNode, mean_weight: DataNode) -> DataNode:
    """clip(a * image + b * luma + c * mean luma, 0, 255): brightness, contrast, saturation or identity."""
    luma = fn.coord_transform(image, M=list(LUMA_WEIGHTS))  # (H, W, 1)
    mean_luma = fn.reductions.mean(luma)  # one value per sample, broadcast below
    return dmath.clamp(image_weight * image + luma_weight * luma + mean_weight * mean_luma, 0.0, 255.0)


def _hue_stage(image: DataNode, hue_phase: DataNode) -> DataNode:
    """Rotate the hue on the HSV hexcone (as torchvision's adjust_hue on tensors); max and min stay unchanged."""
    red, green, blue = image[:, :, 0:1], image[:, :, 1:2], image[:, :, 2:3]
    high = dmath.max(dmath.max(red, green), blue)
    chroma = high - dmath.min(dmath.min(red, green), blue)
    safe_chroma = chroma + (chroma == 0)  # gray pixels: any hue works, avoid 0 / 0
    red_is_max = red == high
    green_is_max = (green == high) & (red != high)
    blue_is_max = (green != high) & (red != high)
    hue6 = (red_is_max * ((green - blue) / safe_chroma)
            + green_is_max * (2.0 + (blue - red) / safe_chroma)
            + blue_is_max * (4.0 + (red - green) / safe_chroma))  # hue in sixths of a turn, in [-1, 5]
    phase = hue6 + hue_phase  # (H, W, 1) + (3,) -> (H, W, 3)
    phase = phase - 6.0 * dmath.floor(phase / 6.0)
    return high - chroma * dmath.clamp(dmath.min(phase, 4.0 - phase), 0.0, 1.0)


def _augment_crop(images: DataNode, inputs: Sequence[DataNode], size: int, blur_kernel_size: int,
                  mean255: list[float], std255: list[float], on_gpu: bool) -> DataNode:
    """One crop of every row: window, resize, jitter slots, hue, grayscale, blur, flip + normalise to CHW."""
    anchor, window = inputs[0], inputs[1]
    blend = list(inputs[2:2 + 3 * BLEND_SLOTS])
    hue_phase, colour_matrix, blur, flip = inputs[2 + 3 * BLEND_SLOTS:]
    if on_gpu:  # tensor inputs of GPU arithmetic live on the GPU; argument inputs stay on the CPU
        blend = [weight.gpu() for weight in blend]
        hue_phase = hue_phase.gpu()
    crop = fn.slice(images, anchor, window, axis_names="HW", normalized_anchor=False, normalized_shape=False,
                    out_of_bounds_policy="error")
    # Slice first, then resize the whole slice: a resize ROI would also read pixels outside the window.
    image = fn.resize(crop, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
    for slot in range(BLEND_SLOTS):
        if slot == _SLOTS_BEFORE_HUE:
            image = _hue_stage(image, hue_phase)
        image = _blend_slot(image, *blend[3 * slot:3 * slot + 3])
    image = fn.coord_transform(image, M=colour_matrix)  # identity or three equal luma rows
    if blur_kernel_size == SIGMA_FOLLOWING_BLUR:
        # PIL's passes along rows, then along columns, edges repeated ("clamp"); kernels stay on the CPU.
        columns = fn.reshape(blur, shape=[BOX_KERNEL_TAPS, 1])
        for kernel in [blur] * PIL_BLUR_PASSES + [columns] * PIL_BLUR_PASSES:
            image = fn.filter(image, kernel, border="clamp")
    else:
        image = fn.gaussian_blur(image, window_size=blur_kernel_size, sigma=blur)
    return fn.crop_mirror_normalize(image, mirror=flip, mean=mean255, std=std255, output_layout="CHW",
                                    dtype=types.FLOAT)


@pipeline_def
def _crops_pipeline(source: Any, crop_sizes: Sequence[int], blur_kernel_size: int, mean255: list[float],
                    std255: list[float], on_gpu: bool, encoded_size: int | None = None) -> tuple[DataNode, ...]:
    """DALI graph: uint8 NHWC images (or, with encoded_size, image files' bytes, decoded here and resized to
    encoded_size pixels square) plus per-crop parameters in, one normalised NCHW batch per crop out."""
    num_outputs = 1 + _INPUTS_PER_CROP * len(crop_sizes)
    per_crop_dtypes = ([types.FLOAT] * (2 + 3 * BLEND_SLOTS)) + [types.FLOAT, types.FLOAT, types.FLOAT, types.INT32]
    blur_ndim = 2 if blur_kernel_size == SIGMA_FOLLOWING_BLUR else 0  # box kernels, or sigmas
    per_crop_ndim = [1, 1] + [0] * (3 * BLEND_SLOTS) + [1, 2, blur_ndim, 0]
    fed = fn.external_source(
        source=source, num_outputs=num_outputs, batch=True,
        dtype=[types.UINT8] + per_crop_dtypes * len(crop_sizes),
        ndim=[1 if encoded_size else 3] + per_crop_ndim * len(crop_sizes),
        layout=["" if encoded_size else "HWC"] + [""] * (num_outputs - 1),
    )
    if encoded_size:
        # "mixed" decodes on the GPU (nvJPEG); the crop windows were drawn for the resized square.
        decoded = fn.decoders.image(fed[0], device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        images = fn.resize(decoded, size=[encoded_size, encoded_size], interp_type=types.INTERP_LINEAR,
                           antialias=True)
    else:
        images = fed[0].gpu() if on_gpu else fed[0]
    return tuple(
        _augment_crop(images, fed[1 + crop * _INPUTS_PER_CROP:1 + (crop + 1) * _INPUTS_PER_CROP], size,
                      blur_kernel_size, mean255, std255, on_gpu)
        for crop, size in enumerate(crop_sizes)
    )


# ------------------------------------------------------------------------------------------ running it
Tag = TypeVar("Tag")


class DaliCropAugmenter(Generic[Tag]):
    """Streams batches (images, crop parameters, tag) through one DALI pipeline; yields (tag, crop tensors).

    A pass may be left early: the next pass (or `finish_pass`) drains what the pipeline had prefetched.
    """

    def __init__(self, crop_sizes: Sequence[int], mean: Sequence[float], std: Sequence[float], *,
                 max_batch_size: int, blur_kernel_size: int = SIGMA_FOLLOWING_BLUR, dali_device: str,
                 output_device: torch.device,
                 num_threads: int, device_id: int | None = None, prefetch_queue_depth: int = 2,
                 encoded_size: int | None = None) -> None:
        check_mean_std(mean, std)
        if dali_device not in DALI_DEVICES:
            raise UserError(f"--dali_device must be one of {', '.join(DALI_DEVICES)}, got {dali_device!r}")
        if num_threads < 1:
            raise UserError(f"DALI needs at least one CPU thread, got {num_threads}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.crop_sizes = [int(size) for size in crop_sizes]
        self.blur_kernel_size = int(blur_kernel_size)
        self.dali_device = dali_device
        self.output_device = torch.device(output_device)
        self.device_id = device_id if dali_device == "gpu" else None
        self._feed: Iterator[tuple[np.ndarray, Sequence[CropParameters], Tag]] = iter(())
        self._tags: deque[Tag] = deque()
        self._generation = 0
        self.pipeline = _crops_pipeline(
            source=self._next_inputs, crop_sizes=self.crop_sizes, blur_kernel_size=self.blur_kernel_size,
            mean255=[255.0 * float(m) for m in mean], std255=[255.0 * float(s) for s in std],
            on_gpu=dali_device == "gpu", encoded_size=encoded_size,
            batch_size=int(max_batch_size), num_threads=int(num_threads), device_id=self.device_id,
            prefetch_queue_depth=int(prefetch_queue_depth),
        )
        self.pipeline.build()

    def _next_inputs(self) -> tuple[np.ndarray, ...]:
        """external_source callback: the next batch of the pass (StopIteration ends the pass)."""
        images, parameters, tag = next(self._feed)
        if len(parameters) != len(self.crop_sizes):
            raise ValueError(f"got parameters of {len(parameters)} crops, the pipeline makes {len(self.crop_sizes)}")
        if any(p.num_rows != len(images) for p in parameters):
            raise ValueError("every crop needs parameters for each image row")
        self._tags.append(tag)
        return (images if isinstance(images, list) else np.ascontiguousarray(images, dtype=np.uint8),
                *[array for crop in parameters
                  for array in crop.pipeline_inputs(self.blur_kernel_size == SIGMA_FOLLOWING_BLUR)])

    def stream(self, batches: Iterable[tuple[np.ndarray, Sequence[CropParameters], Tag]]
               ) -> Iterator[tuple[Tag, list[torch.Tensor]]]:
        """Augment `batches` in order (read lazily, a few ahead); starting a new stream ends the previous one."""
        self.finish_pass()
        self._generation += 1
        self._feed = iter(batches)
        return self._outputs(self._generation)

    def _outputs(self, generation: int) -> Iterator[tuple[Tag, list[torch.Tensor]]]:
        """Run the pipeline until the fed batches are used up, pairing every output with its tag."""
        try:
            while True:
                if generation != self._generation:
                    raise RuntimeError("a newer pass was started on this augmenter; iterate one pass at a time")
                self.pipeline.schedule_run()
                try:
                    outputs = self.pipeline.outputs()
                except StopIteration:
                    return
                yield self._tags.popleft(), [self._to_torch(output) for output in outputs]
        finally:
            if generation == self._generation:
                self.finish_pass()

    def finish_pass(self) -> None:
        """End the current pass: drop unread batches, drain prefetched outputs, re-arm the pipeline."""
        self._feed = iter(())
        while True:
            self.pipeline.schedule_run()  # with nothing left to feed this only marks the end of the pass
            try:
                self.pipeline.outputs()
            except StopIteration:
                break
        self.pipeline.reset()
        self._tags.clear()

    def _to_torch(self, tensor_list: Any) -> torch.Tensor:
        """Copy one DALI output batch into a new torch tensor on the output device."""
        dense = tensor_list.as_tensor()
        if self.dali_device == "gpu":
            target = torch.empty(dense.shape(), dtype=torch.float32, device=torch.device("cuda", self.device_id))
            feed_ndarray(dense, target, cuda_stream=torch.cuda.current_stream(target.device))
        else:
            pin = self.output_device.type == "cuda"
            target = torch.empty(dense.shape(), dtype=torch.float32, pin_memory=pin)
            feed_ndarray(dense, target)
        return target.to(self.output_device, non_blocking=True)


Plan = list[tuple[int, np.ndarray, np.ndarray]]


class DaliTrainLoader:
    """Training batches of a federated schedule, augmented by one DALI pipeline for all clients of the rank."""

    def __init__(self, images: np.ndarray, schedule: FederatedSchedule, view_spec: ViewSpec,
                 mean: Sequence[float], std: Sequence[float], *, dali_device: str, output_device: torch.device,
                 num_threads: int, seed: int, device_id: int | None = None) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images = images
        # Image files go to DALI undecoded: its decoder reads them (on the GPU where there is one).
        self.encoded = isinstance(images, ImageFiles)
        self.schedule = schedule
        self.view_spec = view_spec
        self.seed = int(seed)
        self.steps_per_epoch = schedule.steps_per_epoch
        crops = view_spec.crops()
        # The largest step: the pool's clients with the largest batches.
        largest_step = sum(sorted(schedule.batch_sizes, reverse=True)[:schedule.pool_size])
        self.augmenter: DaliCropAugmenter[Plan] = DaliCropAugmenter(
            [size for size, _ in crops], mean, std, max_batch_size=largest_step,
            blur_kernel_size=view_spec.blur_kernel_size, dali_device=dali_device, output_device=output_device,
            num_threads=num_threads, device_id=device_id, encoded_size=images.shape[1] if self.encoded else None)

    def pool(self, epoch: int) -> list[int]:
        """Clients sampled for `epoch`, ascending."""
        return self.schedule.pool(epoch)

    def epoch(self, epoch: int, start_step: int = 0, clients: Sequence[int] | None = None) -> Iterator[StepBatch]:
        """Step batches of `epoch` from `start_step` to the end, for the pool or the given subset of it."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        # Each step's plan is made when the pipeline asks for it, so an epoch of any length starts at once.
        plans = (self.schedule.step_plan(epoch, step, clients) for step in range(start_step, self.steps_per_epoch))
        stream = self.augmenter.stream(self._step_inputs(plan) for plan in plans)
        return self._batches(stream)

    def reset(self) -> None:
        """End any pass in progress, so that the next `epoch` call starts from a clean pipeline."""
        self.augmenter.finish_pass()

    def _step_inputs(self, plan: Plan) -> tuple[np.ndarray, list[CropParameters], Plan]:
        """Images and crop parameters of one step's rows, client-major, plus the plan they came from."""
        indices = np.concatenate([indices for _, indices, _ in plan])
        keys = np.concatenate([keys for _, _, keys in plan])
        parameters = draw_view_parameters(keys, self.seed, self.view_spec, self.images.shape[1:3])
        return (self.images.encoded(indices) if self.encoded else self.images[indices]), parameters, plan

    @staticmethod
    def _batches(stream: Iterator[tuple[Plan, list[torch.Tensor]]]) -> Iterator[StepBatch]:
        """Wrap each step's crops with its plan's client layout."""
        try:
            for plan, crops in stream:
                yield StepBatch(
                    crops=crops,
                    client_ids=[client for client, _, _ in plan],
                    rows_per_client=[len(indices) for _, indices, _ in plan],
                    sample_indices=torch.from_numpy(np.concatenate([indices for _, indices, _ in plan])),
                )
        finally:
            stream.close()  # leaving early drains the pipeline now, not whenever the stream is collected


def resolve_dali_device(dali_device: str | None) -> str:
    """'gpu' or 'cpu': the requested DALI device, or gpu when CUDA is available and none was requested."""
    if dali_device is None:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if dali_device not in DALI_DEVICES:
        raise UserError(f"--dali_device must be one of {', '.join(DALI_DEVICES)}, got {dali_device!r}")
    if dali_device == "gpu" and not torch.cuda.is_available():
        raise UserError("--dali_device gpu needs a CUDA GPU, and none is available; use --dali_device cpu")
    return dali_device


def build_dali_loaders(dataset: ImageDataset, schedule: FederatedSchedule, view_spec: ViewSpec, *,
                       device: torch.device, dali_device: str | None, eval_batch_size: int,
                       num_threads: int, seed: int) -> FederatedLoaders:
    """Training loader over the schedule (DALI) plus memory (train, un-augmented) and test loaders on `device`."""
    check_image_array(dataset.train_images, dataset.train_labels, "train")
    check_image_array(dataset.test_images, dataset.test_labels, "test")
    check_mean_std(dataset.mean, dataset.std)
    largest_index = max(int(shard.max()) for shard in schedule.client_indices)
    if largest_index >= dataset.train_images.shape[0]:
        raise ValueError(f"the partition refers to index {largest_index}, "
                         f"but there are {dataset.train_images.shape[0]} images")
    resolved = resolve_dali_device(dali_device)
    device = torch.device(device)
    device_id = None
    if resolved == "gpu":
        device_id = device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()
    train = DaliTrainLoader(dataset.train_images, schedule, view_spec, dataset.mean, dataset.std,
                            dali_device=resolved, output_device=device, num_threads=num_threads, seed=seed,
                            device_id=device_id)
    return FederatedLoaders(
        train=train,
        memory=NormalisedImageLoader(*dataset.memory_split, dataset.mean, dataset.std, eval_batch_size,
                                     device=device),
        test=NormalisedImageLoader(dataset.test_images, dataset.test_labels, dataset.mean, dataset.std,
                                   eval_batch_size, device=device),
        backend="dali",
        num_classes=dataset.num_classes,
    )
