"""Augmentation presets on uint8 tensors C x H x W -> normalised float32 C x S x S.

- "characters": pen strokes (Omniglot). Crops and a small rotation/shear, NO flip: a
  mirrored glyph is another character. Kept cheap: it runs per sample per view on CPU.
- "cifar": 32 px photos. Padded random crop, flip, RandAugment, RandomErasing.
- "natural": larger photos (ImageNet, iNaturalist). RandomResizedCrop, flip, RandAugment,
  RandomErasing (the DeiT recipe the paper trains with).
Evaluation: resize the shorter side, then center crop.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from grafit_core.errors import ConfigError

PRESETS = ("characters", "cifar", "natural")

# Per-preset RGB mean/std; a grayscale input uses their average.
_STATS = {
    # Omniglot inverted (bright ink on black), 32 px: measured over the training drawers.
    "characters": ((0.08, 0.08, 0.08), (0.22, 0.22, 0.22)),
    "cifar": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "natural": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Eval resize = image_size / ratio before the center crop (the usual 0.875 for photos).
_EVAL_CROP_RATIO = {"characters": 1.0, "cifar": 1.0, "natural": 0.875}


class GlyphCropAffine(torch.nn.Module):
    """RandomResizedCrop then a random rotation + shear, fused into ONE bilinear resampling.

    Samples like v2.RandomResizedCrop(size, scale, ratio) followed by
    v2.RandomAffine(degrees, shear=(-s, s, -s, s), fill=0) (an oversized crop is clipped
    instead of retried), ~5x faster on a 32 px glyph: one grid_sample, no v2 dispatch. Never flips.
    Out-of-image pixels are 0: background once Omniglot is inverted. uint8 C x H x W -> float32, normalised with
    mean/std (on the [0, 1] scale) here rather than by a separate Normalize, for speed.
    """

    def __init__(self, size: int, mean, std, scale=(0.6, 1.0), ratio=(0.8, 1.25),
                 degrees: float = 10.0, shear: float = 10.0):
        super().__init__()
        self.size, self.scale, self.degrees, self.shear = size, scale, degrees, shear
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        c, h, w = img.shape
        u = torch.rand(8).tolist()                       # global RNG: torch.manual_seed applies
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        r = math.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[1])
        # Crop half-extent as a fraction of the image, in grid_sample's [-1, 1] coordinates.
        cw, ch = min(1.0, math.sqrt(area * r * h / w)), min(1.0, math.sqrt(area * w / (h * r)))
        tx, ty = (2 * u[2] - 1) * (1 - cw), (2 * u[3] - 1) * (1 - ch)
        a = math.radians((2 * u[4] - 1) * self.degrees)
        shx, shy = (math.tan(math.radians((2 * v - 1) * self.shear)) for v in u[6:8])
        # output -> input map: diag(cw, ch) @ rotation @ shear, applied in the output square
        # (plain floats: a few tiny tensor ops would cost more than the resampling itself).
        co, si = math.cos(a), math.sin(a)
        theta = torch.tensor([[[cw * (co - si * shy), cw * (co * shx - si), tx],
                               [ch * (si + co * shy), ch * (si * shx + co), ty]]])
        grid = F.affine_grid(theta, [1, c, self.size, self.size], align_corners=False)
        x = img[None].float()
        if min(h, w) > self.size:
            # Bilinear sampling alone would alias thin strokes when shrinking a large image
            # (e.g. streamed 105 px Omniglot): shrink it first, antialiased, shorter side = size.
            f = self.size / min(h, w)
            x = F.interpolate(x, size=(max(1, round(h * f)), max(1, round(w * f))),
                              mode="bilinear", antialias=True, align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        return out.sub_(self.mean).div_(self.std)


def _stats(preset: str, channels: int) -> tuple[list[float], list[float]]:
    mean, std = _STATS[preset]
    if channels == 1:
        return [sum(mean) / 3], [sum(std) / 3]
    if channels != 3:
        raise ConfigError(f"data.channels: 1 or 3 expected, got {channels}")
    return list(mean), list(std)


def _train_ops(preset: str, size: int) -> list:
    if preset == "cifar":
        return [v2.Resize(size, antialias=True), v2.RandomCrop(size, padding=4),
                v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=9)]
    return [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=9)]


def _eval_ops(preset: str, size: int) -> list:
    resize = max(size, int(round(size / _EVAL_CROP_RATIO[preset])))
    return [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]


def build_transform(preset: str, image_size: int, channels: int, train: bool) -> v2.Compose:
    """The preset's train or eval pipeline for uint8 C x H x W input with `channels` channels."""
    if preset not in PRESETS:
        raise ConfigError(f"data.augment: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    mean, std = _stats(preset, channels)
    if train and preset == "characters":
        return v2.Compose([GlyphCropAffine(image_size, mean, std, scale=(0.6, 1.0),
                                           ratio=(0.8, 1.25), degrees=10, shear=10)])
    ops = _train_ops(preset, image_size) if train else _eval_ops(preset, image_size)
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]
    if train:
        # After Normalize, so erased pixels (0) sit at the dataset mean.
        ops.append(v2.RandomErasing(p=0.25, value=0))
    return v2.Compose(ops)
