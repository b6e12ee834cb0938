"""Commonsense reasoning in the instruction format of the commonsense-170k protocol (LLM-Adapters, DoRA).

Every record is ``{"instruction": ..., "input": "", "output": "the correct answer is <answer>",
"answer": "<answer>"}``. Training uses the instruction prompt template below and a loss on the response
tokens only; evaluation generates a response and extracts the answer with a per-task pattern.

The eight test sets and their answer vocabularies: BoolQ ``true/false``, PIQA ``solution1/2``, SIQA
``answer1..5``, HellaSwag ``ending1..4``, WinoGrande ``option1/2``, ARC-e, ARC-c and OBQA ``answer1..5``.
Answer extraction follows the DoRA protocol (the first match of the task's pattern in the generated
response); ours also lower-cases the response first, so that "True" counts as "true" (our choice).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from doran.errors import CommonsenseDataError

#: task name (the folder name of the standard data layout) -> answer pattern
TASKS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
}
REQUIRED_FIELDS = ("instruction", "input", "output")

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
RESPONSE_MARK = "### Response:"


def answers(task: str) -> list[str]:
    """The answer vocabulary of ``task`` (``["true", "false"]`` for BoolQ)."""
    return TASKS[task].split("|")


def _json_records(path: Path) -> list[tuple[int, Any]]:
    """``(line, record)`` for every element of the JSON list in ``path``; errors name the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CommonsenseDataError(f"{path}: not UTF-8 (byte offset {err.start}); save the file as UTF-8") from None
    decoder = json.JSONDecoder()
    seen = [0, 1]  # (offset, line) of the last lookup: records are visited in order, so count onwards

    def line_of(offset: int) -> int:
        if offset < seen[0]:
            seen[:] = [0, 1]
        seen[1] += text.count("\n", seen[0], offset)
        seen[0] = offset
        return seen[1]

    def fail(offset: int, what: str) -> CommonsenseDataError:
        return CommonsenseDataError(
            f"{path}:{line_of(offset)}: {what}; a commonsense file is one JSON list of records "
            '[{"instruction": ..., "input": "", "output": "the correct answer is ...", "answer": ...}, ...]'
        )

    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        raise fail(i, "not a JSON list (it must start with '[')")
    i += 1
    out: list[tuple[int, Any]] = []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "]" and not out:
            break
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise fail(err.pos, f"not valid JSON ({err.msg})") from None
        out.append((line_of(i), record))
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "]":
            break
        raise fail(i, "not valid JSON (expected ',' or ']' after a record)")
    if text[i + 1 :].strip():
        raise fail(i + 1, "not valid JSON (text after the closing ']')")
    return out


def load_records(
    path: str | Path, require_answer: bool = False, task: str | None = None
) -> list[dict[str, Any]]:
    """Read a JSON list of records in the commonsense-170k format, checking every record.

    Every record needs the text fields ``instruction`` and ``output`` (training) or ``instruction`` and
    ``answer`` (``require_answer=True``, a test set); ``input`` (and ``output`` / ``answer`` where not
    required) must be text when present. With ``task`` (a test set, or a training file in a task folder),
    a gold ``answer`` must be one of the task's answers exactly (``ending1`` .. ``ending4`` for HellaSwag),
    since evaluation compares it with the answer extracted from the lower-cased response. Errors name the
    file, the line and the fix.

    Example::

        records = load_records("data/commonsense/boolq/test.json", require_answer=True, task="boolq")
    """
    path = Path(path)
    if not path.is_file():
        raise CommonsenseDataError(
            f"no commonsense data at {path}; expected a JSON list of records with keys "
            f"{REQUIRED_FIELDS + ('answer',)} (the commonsense-170k format), e.g. <data>/boolq/test.json"
        )
    rows = _json_records(path)
    if not rows:
        raise CommonsenseDataError(f"{path}: the JSON list is empty; it must hold at least one record")
    needed = ("instruction", "answer") if require_answer else ("instruction", "output")
    vocab = answers(task) if task is not None else None
    records = []
    for i, (line, rec) in enumerate(rows):
        where = f"{path}:{line}: record {i}"
        if not isinstance(rec, dict):
            raise CommonsenseDataError(f"{where} is a {type(rec).__name__}, not an object {{...}}")
        missing = [k for k in needed if k not in rec]
        if missing:
            raise CommonsenseDataError(
                f"{where} has no {missing[0]!r}; {'test' if require_answer else 'training'} records need "
                f"{list(needed)} (keys here: {sorted(rec)})"
            )
        for key in ("instruction", "input", "output", "answer"):
            if key in rec and not isinstance(rec[key], str):
                raise CommonsenseDataError(
                    f"{where}: {key!r} must be text, got {type(rec[key]).__name__} {rec[key]!r}"
                )
        if vocab is not None and "answer" in rec and rec["answer"] not in vocab:
            raise CommonsenseDataError(
                f"{where}: gold answer {rec['answer']!r} is not an answer of {task} ({'/'.join(vocab)}); "
                "write it exactly as one of them (lower case)"
            )
        records.append(rec)
    return records


def task_of(path: str | Path, strict: bool = True) -> str | None:
    """The task of a data file by its folder name (``<data>/<task>/test.json``).

    ``strict=False`` returns None for a file outside a task folder (``commonsense_170k.json``)."""
    name = Path(path).parent.name
    if name not in TASKS:
        if not strict:
            return None
        raise CommonsenseDataError(f"cannot tell the task of {path}: its folder {name!r} is not one of "
                                   f"{sorted(TASKS)}; put each test set in a folder named after its task")
    return name


def validate_files(train_paths: Sequence[str | Path], test_paths: Sequence[str | Path]) -> dict[str, int]:
    """Read and check every training and test record (see ``load_records``) before any model loads.

    Returns the number of records per file."""
    counts = {}
    for p in train_paths:
        counts[str(p)] = len(load_records(p, task=task_of(p, strict=False)))
    for p in test_paths:
        counts[str(p)] = len(load_records(p, require_answer=True, task=task_of(p)))
    return counts


def prompt(record: dict[str, Any], with_output: bool = False) -> str:
    """The instruction prompt (Alpaca template, as in the commonsense-170k protocol)."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    text = template.format(instruction=record["instruction"], input=record.get("input", ""))
    return text + record["output"] if with_output else text


def tokenize_for_training(record: dict[str, Any], tokenizer, cutoff: int = 256) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels with the loss on the response tokens only.

    The prompt and response are tokenized together, truncated at ``cutoff`` tokens, and an EOS token is
    appended when there is room; labels are -100 on the prompt tokens.
    """
    full = tokenizer(prompt(record, with_output=True), truncation=True, max_length=cutoff,
                     add_special_tokens=True)["input_ids"]
    if len(full) < cutoff and tokenizer.eos_token_id is not None and (not full or full[-1] != tokenizer.eos_token_id):
        full = full + [tokenizer.eos_token_id]
    n_prompt = len(tokenizer(prompt(record), truncation=True, max_length=cutoff, add_special_tokens=True)["input_ids"])
    labels = [-100] * min(n_prompt, len(full)) + full[n_prompt:]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into tensors (labels padded with -100)."""
    width = max(len(ex["input_ids"]) for ex in batch)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([ex[key] + [value] * (width - len(ex[key])) for ex in batch], dtype=torch.long)

    return {"input_ids": pad("input_ids", pad_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}


def extract_answer(task: str, generated: str) -> str:
    """The answer in a generated response: the first match of the task's pattern, or "" if none.

    Only the text after the last ``### Response:`` counts (the prompt itself lists the options).

    >>> extract_answer("boolq", "The correct answer is True.")
    'true'
    """
    if task not in TASKS:
        raise CommonsenseDataError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    response = generated.rsplit(RESPONSE_MARK, 1)[-1].strip().lower()
    found = re.findall(TASKS[task], response)
    return found[0] if found else ""


@torch.no_grad()
def evaluate(model, tokenizer, records: Sequence[dict[str, Any]], task: str, batch_size: int = 16,
             max_new_tokens: int = 32, num_beams: int = 1, limit: int | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Accuracy of ``model`` on ``records`` by batched generation and answer extraction.

    Generation is greedy (``num_beams=1``) or beam search (the DoRA protocol used 4 beams); prompts are
    left-padded. Returns ``{"accuracy", "n", "no_answer", "predictions"}``.
    """
    records = list(records)[:limit] if limit else list(records)
    if not records:
        raise CommonsenseDataError(f"no records to evaluate for task {task}")
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    predictions: list[str] = []
    iterator = range(0, len(records), batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"eval {task}", total=(len(records) + batch_size - 1) // batch_size)
    try:
        for start in iterator:
            chunk = records[start : start + batch_size]
            enc = tokenizer([prompt(r) for r in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            predictions += [extract_answer(task, t) for t in texts]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    correct = sum(p == r.get("answer") for p, r in zip(predictions, records))
    return {"accuracy": correct / len(records), "n": len(records),
            "no_answer": sum(p == "" for p in predictions), "predictions": predictions}
