"""Global execution settings: how adapted layers run, process-wide.

Every setting computes the same function; they choose between implementations of it:

``path``           ``"fused"`` (default): LoRA and the DoRA family run the fast path of :mod:`doran.fast`
                   (hand-written autograd nodes; Pre-Diag's diagonal and SORA's rotation always run the
                   reference path); ``"reference"``: plain autograd, every method (doran/layers.py).
``scale``          how the fused path applies the DoRA row scale g: ``"auto"`` (by shape), ``"weight"``
                   (scale the weight rows) or ``"output"`` (scale the output columns).
``bank``           compute the factors and row scales of all slices of a model batched, once per
                   forward (doran/fast/bank.py); default True.
``compiled``       the path a model takes inside ``torch.compile``: ``"fused"`` (default; the compiler
                   traces the fast path's autograd nodes) or ``"reference"`` (it traces plain autograd).
``compiled_bank``  whether a compiled model traces the bank's batched computation (default True) or
                   each slice's own.

This module holds values only; the maths (doran/layers.py) reads them through :func:`fused_enabled`, the
fast path through the other queries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_SETTINGS: dict[str, Any] = {"path": "fused", "scale": "auto", "bank": True, "compiled": "fused",
                             "compiled_bank": True}
PATHS = ("fused", "reference")
SCALES = ("auto", "weight", "output")


def set_execution(path: str | None = None, scale: str | None = None, bank: bool | None = None,
                  compiled: str | None = None, compiled_bank: bool | None = None) -> dict[str, Any]:
    """Choose how adapted layers run (see the module docstring); returns the previous settings.

    Arguments left at None keep their value. A bad value raises ``ValueError`` and changes nothing.

    Example::

        previous = doran.set_execution(path="reference")
        ...
        doran.set_execution(**previous)
    """
    choices = {"path": (path, PATHS, "execution path"), "scale": (scale, SCALES, "scale mode"),
               "compiled": (compiled, PATHS, "compiled path")}
    for value, allowed, what in choices.values():  # check every value before changing any
        if value is not None and value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose one of {allowed}")
    previous = dict(_SETTINGS)
    for key, (value, _, _) in choices.items():
        if value is not None:
            _SETTINGS[key] = value
    for key, flag in (("bank", bank), ("compiled_bank", compiled_bank)):
        if flag is not None:
            _SETTINGS[key] = bool(flag)
    return previous


@contextmanager
def execution(path: str | None = None, scale: str | None = None, bank: bool | None = None,
              compiled: str | None = None, compiled_bank: bool | None = None) -> Iterator[None]:
    """Context manager form of :func:`set_execution`: the previous settings come back on exit.

    Example::

        with doran.execution(path="reference"):
            loss = model(x).sum()
    """
    previous = set_execution(path, scale, bank, compiled, compiled_bank)
    try:
        yield
    finally:
        set_execution(**previous)


def fused_enabled() -> bool:
    """Whether fusable layers take the fused path now (inside torch.compile: the ``compiled`` setting)."""
    if torch.compiler.is_compiling():
        return _SETTINGS["path"] == "fused" and _SETTINGS["compiled"] == "fused"
    return _SETTINGS["path"] == "fused"


def bank_enabled() -> bool:
    """Whether the adapter bank computes a model's slices batched (fused path and ``bank``)."""
    return _SETTINGS["path"] == "fused" and _SETTINGS["bank"]


def compiled_bank() -> bool:
    """Whether a compiled model traces the bank's batched computation (else each slice its own)."""
    return _SETTINGS["compiled_bank"] and _SETTINGS["compiled"] == "fused"
