"""GridMask (Chen et al. 2020, "GridMask Data Augmentation"), as FISVL's RSICD pipeline applies it.

FISVL uses the authors' ``Grid`` class: a square grid of stripes of period ``d`` and width
``l = ceil(d * ratio)``, randomly shifted and rotated, multiplies the normalised-to-[0, 1] image.
The original draws the stripes with a Python loop on a larger canvas and rotates it with PIL; here the
pixel coordinates are rotated instead, which gives the same mask in one vectorised expression.
"""
from __future__ import annotations

import math

import torch
from torchvision import tv_tensors


def grid_mask(height: int, width: int, d: int, stripe: int, offset: tuple[int, int], angle: float,
              mode: int, device: torch.device | None = None) -> torch.Tensor:
    """The (height, width) 0/1 mask: 1 keeps a pixel.

    A pixel is on a stripe when, in coordinates rotated by ``angle`` degrees about the image centre,
    ``(y - offset_y) mod d < stripe`` or ``(x - offset_x) mod d < stripe``. Mode 0 zeroes the stripes,
    mode 1 zeroes everything else.
    """
    ys = torch.arange(height, dtype=torch.float32, device=device) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float32, device=device) - (width - 1) / 2
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    y_rot, x_rot = cos * y - sin * x, sin * y + cos * x
    on_stripe = (torch.remainder(y_rot - offset[0], d) < stripe) | (torch.remainder(x_rot - offset[1], d) < stripe)
    return (on_stripe if mode == 1 else ~on_stripe).float()


class GridMask(torch.nn.Module):
    """With probability ``prob``, multiply a float CHW image by a random :func:`grid_mask`.

    The period ``d`` is drawn from ``[d_range[0], d_range[1])`` times the shorter image side (FISVL:
    96 to 224 pixels at 224), the offsets from ``[0, d)`` and the angle from ``[0, max_rotate)`` degrees.
    """

    def __init__(self, d_range: tuple[float, float] = (96 / 224, 1.0), ratio: float = 0.4,
                 max_rotate: float = 360.0, mode: int = 1, prob: float = 0.8) -> None:
        super().__init__()
        if mode not in (0, 1):
            raise ValueError(f"GridMask mode must be 0 (zero the stripes) or 1 (keep only them), got {mode}")
        if not 0 < d_range[0] < d_range[1]:
            raise ValueError(f"GridMask d_range must satisfy 0 < low < high, got {d_range}")
        self.d_range, self.ratio, self.max_rotate, self.mode, self.prob = d_range, ratio, max_rotate, mode, prob

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.prob:
            return image
        height, width = image.shape[-2:]
        side = min(height, width)
        low = max(1, round(self.d_range[0] * side))
        d = int(torch.randint(low, max(low + 1, round(self.d_range[1] * side)), ()))
        offset_y, offset_x = torch.randint(d, (2,)).tolist()
        angle = float(torch.rand(())) * self.max_rotate
        mask = grid_mask(height, width, d, math.ceil(d * self.ratio), (offset_y, offset_x), angle, self.mode,
                         image.device)
        return tv_tensors.wrap(image * mask.to(image.dtype), like=image)
