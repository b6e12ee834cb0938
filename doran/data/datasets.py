"""Torch datasets, the epoch-seeded sampler (same batch order for every method with the same seed) and
``ClassificationDataModule``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .records import Split

try:  # the data module is optional: the readers work without Lightning
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    pl = None


class TextDataset(Dataset):
    """Texts (or text pairs) tokenised once up front (no padding: the collate pads each batch to its longest
    example). A pair is truncated longest-first to ``max_length`` tokens in all."""

    def __init__(self, split: Split, tokenizer: Any, max_length: int):
        pair = bool(split.inputs) and not isinstance(split.inputs[0], str)
        if pair:  # sentence pairs: (text, text_pair)
            first, second = [x[0] for x in split.inputs], [x[1] for x in split.inputs]
            enc = tokenizer(first, second, truncation=True, max_length=max_length, padding=False)
        else:
            enc = tokenizer(split.inputs, truncation=True, max_length=max_length, padding=False)
        self.input_ids: list[list[int]] = enc["input_ids"]
        # segment ids matter only for pairs (all zeros for single texts, which the model assumes anyway)
        self.token_type_ids: list[list[int]] | None = enc.get("token_type_ids") if pair else None
        self.labels = list(split.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[i], "label": self.labels[i], "index": i}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[i]
        return item


class TextCollate:
    """Pads ``input_ids`` to the longest in the batch; returns ``input_ids``, ``attention_mask``,
    ``labels`` and ``index`` tensors (shapes ``(B, L)``, ``(B, L)``, ``(B,)``, ``(B,)``), and
    ``token_type_ids`` ``(B, L)`` for sentence pairs."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        types = torch.zeros((len(items), length), dtype=torch.long) if "token_type_ids" in items[0] else None
        for row, it in enumerate(items):
            ids[row, : len(it["input_ids"])] = torch.as_tensor(it["input_ids"])
            mask[row, : len(it["input_ids"])] = 1
            if types is not None:
                types[row, : len(it["token_type_ids"])] = torch.as_tensor(it["token_type_ids"])
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.as_tensor([it["label"] for it in items]),
            "index": torch.as_tensor([it["index"] for it in items]),
        }
        if types is not None:
            batch["token_type_ids"] = types
        return batch


class ImageDataset(Dataset):
    """Images read with PIL as RGB and passed through a (timm) transform."""

    def __init__(self, split: Split, transform: Callable | None):
        self.paths, self.labels, self.transform = list(split.inputs), list(split.labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            image = img.convert("RGB")
        pixels = self.transform(image) if self.transform is not None else image
        return {"pixel_values": pixels, "labels": self.labels[i], "index": i}


def timm_transforms(model: torch.nn.Module, augment: bool = False) -> tuple[Callable, Callable]:
    """(train, eval) transforms from the timm backbone's data config (input size, crop, mean/std).

    ``augment=False`` (our default, the VTAB-1K convention) uses the eval transform for training too;
    ``augment=True`` uses timm's training transform (random resized crop, flip, colour jitter).
    """
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # a model built with img_size=... keeps its pretrained_cfg's input size
        cfg["input_size"] = (3, *tuple(img_size))
    eval_tf = timm.data.create_transform(**cfg, is_training=False)
    train_tf = timm.data.create_transform(**cfg, is_training=True) if augment else eval_tf
    return train_tf, eval_tf


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch, seeded by ``(seed, epoch)``.

    Every method run with the same seed sees the same batch order (pairing), and a run resumed at an epoch
    boundary sees the order it would have seen uninterrupted. Lightning calls ``set_epoch`` each epoch.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, 7]).generate_state(1)[0]))
        return iter(torch.randperm(self.n, generator=g).tolist())


_DataModuleBase = pl.LightningDataModule if pl is not None else object


class ClassificationDataModule(_DataModuleBase):
    """Train/val/test loaders over already-built datasets; the train order comes from ``EpochSeededSampler``.

    Example::

        dm = ClassificationDataModule(train_ds, val_ds, test_ds, batch_size=32, seed=1,
                                      collate_fn=TextCollate(tokenizer.pad_token_id))
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset,
        *,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
    ):
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.num_workers, self.collate_fn = seed, num_workers, collate_fn

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(
            self.train_set, self.batch_size, EpochSeededSampler(len(self.train_set), self.seed)
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size)
