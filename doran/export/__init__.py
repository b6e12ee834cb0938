"""Adapters trained with doran for people without doran, and PEFT adapters for doran.

Three exports and one import:

- :func:`export_peft`: a LoRA or DoRA adapter as a PEFT adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, folder)`` loads with the same
  outputs. A fused timm ``qkv`` whose q and v row slices doran adapts becomes one PEFT LoRA on the whole
  ``qkv`` Linear: ``A = [A_q; A_v]``, ``B`` block-diagonal with zero k rows (rank 2 r, alpha 2 alpha, so the
  scale ``alpha / r`` is unchanged); for DoRA the k rows get the base rows' own norm as magnitude, so that
  their factor ``m / ||W0_k||`` is 1.
- :func:`import_peft`: a PEFT LoRA / DoRA folder injected into a fresh base model as doran adapters with the
  same outputs as PEFT's model; a folder written by :func:`export_peft` comes back tensor for tensor.
- :func:`export_merged`: every method (DoRAN, RepLoRA, HoRA, Pre-Diag and SORA too, which PEFT cannot
  express) merged into the base weights: a ``save_pretrained`` folder for a transformers model, a
  ``model.safetensors`` plus a timm ``config.json`` (architecture and rebuild arguments) for a timm model.
- The command ``python -m doran.export ADAPTER --to peft|merged --base SPEC --out DIR`` does either export
  from an adapter file written by ``doran.save_adapter``; the base is a local ``from_pretrained`` folder or
  ``timm:<name>`` with ``--base-kwargs`` and ``--checkpoint``. It never downloads.

Example::

    import doran
    from doran.export import export_merged, export_peft, import_peft

    export_peft(model, "out/peft")            # LoRA / DoRA -> PEFT folder
    export_merged(model, "out/merged")        # any method -> plain model
    fresh = build_base_model()
    import_peft(fresh, "out/peft")            # PEFT folder -> doran adapters

What differs only when training continues (outputs are equal) is reported as an :class:`ExportWarning`:
PEFT's DoRA at dropout > 0 drops the base input too in training (doran drops only the low-rank input),
PEFT's DoRA always detaches the norm, and on a fused ``qkv`` PEFT trains the k rows and draws one dropout
mask for q and v.
"""

from .common import PEFT_PREFIX, PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN, EXPORT_FORMAT, MERGED_NOTE, METHOD_NAMES, ExportError, ExportWarning, method_name, peft_problems, check_peft_form
from .to_peft import export_peft
from .merged import export_merged
from .from_peft import import_peft
from .cli import build_base, main

__all__ = ['EXPORT_FORMAT', 'MERGED_NOTE', 'METHOD_NAMES', 'PEFT_CONFIG', 'PEFT_PREFIX', 'PEFT_WEIGHTS', 'PEFT_WEIGHTS_BIN', 'ExportError', 'ExportWarning', 'build_base', 'check_peft_form', 'export_merged', 'export_peft', 'import_peft', 'main', 'method_name', 'peft_problems']
