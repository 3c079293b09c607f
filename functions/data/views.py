"""Which augmented views a client makes of each image: the one description both data paths (torch, DALI) read."""
from __future__ import annotations

from dataclasses import dataclass

from functions.core.errors import UserError

# MocoSFL's blur (its utils.GaussianBlur): sigma uniform in this range, applied with probability 0.5 (mocov2).
BLUR_SIGMA = (0.1, 2.0)
# blur_kernel_size meaning "PIL's radius blur, whose extent follows sigma" (MocoSFL's) rather than a fixed side.
SIGMA_FOLLOWING_BLUR = 0


@dataclass(frozen=True)
class ViewSpec:
    """`nmb_crops[i]` crops of `size_crops[i]` pixels (RandomResizedCrop scale in [min, max]), crop-major.

    Every crop then gets the MoCo v2 photometric chain (colour jitter, grayscale, a Gaussian blur with probability
    `blur_probability`, flip, normalisation). The blur's sigma is drawn in BLUR_SIGMA; with `blur_kernel_size` 0
    (the default) it is MocoSFL's blur, PIL's GaussianBlur(radius=sigma), whose extent follows sigma; an odd
    `blur_kernel_size` instead blurs with a fixed kernel of that side. The spec is checked when it is made: an
    impossible one is a UserError naming the options.
    """

    nmb_crops: tuple[int, ...]
    size_crops: tuple[int, ...]
    min_scale_crops: tuple[float, ...]
    max_scale_crops: tuple[float, ...]
    blur_kernel_size: int = SIGMA_FOLLOWING_BLUR
    blur_probability: float = 0.5

    def __post_init__(self) -> None:
        for name in ("nmb_crops", "size_crops", "min_scale_crops", "max_scale_crops"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from options or YAML
        lists = {"nmb_crops": self.nmb_crops, "size_crops": self.size_crops,
                 "min_scale_crops": self.min_scale_crops, "max_scale_crops": self.max_scale_crops}
        lengths = {name: len(values) for name, values in lists.items()}
        if len(set(lengths.values())) != 1:
            described = ", ".join(f"--{name} has {length}" for name, length in lengths.items())
            raise UserError(f"the crop lists must have the same length: {described}")
        if not self.nmb_crops:
            raise UserError("--nmb_crops needs at least one value")
        if any(int(n) < 1 for n in self.nmb_crops) or any(int(s) < 1 for s in self.size_crops):
            raise UserError(f"--nmb_crops and --size_crops must be positive (got {list(self.nmb_crops)} and "
                            f"{list(self.size_crops)})")
        for low, high in zip(self.min_scale_crops, self.max_scale_crops):
            if not 0.0 < float(low) <= float(high) <= 1.0:
                raise UserError(f"crop scales must satisfy 0 < min <= max <= 1 (got min {low}, max {high})")
        if not 0.0 <= float(self.blur_probability) <= 1.0:
            raise UserError(f"the blur probability must be in [0, 1] (got {self.blur_probability})")
        kernel = int(self.blur_kernel_size)
        if kernel != SIGMA_FOLLOWING_BLUR and (kernel < 1 or kernel % 2 == 0):
            raise UserError(f"the blur kernel must be an odd number of pixels, or 0 for a kernel that follows sigma "
                            f"(got {self.blur_kernel_size})")

    @property
    def total_crops(self) -> int:
        """Crops per image."""
        return sum(int(n) for n in self.nmb_crops)

    def crops(self) -> list[tuple[int, tuple[float, float]]]:
        """(size, (min scale, max scale)) of every crop, crop-major."""
        expanded = []
        for count, size, low, high in zip(self.nmb_crops, self.size_crops, self.min_scale_crops, self.max_scale_crops):
            expanded.extend([(int(size), (float(low), float(high)))] * int(count))
        return expanded
