"""What a model was trained on, from a file to the network's input: it belongs to the model.

Every step that training applied between an image file and the network (decoding to 1 or 3
channels, the square resize of a cached collection, Omniglot's inversion, the evaluation
resize/crop of the augmentation preset and its normalisation) is recorded in the checkpoint
(`meta["pipeline"]`) and applied by every consumer of a trained model (`grafit evaluate`, `grafit
search` and its index, the matrix's example figures);
fine-tuning refuses target images that the trunk never saw the like of.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import torch

from grafit_core.data.images import decode_image
from grafit_core.data.transforms import build_transform


@dataclass(frozen=True)
class Pipeline:
    channels: int                             # decoded as grayscale (1) or RGB (3)
    invert: bool                              # 255 - x (Omniglot: bright ink on black)
    augment: str                              # the preset: evaluation resize/crop, normalisation statistics
    image_size: int
    decoded_size: Optional[int] = None        # a cached collection decodes every file to S x S first

    def decode(self, path: str) -> torch.Tensor:
        """An image file as the uint8 C x H x W tensor training saw."""
        return decode_image(path, self.channels, self.decoded_size, self.invert)

    def transform(self):
        """The evaluation transform: uint8 C x H x W -> the network's normalised input."""
        return build_transform(self.augment, self.image_size, self.channels, train=False)

    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def describe(self) -> str:
        return (f"{self.channels} channel(s){', inverted (255 - x)' if self.invert else ''}"
                f"{f', decoded at {self.decoded_size} px' if self.decoded_size else ''}, preset {self.augment!r} "
                f"at {self.image_size} px")


def pipeline_of(cfg, collection) -> Pipeline:
    """The pipeline of a training run: its collection's decoding and the config's preset."""
    channels = getattr(collection, "channels", None) or int(collection.image(0).shape[0])
    return Pipeline(channels, bool(getattr(collection, "invert", False)), cfg.data.augment, cfg.data.image_size,
                    getattr(collection, "cache_size", None))


def pipeline_from_meta(cfg, meta: dict) -> Pipeline:
    """A checkpoint's pipeline; checkpoints written before it was recorded take it from their config
    (Omniglot's loader inverts unless data.options.invert is false)."""
    if "pipeline" in meta:
        return Pipeline(**meta["pipeline"])
    omniglot = cfg.data.name == "omniglot"    # its loader's defaults: inverted, cached at 32 px
    invert = omniglot and cfg.data.options.get("invert", True)
    size = cfg.data.options.get("cache_size", 32 if omniglot else None)
    return Pipeline(int(meta["in_channels"]), bool(invert), cfg.data.augment, cfg.data.image_size, size)
