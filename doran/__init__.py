"""doran: DoRAN, DoRA, LoRA and their neighbours as one exact adapter core.

The maths lives in ``config``, ``norm``, ``generators``, ``layers``, ``targets``, ``inject`` and ``io``; the fast path
(fused autograd nodes, the adapter bank, packing, compilation) in ``doran.fast``, which this package imports
so that it plugs itself into the maths (doran/fast/__init__.py). ``doran.packing`` is
``doran.fast.packing``. Global execution settings: ``doran.settings``; errors: ``doran.errors``.

Example::

    import doran
    cfg = doran.AdapterConfig.preset("doran", r=8, alpha=16, targets=("query", "value"))
    names = doran.inject(model, cfg, trainable=("classifier",))
    doran.print_trainable_parameters(model)
"""

from . import fast as fast  # importing it plugs the fast path into the maths
from .config import PRESET_FORMS, PRESETS, AdapterConfig
from .errors import (
    AdapterFileError,
    ArchiveError,
    AssetError,
    CommonsenseDataError,
    ConfigError,
    ConversionError,
    DataError,
    DoranError,
    InjectError,
    ModelFilesError,
    WeightsError,
)
from .fast import compile_model, is_packed, pack, unpack
from .fast import packing as packing  # doran.packing: reached so by the Lightning modules and benchmarks
from .inject import (
    adapted_modules,
    adapter_leaves,
    eject,
    get_config,
    inject,
    is_injected,
    magnitudes,
    merge,
    merged_copy,
    named_adapter_gradients,
    named_adapter_parameters,
    param_groups,
    print_trainable_parameters,
    slice_adapters,
    tau_values,
    trainable_parameter_counts,
    unmerge,
)
from .io import load_adapter, read_adapter, save_adapter
from .layers import AdaptedLinear, OutputRotation, SliceAdapter
from .norm import factored_row_norm
from .settings import execution, set_execution

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "PRESET_FORMS",
    "AdaptedLinear",
    "AdapterConfig",
    "AdapterFileError",
    "ArchiveError",
    "AssetError",
    "CommonsenseDataError",
    "ConfigError",
    "ConversionError",
    "DataError",
    "DoranError",
    "InjectError",
    "ModelFilesError",
    "OutputRotation",
    "SliceAdapter",
    "WeightsError",
    "adapted_modules",
    "adapter_leaves",
    "compile_model",
    "eject",
    "execution",
    "factored_row_norm",
    "get_config",
    "inject",
    "is_injected",
    "is_packed",
    "load_adapter",
    "magnitudes",
    "merge",
    "merged_copy",
    "named_adapter_gradients",
    "named_adapter_parameters",
    "pack",
    "param_groups",
    "print_trainable_parameters",
    "read_adapter",
    "save_adapter",
    "set_execution",
    "slice_adapters",
    "tau_values",
    "trainable_parameter_counts",
    "unmerge",
    "unpack",
]
