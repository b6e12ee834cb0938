"""The package layout: no import cycles, the maths never imports the fast path, short files, one error tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "doran"

# Modules outside doran/fast/ that may import doran.fast, each with the reason
MAY_IMPORT_FAST = {
    "doran": "the package imports the fast path so that it plugs itself into the maths",
    "doran.training.module": "the Lightning modules run compiled models and step the fused AdamW",
}

# Files of doran/ allowed 500 lines or more, each with the reason (none today)
LONG_FILES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file (inside functions too)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:  # an attribute of a module: the module
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:  # ``from package import submodule`` needs the submodule only
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in modules else source)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_module_graph_has_no_cycle():
    graph = _graph()
    assert "doran.fast.bank" in graph and "doran.inject" in graph["doran.fast.bank"] | graph["doran.fast.groups"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_fast_path_and_its_users_import_it():
    offenders = {name: sorted(t for t in targets if t == "doran.fast" or t.startswith("doran.fast."))
                 for name, targets in _graph().items()
                 if not (name == "doran.fast" or name.startswith("doran.fast.")) and name not in MAY_IMPORT_FAST}
    assert {name: t for name, t in offenders.items() if t} == {}


@pytest.mark.parametrize("maths", ["doran.config", "doran.norm", "doran.generators", "doran.layers",
                                   "doran.targets", "doran.inject", "doran.io", "doran.settings",
                                   "doran.errors"])
def test_the_maths_imports_nothing_of_the_fast_path_even_indirectly(maths):
    graph = _graph()
    seen, todo = set(), [maths]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(graph.get(node, ()))
    assert not {m for m in seen if m == "doran.fast" or m.startswith("doran.fast.")}


def test_files_are_short_or_listed():
    long = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_long = {p: n for p, n in long.items() if n >= 500 and p not in LONG_FILES}
    assert too_long == {}, f"split these files or list them in LONG_FILES with a reason: {too_long}"
    assert all(p in long and reason for p, reason in LONG_FILES.items())


def test_one_error_hierarchy_caught_as_before():
    import doran
    from doran import errors

    names = ["ConfigError", "InjectError", "AdapterFileError", "DataError", "AssetError", "ArchiveError",
             "CommonsenseDataError", "WeightsError", "ModelFilesError", "ConversionError"]
    for name in names:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.DoranError) and issubclass(cls, ValueError), name
        assert getattr(doran, name) is cls and name in doran.__all__, name
        assert cls.__doc__, name
    for name in ("AssetError", "ArchiveError", "WeightsError", "ModelFilesError"):
        err = getattr(errors, name)("missing: how to fix it")
        assert isinstance(err, FileNotFoundError) and str(err) == "missing: how to fix it"
        with pytest.raises(FileNotFoundError):
            raise err
    assert issubclass(errors.ConversionError, RuntimeError)
    # the old homes still give the same classes
    from doran.errors import ConfigError, DoranError
    from doran.inject import InjectError
    from doran.io import AdapterFileError

    assert (ConfigError, DoranError, InjectError, AdapterFileError) == (
        errors.ConfigError, errors.DoranError, errors.InjectError, errors.AdapterFileError)
