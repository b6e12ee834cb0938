"""doran: DoRAN, DoRA, LoRA and their neighbours as one exact adapter core.

Example::

    import doran
    cfg = doran.AdapterConfig.preset("doran", r=8, alpha=16, targets=("query", "value"))
    names = doran.inject(model, cfg, trainable=("classifier",))
    doran.print_trainable_parameters(model)
"""

from .compiling import compile_model
from .config import PRESET_FORMS, PRESETS, AdapterConfig, ConfigError, DoranError
from .inject import (
    InjectError,
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
from .io import AdapterFileError, load_adapter, read_adapter, save_adapter
from .packing import is_packed, pack, unpack
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
    "ConfigError",
    "DoranError",
    "InjectError",
    "OutputRotation",
    "SliceAdapter",
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
