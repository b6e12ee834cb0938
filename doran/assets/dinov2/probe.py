"""Linear probe: are the converted features pretrained? Frozen features of the converted backbone against
those of the same network randomly initialised, on the image suite's tasks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .model import DEFAULT_IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD, build_classifier


@torch.no_grad()
def extract_features(model: nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS, mean patch]`` features (N, 768) of a backbone or a ``Dinov2ForImageClassification``, and labels."""
    backbone = getattr(model, "dinov2", model)
    feats, labels = [], []
    for batch in loader:
        hidden = backbone(pixel_values=batch["pixel_values"]).last_hidden_state
        feats.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1).float())
        labels.append(torch.as_tensor(batch["labels"]))
    return torch.cat(feats), torch.cat(labels)


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, steps: int = 200
) -> nn.Linear:
    """Multinomial logistic regression with L2 penalty ``weight_decay``, full-batch L-BFGS (deterministic)."""
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0),
) -> dict[str, Any]:
    """Standardise features (train statistics), pick the L2 penalty on val, refit on train+val, score test."""
    mean, std = train[0].mean(0), train[0].std(0).clamp_min(1e-6)
    norm = lambda x: (x - mean) / std
    acc = lambda head, data: float((head(norm(data[0])).argmax(1) == data[1]).float().mean())
    val_acc = {wd: acc(fit_logistic(norm(train[0]), train[1], num_classes, wd), val) for wd in grid}
    best = max(grid, key=lambda wd: (val_acc[wd], wd))  # ties: the stronger penalty
    both = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    head = fit_logistic(norm(both[0]), both[1], num_classes, best)
    return {"val_accuracy": val_acc, "weight_decay": best, "test_accuracy": acc(head, test)}


def probe(
    tasks: Sequence[str] = ("mnist", "elpv_binary"),
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    test_per_task: int | None = 1000,
    batch_size: int = 64,
    threads: int | None = 2,
) -> dict[str, Any]:
    """Linear probe on frozen ``[CLS, mean patch]`` features: converted weights vs the same net randomly initialised.

    For each task: fit on the task's 800 training images, choose the L2 penalty on its 200 validation
    images, refit on all 1,000 and score a fixed stratified subsample of ``test_per_task`` test images
    (``None``: the whole test split). Returns accuracies, sizes and seconds per task and backbone.
    """
    from torch.utils.data import DataLoader

    from doran.data import imagesuite

    if threads:
        torch.set_num_threads(threads)
    results: dict[str, Any] = {"image_size": image_size, "test_per_task": test_per_task, "tasks": {}}
    backbones = {"pretrained": build_classifier(1, image_size).dinov2,
                 "random_init": build_classifier(1, image_size, pretrained=False, seed=0).dinov2}  # fmt: skip
    for name in tasks:
        splits, info = imagesuite.load_task(name)
        test = splits.test
        if test_per_task is not None and test_per_task < len(test):
            test = test.take(imagesuite.stratified_take(test.labels, test_per_task, seed=0, purpose=9))
        parts = {"train": splits.train, "val": splits.val, "test": test}
        loaders = {
            k: DataLoader(
                imagesuite.ArrayImageDataset(s, image_size, IMAGE_MEAN, IMAGE_STD), batch_size=batch_size
            )
            for k, s in parts.items()
        }
        entry: dict[str, Any] = {"sizes": {k: len(s) for k, s in parts.items()},
                                 "stored_size": info["stored_size"]}  # fmt: skip
        for label, backbone in backbones.items():
            start = time.perf_counter()
            feats = {k: extract_features(backbone, loader) for k, loader in loaders.items()}
            extracted = time.perf_counter() - start
            res = linear_probe(feats["train"], feats["val"], feats["test"], splits.num_classes)
            res["seconds_features"] = round(extracted, 1)
            res["seconds_total"] = round(time.perf_counter() - start, 1)
            entry[label] = res
        results["tasks"][name] = entry
    return results
