"""Lightning modules, callbacks and backbones: what every experiment runs around the adapter core.

- ``module.AdapterModule``: the base both modules share (adapter injection from the seed's stream, compiled or
  eager runner, packing, non-finite guard, AdamW over ``doran.param_groups``, adapter-only checkpoints);
- ``classifier.AdapterClassifier`` (image and text classification) and ``backbones`` (timm / transformers
  encoders with offline weights);
- ``causal_lm.CausalLMModule`` (the language-model arm) and ``lm_data`` (commonsense files, seeded order on
  any number of devices);
- ``callbacks``: tau, magnitude, gradient norms, history, the non-finite guard, checkpoints;
- ``seeds``: one random stream per purpose, derived from the run seed (methods are paired seed by seed).
"""

from .backbones import (
    DINOV2,
    RANDOM_BERT,
    WeightsError,
    build_backbone,
    build_text_model,
    build_timm,
    default_head,
    default_targets,
    init_head,
)
from .callbacks import (
    AdapterCheckpoint,
    GradNormRecorder,
    HistoryRecorder,
    MagnitudeRecorder,
    NonFiniteGuard,
    StepLossRecorder,
    TauRecorder,
    ValidationSchedule,
    default_callbacks,
    fsdp_safe,
    full_params,
    resolve_precision,
    split_projection,
)
from .causal_lm import (
    RANDOM_LLAMA,
    SMOLLM2,
    SMOLLM2_FILE,
    ByteTokenizer,
    CausalLMModule,
    ModelFilesError,
    build_causal_lm,
    evaluate_tasks,
    save_trained_adapter,
    smollm2_folder,
)
from .classifier import AdapterClassifier, warmup_cosine
from .lm_data import CommonsenseData, SeededSampler, TokenizedRecords, synthetic_copy_task
from .module import AdapterModule
from .seeds import derive_seed, rng_state, seed_everything, set_rng_state

__all__ = [
    "DINOV2", "RANDOM_BERT", "RANDOM_LLAMA", "SMOLLM2", "SMOLLM2_FILE", "AdapterCheckpoint", "AdapterClassifier",
    "AdapterModule", "ByteTokenizer", "CausalLMModule", "CommonsenseData", "GradNormRecorder", "HistoryRecorder",
    "MagnitudeRecorder", "ModelFilesError", "NonFiniteGuard", "SeededSampler", "StepLossRecorder", "TauRecorder",
    "TokenizedRecords", "ValidationSchedule", "WeightsError", "build_backbone", "build_causal_lm", "build_text_model", "build_timm",
    "default_callbacks", "default_head", "default_targets", "derive_seed", "evaluate_tasks", "fsdp_safe",
    "full_params", "init_head", "resolve_precision", "rng_state", "save_trained_adapter", "seed_everything",
    "set_rng_state", "smollm2_folder", "split_projection", "synthetic_copy_task", "warmup_cosine",
]  # fmt: skip
