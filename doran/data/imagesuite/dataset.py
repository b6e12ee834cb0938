"""The torch dataset of the image tasks: uint8 grayscale arrays as normalised 3-channel tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..records import Split


class ArrayImageDataset(Dataset):
    """uint8 ``(H, W)`` grayscale arrays as normalised 3-channel float tensors ``(3, S, S)``.

    Each image is scaled to [0, 1], resized to ``image_size`` (bicubic, antialiased when shrinking,
    clamped to [0, 1]), repeated over 3 channels and normalised with ``mean``/``std`` (DINOv2's are
    ImageNet's: ``doran.assets.dinov2.IMAGE_MEAN``/``IMAGE_STD``). Items are ``{"pixel_values", "labels", "index"}``
    like ``doran.data.ImageDataset``'s. ``augment=True`` adds a random resized crop (scale 0.85..1, aspect
    0.9..1.1) drawn from torch's global generator; no flips (they change a digit's class). Without
    augmentation each image is resized once and kept (float32, one channel): every epoch reads it back.
    """

    def __init__(
        self,
        split: Split,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        for i, image in enumerate(split.inputs):
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2):
                raise DataError(f"{split.source}: item {i} is not a uint8 (H, W) array; use load_task(...)")
        self.images, self.labels = list(split.inputs), list(split.labels)
        self.size, self.augment = int(image_size), bool(augment)
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)
        self._resized: list[torch.Tensor | None] = [None] * len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        area = h * w * float(torch.empty(1).uniform_(0.85, 1.0))
        ratio = float(torch.empty(1).uniform_(np.log(0.9), np.log(1.1)).exp())
        ch = min(h, max(1, round((area / ratio) ** 0.5)))
        cw = min(w, max(1, round((area * ratio) ** 0.5)))
        top = int(torch.randint(0, h - ch + 1, (1,)))
        left = int(torch.randint(0, w - cw + 1, (1,)))
        return x[..., top : top + ch, left : left + cw]

    def _resize(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).float().div_(255.0)[None, None]
        if self.augment:
            x = self._crop(x)
        if x.shape[-2:] != (self.size, self.size):
            shrink = x.shape[-1] > self.size or x.shape[-2] > self.size
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic",
                                                align_corners=False, antialias=shrink).clamp_(0.0, 1.0)  # fmt: skip
        return x[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.augment:
            x = self._resize(i)
        else:
            x = self._resized[i]
            if x is None:
                x = self._resized[i] = self._resize(i)
        pixels = (x.expand(3, -1, -1) - self.mean) / self.std
        return {"pixel_values": pixels, "labels": int(self.labels[i]), "index": i}
