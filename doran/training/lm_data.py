"""Training data of the language-model arm: commonsense JSON files (or a synthetic copy task) tokenised with
the loss on the response tokens, a seeded validation hold-out, and the same global batches on any number of
devices (``SeededSampler``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from doran.data import commonsense as cs

from .seeds import derive_seed


class TokenizedRecords(Dataset):
    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def synthetic_copy_task(n: int, length: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """Fixed-length sequences whose second half repeats the first (loss on the second half only).

    A random-init model learns it within a few hundred steps, so loss curves are informative; every
    sequence has the same length, so the per-device mean and the global mean of the loss coincide
    (what a multi-GPU loss comparison needs).
    """
    g = torch.Generator().manual_seed(seed)
    half = length // 2
    out = []
    for _ in range(n):
        first = torch.randint(4, vocab, (half,), generator=g).tolist()
        ids = first + first
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * half + first})
    return out


class SeededSampler(Sampler[int]):
    """The run's batch order on any number of devices: one permutation per epoch from the run seed, of which
    rank k takes positions k, k + W, k + 2W, ... (W ranks). With a per-device batch B, the union of the
    ranks' k-th batches is exactly the k-th batch of size B * W of a one-device run: the same global batches
    on 1 or W devices. (Lightning's own DistributedSampler would reshuffle with its own seed.)
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, f"order-{self.epoch}"))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order += order[: len(self) * self.world_size - self.n]  # pad so every rank gets as many
        return iter(order[self.rank :: self.world_size])


class CommonsenseData(pl.LightningDataModule):
    """Training and validation batches from commonsense JSON files (or the synthetic copy task).

    ``train_paths``: one or more JSON files in the commonsense-170k format (e.g. commonsense_170k.json or
    several ``<task>/train.json``), concatenated. ``val_size`` records are held out by a seeded permutation
    (the DoRA recipe holds out 120). ``fraction`` keeps a seeded subset of the rest.
    """

    def __init__(self, tokenizer, train_paths: Sequence[str] = (), val_size: int = 120, cutoff: int = 256,
                 batch_size: int = 16, eval_batch_size: int = 16, fraction: float = 1.0, seed: int = 0,
                 synthetic: dict[str, int] | None = None, num_workers: int = 0):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"data.fraction={fraction} must lie in (0, 1]")
        if not train_paths and synthetic is None:
            raise ValueError("give data.train_paths (commonsense JSON files) or data.synthetic")
        self.tokenizer, self.train_paths, self.val_size, self.cutoff = tokenizer, list(train_paths), val_size, cutoff
        self.batch_size, self.eval_batch_size, self.fraction, self.seed = batch_size, eval_batch_size, fraction, seed
        self.synthetic, self.num_workers = synthetic, num_workers
        self.records = [r for p in self.train_paths for r in cs.load_records(p, task=cs.task_of(p, strict=False))]
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.synthetic is not None:
            s = self.synthetic
            examples = synthetic_copy_task(s["n"], s["length"], s.get("vocab", len(self.tokenizer)),
                                           derive_seed(self.seed, "synthetic-data"))
        else:
            examples = [cs.tokenize_for_training(r, self.tokenizer, self.cutoff) for r in self.records]
        g = torch.Generator().manual_seed(derive_seed(self.seed, "val-split"))
        order = torch.randperm(len(examples), generator=g).tolist()
        val_size = min(self.val_size, len(examples) // 2)
        val, train = order[:val_size], order[val_size:]
        train = train[: max(1, math.ceil(self.fraction * len(train)))]
        self.train_set = TokenizedRecords([examples[i] for i in train])
        self.val_set = TokenizedRecords([examples[i] for i in val])

    def _collate(self, batch):
        return cs.collate(batch, self.tokenizer.pad_token_id or 0)

    def train_dataloader(self) -> DataLoader:
        """Batches in the seeded order; under DDP/FSDP each rank takes its share (``SeededSampler``).

        The Trainer must run with ``use_distributed_sampler=False`` (``experiments.run_lm`` does).
        """
        shuffle = self.synthetic is None or self.synthetic.get("shuffle", True)
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = SeededSampler(len(self.train_set), self.seed, shuffle, rank, world)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self._collate,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_set):
            return []
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, collate_fn=self._collate,
                          num_workers=self.num_workers)
