"""The errors doran raises: one hierarchy under :class:`DoranError`, a ``ValueError``.

Every message names the problem and the fix. Errors about a missing file are also a
``FileNotFoundError`` (and a conversion failure also a ``RuntimeError``), so that code catching
those built-in types keeps catching them.

Example::

    try:
        doran.inject(model, cfg)
    except doran.DoranError as err:  # any of the errors below
        print(err)
"""

from __future__ import annotations


class DoranError(ValueError):
    """Base class of doran's input errors: the message names the problem and the fix."""


class ConfigError(DoranError):
    """A configuration value is out of range or unknown; the message says which and how to fix it."""


class InjectError(DoranError):
    """The model and the config do not fit together (unknown target, rank too large, ...)."""


class AdapterFileError(DoranError):
    """An adapter file is unreadable, corrupt or does not fit the model."""


class DataError(DoranError):
    """Missing or malformed data; the message names the file (and line) and says how to fix it."""


class CommonsenseDataError(DoranError):
    """A commonsense data file is missing or malformed; the message names the file and the record."""


class AssetError(DoranError, FileNotFoundError):
    """An offline asset (a package or a file inside it) is missing; the message says how to install it."""


class ArchiveError(DoranError, FileNotFoundError):
    """An archive is missing, cannot be fetched, or is not the pinned file; the message says what to do."""


class WeightsError(DoranError, FileNotFoundError):
    """Pretrained weights were asked for but cannot be found; the message says how to supply them."""


class ModelFilesError(DoranError, FileNotFoundError):
    """The language model or its tokenizer cannot be found; the message says what is expected."""


class ConversionError(DoranError, RuntimeError):
    """A model graph does not map onto its target architecture, or the converted model does not match it."""


class ModelMissingError(AssetError):
    """A converted model (the vision backbone) is not where it should be, or its file fails its checksum."""


class ExportError(DoranError):
    """An adapter cannot be exported to, or imported from, another format; the message says why and what works."""
