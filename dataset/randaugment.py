"""X-VLM's ``RandomAugment(N, M)`` (FISVL's RSITMD/RSICD pipelines) rebuilt on torchvision's PIL kernels.

X-VLM draws N ops uniformly with replacement and applies each with probability 0.5 at level M / 10.
Brightness and Sharpness use the fixed factor 1.8 * M / 10 + 0.1 (so they only brighten or sharpen);
the geometric ops take a random sign, interpolate bilinearly and fill with grey 128, as X-VLM's
OpenCV code does. Shears are about the top-left corner, like X-VLM's ``warpAffine`` matrix.
"""
from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
       "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAX_LEVEL = 10.0
FILL = [128.0, 128.0, 128.0]
_BILINEAR = InterpolationMode.BILINEAR


class RandomAugment(torch.nn.Module):
    """Apply ``num_ops`` ops drawn from ``ops`` (with replacement), each with probability ``prob``.

    Randomness comes from torch's generator, which the training dataset seeds per sample.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 7, prob: float = 0.5, ops: tuple[str, ...] = OPS) -> None:
        super().__init__()
        unknown = set(ops) - set(OPS)
        if unknown or not ops:
            raise ValueError(f"RandomAugment ops must be a non-empty subset of {OPS}, got {ops}")
        self.num_ops, self.magnitude, self.prob, self.ops = num_ops, magnitude, prob, tuple(ops)

    def forward(self, image: Image.Image) -> Image.Image:
        picks = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        runs = (torch.rand(self.num_ops) < self.prob).tolist()
        signs = (torch.randint(2, (self.num_ops,)) * 2 - 1).tolist()
        for pick, run, sign in zip(picks, runs, signs):
            if run:
                image = self.apply_op(image, self.ops[pick], sign)
        return image

    def apply_op(self, image: Image.Image, name: str, sign: int = 1) -> Image.Image:
        """One op at this magnitude; ``sign`` (+1/-1) orients the geometric ones."""
        level = self.magnitude / MAX_LEVEL
        if name == "Identity":
            return image
        if name == "AutoContrast":
            return F.autocontrast(image)
        if name == "Equalize":
            return F.equalize(image)
        if name == "Brightness":
            return F.adjust_brightness(image, 1.8 * level + 0.1)
        if name == "Sharpness":
            return F.adjust_sharpness(image, 1.8 * level + 0.1)
        if name in ("ShearX", "ShearY"):
            degrees = math.degrees(math.atan(sign * 0.3 * level))
            shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
            return F.affine(image, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear,
                            interpolation=_BILINEAR, fill=FILL, center=[0.0, 0.0])
        if name in ("TranslateX", "TranslateY"):
            pixels = sign * 10.0 * level
            translate = [pixels, 0.0] if name == "TranslateX" else [0.0, pixels]
            return F.affine(image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                            interpolation=_BILINEAR, fill=FILL)
        if name == "Rotate":
            return F.rotate(image, sign * 30.0 * level, interpolation=_BILINEAR, fill=FILL)
        raise ValueError(f"unknown RandomAugment op {name!r}; known: {OPS}")
