"""The adapter configuration: one dataclass whose switches span the design space of the DoRA family.

LoRA, DoRA and DoRAN are presets of the same fields, three independent switches: magnitude decomposition
on/off, the term tau added to the row norm, and static or generated low-rank factors. Their neighbours add three more switches to the same code path: factors generated per
attention head (``heads``: HoRA), a learnable diagonal on W0 (``diag``: Pre-Diag) and a skew-symmetric
rotation of the output (``rotation_rank``: SORA). ``PRESET_FORMS`` gives each preset's equation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .errors import DoranError as DoranError  # importable from here as before

TAU_MODES = ("zero", "fixed", "learned")
TAU_GRANULARITIES = ("matrix", "row")
FACTOR_KINDS = ("static", "generated")
SHARING_VARIANTS = ("none", "qv_first", "qv_full", "global")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh")


@dataclass(frozen=True)
class AdapterConfig:
    """What to inject and how. Build one with :meth:`preset` and override single fields.

    Example::

        cfg = AdapterConfig.preset("doran", r=8, alpha=16, targets=("query", "value"))
        cfg = AdapterConfig.preset("dora", targets=("qkv",))          # timm ViT, fused q|k|v
    """

    # --- low-rank update s * B @ A, A: (r, in), B: (out, r), s = alpha / r ---
    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale numerator: s = alpha / r
    dropout: float = 0.0  # dropout on the low-rank input only (our default; PEFT drops the base input too)

    # --- which nn.Linear modules to adapt ---
    targets: tuple[str, ...] = ("query", "value")  # module-name suffixes ("query" matches "...self.query")
    target_regex: str | None = None  # if set, adapt Linear modules whose full name re.fullmatch-es this
    fused_qkv: tuple[str, ...] = ("qkv",)  # names (last component) of fused q|k|v Linears (timm ViT)
    fused_slices: tuple[str, ...] = ("q", "v")  # which thirds of a fused qkv to adapt; k is never touched
    block_regex: str | None = None  # groups projections into blocks for shared generators; default: parent module

    # --- switch 1: magnitude decomposition (DoRA family) ---
    magnitude: bool = False  # W' = m * V / (||V||_row + tau), V = W0 + s B A
    detach_norm: bool = False  # treat ||V||_row as a constant in backprop (DoRA Sec. 4.3)

    # --- switch 2: tau, the term added to the row norm ---
    tau_mode: str = "zero"  # zero | fixed | learned (tau = softplus(rho), rho trained)
    tau_init: float = 0.1  # tau at step 0, RELATIVE to the row norm: tau in weight units is tau_init times the
    #   row scale (mean row norm of W0, or per row, see tau_floor), so one value fits weights of any scale
    tau_granularity: str = "matrix"  # matrix: one tau per adapted matrix; row: one per output row
    tau_floor: float = 0.1  # per-row mode: row scale is max(||W0_i||, tau_floor * mean_i ||W0_i||)
    tau_lr: float | None = None  # own learning rate for tau in `param_groups` (None: the base lr)

    # --- switch 3: static or generated factors ---
    factors: str = "static"  # static | generated (auxiliary networks, RepLoRA / DoRAN)
    sharing: str = "qv_first"  # generated only: none | qv_first | qv_full | global
    gen_hidden: int = 32  # hidden width of each two-layer generator MLP
    gen_embed: int = 32  # width of the learned embeddings fed to the generators
    gen_activation: str = "gelu"  # gelu | relu | silu | tanh

    # --- per-head factors (HoRA, arXiv 2510.04295; the row split per head is our form) ---
    heads: int | str | None = None  # None: one (A, B) per projection. int H: factors per head, the rows of
    #   head h get s B_h A_h, B_h: (d_head, r), A_h: (r, in). H counts the heads of the widest adapted
    #   projection of a block (d_head = its width / H); narrower ones (GQA's v) get width / d_head heads.
    #   "auto": d_head read from the projection's parent module (head_dim / attention_head_size / num_heads)

    # --- Pre-Diag and SORA ("Calibrating and Rotating", arXiv 2511.00051) ---
    diag: bool = False  # Pre-Diag: W' = diag(d) W0 + s B A, d: (out,) learnable, init ones; bias outside
    rotation_rank: int = 0  # SORA's r_p: output rotation I + s_p (D C^T - C D^T), C, D: (out, r_p); 0 = off
    rotation_s0: float = 0.1  # SORA's s0: s_p = min(1, s0 / (||C||_F + ||D||_F + 1e-6)) (value: our default)
    rotate_bias: bool = False  # our choice: False rotates W' only (y = R W' x + b, the paper's equation);
    #   True rotates the whole output y = R (W' x + b) (then merge rewrites the bias as well)

    # bookkeeping: which preset this came from (informational; every field above is what counts)
    method: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "fused_qkv", tuple(self.fused_qkv))
        object.__setattr__(self, "fused_slices", tuple(self.fused_slices))
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AdapterConfig:
        """A named method as a point of the design space, with optional field overrides.

        ``lora``: no magnitude, static factors. ``dora``: magnitude, tau = 0, detached norm (DoRA Sec. 4.3,
        as PEFT and the official code). ``doran``: magnitude, learned tau, generated factors shared per
        block (``qv_first``, the paper's figure 1), norm not detached (the paper's gradient argument).
        ``replora``: LoRA with generated factors, nothing shared (``sharing="none"``). ``hora``: LoRA with
        factors generated per attention head by one generator per block (``heads="auto"``,
        ``sharing="qv_full"``). ``prediag``: LoRA plus a learnable diagonal on W0. ``sora``: Pre-Diag plus
        a rotation of the output of rank ``rotation_rank=4``. ``PRESET_FORMS[name]`` gives the equation.
        """
        key = name.lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"unknown AdapterConfig field(s) {unknown}; valid fields: {sorted(fields)}")
        values = {**PRESETS[key], "method": key, **overrides}
        return cls(**values)

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed (validated).

        Example::

            cfg = AdapterConfig.preset("doran").replace(tau_mode="fixed")
        """
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field and how to fix it."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"rank r={self.r!r} must be a positive integer, e.g. r=8")
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha!r} must be > 0 (the scale is s = alpha / r); e.g. alpha=2*r")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r} must lie in [0, 1)")
        if not self.targets and self.target_regex is None:
            raise ConfigError("no targets: give targets=('query', 'value') or target_regex=...")
        if self.tau_mode not in TAU_MODES:
            raise ConfigError(f"unknown tau_mode {self.tau_mode!r}; choose one of {TAU_MODES}")
        if self.tau_init < 0:
            raise ConfigError(
                f"tau_init={self.tau_init!r} is negative; tau is added to a norm and must be >= 0 "
                "(relative units: 0.1 means 10% of the row norm)"
            )
        if self.tau_mode == "learned" and self.tau_init == 0:
            raise ConfigError(
                "tau_mode='learned' needs tau_init > 0 (tau = softplus(rho) is never 0); "
                "use tau_mode='zero' for DoRA's tau = 0"
            )
        if self.tau_mode != "zero" and not self.magnitude:
            raise ConfigError(
                f"tau_mode={self.tau_mode!r} needs magnitude=True: tau sits in the DoRA norm's denominator"
            )
        if self.tau_granularity not in TAU_GRANULARITIES:
            raise ConfigError(f"unknown tau_granularity {self.tau_granularity!r}; choose one of {TAU_GRANULARITIES}")
        if not self.tau_floor > 0:
            raise ConfigError(f"tau_floor={self.tau_floor!r} must be > 0 (it keeps tau positive on zero rows)")
        if self.tau_lr is not None and not self.tau_lr > 0:
            raise ConfigError(f"tau_lr={self.tau_lr!r} must be > 0 or None (None: the base learning rate)")
        if self.factors not in FACTOR_KINDS:
            raise ConfigError(f"unknown factors {self.factors!r}; choose one of {FACTOR_KINDS}")
        if self.sharing not in SHARING_VARIANTS:
            raise ConfigError(
                f"unknown sharing variant {self.sharing!r}; choose one of {SHARING_VARIANTS} "
                "(or factors='static' for no generator)"
            )
        for name in ("gen_hidden", "gen_embed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.gen_activation not in ACTIVATIONS:
            raise ConfigError(f"unknown gen_activation {self.gen_activation!r}; choose one of {ACTIVATIONS}")
        heads = self.heads
        if heads is not None and heads != "auto" and (not isinstance(heads, int) or isinstance(heads, bool)
                                                      or heads <= 0):
            raise ConfigError(f"heads={heads!r} must be None (no per-head factors), 'auto' (read the "
                              "head width from the attention module) or a positive integer (the number of "
                              "attention heads)")
        for name in ("diag", "rotate_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.diag and self.magnitude:
            raise ConfigError(
                "diag=True with magnitude=True is refused: DoRA's m / ||V||_row already is a learnable "
                "diagonal on the rows of W' (the 'Calibrating and Rotating' paper's reading of DoRA), a "
                "second one is redundant. Use preset 'prediag'/'sora' (diag, no magnitude) or "
                "'dora'/'doran' (magnitude)"
            )
        rp = self.rotation_rank
        if not isinstance(rp, int) or isinstance(rp, bool) or rp < 0:
            raise ConfigError(f"rotation_rank={rp!r} must be an integer >= 0 (0: no rotation; SORA: e.g. 4)")
        if not (isinstance(self.rotation_s0, (int, float)) and self.rotation_s0 > 0):
            raise ConfigError(f"rotation_s0={self.rotation_s0!r} must be > 0 "
                              "(s_p = min(1, s0 / (||C||_F + ||D||_F)))")
        if self.rotate_bias and rp == 0:
            raise ConfigError("rotate_bias=True needs a rotation: set rotation_rank > 0 (e.g. preset 'sora')")
        bad = sorted(set(self.fused_slices) - {"q", "k", "v"})
        if bad or not self.fused_slices:
            raise ConfigError(f"fused_slices={self.fused_slices!r} must be a non-empty subset of ('q', 'k', 'v')")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every field by name (tuples stay tuples); :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The fields as JSON with sorted keys (what an adapter file's metadata holds)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        """A config from :meth:`to_dict`'s output; unknown fields raise :class:`ConfigError`.

        Example::

            cfg = AdapterConfig.from_dict(json.loads(AdapterConfig.preset("dora").to_json()))
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"unknown AdapterConfig field(s) {unknown}; saved by a newer doran?")
        return cls(**values)

    @property
    def scale(self) -> float:
        """s = alpha / r, the factor of the low-rank update."""
        return self.alpha / self.r


#: how each preset is written in prose, tables and figures.
METHOD_NAMES: dict[str, str] = {
    "lora": "LoRA",
    "dora": "DoRA",
    "doran": "DoRAN",
    "replora": "RepLoRA",
    "hora": "HoRA",
    "prediag": "Pre-Diag",
    "sora": "SORA",
}

# Presets: each is a point of the design space above. Fields not named keep the dataclass default.
PRESETS: dict[str, dict[str, Any]] = {
    "lora": dict(magnitude=False, tau_mode="zero", factors="static"),
    "dora": dict(magnitude=True, tau_mode="zero", detach_norm=True, factors="static"),
    "doran": dict(
        magnitude=True,
        tau_mode="learned",
        tau_init=0.1,
        detach_norm=False,
        factors="generated",
        sharing="qv_first",
    ),
    # RepLoRA (Truong et al., ICML 2025): LoRA whose A and B come from small MLPs; nothing shared across
    # projections (our reading: each projection has its own reparameterisation).
    "replora": dict(magnitude=False, tau_mode="zero", factors="generated", sharing="none"),
    # HoRA / HyRA (arXiv 2510.04295): per-head factors from one generator per block, shared across the
    # heads and across q and v (qv_full); the per-head row split of delta W is our form (no code is public).
    "hora": dict(magnitude=False, tau_mode="zero", factors="generated", sharing="qv_full", heads="auto"),
    # Pre-Diag (arXiv 2511.00051): W' = diag(d) W0 + s B A.
    "prediag": dict(magnitude=False, tau_mode="zero", factors="static", diag=True),
    # SORA (arXiv 2511.00051): Pre-Diag inside an output rotation; r_p = 4 and s0 = 0.1 are our defaults.
    "sora": dict(magnitude=False, tau_mode="zero", factors="static", diag=True, rotation_rank=4,
                 rotation_s0=0.1),
}

# The form of every preset, as it reads in a table (experiments/param_table.py). s = alpha / r; (e) marks
# factors generated by the auxiliary network; rows of head h in HoRA.
PRESET_FORMS: dict[str, str] = {
    "lora": "W0 + s B A",
    "dora": "m ⊙ V / ‖V‖_row, V = W0 + s B A",
    "doran": "m ⊙ V / (‖V‖_row + τ), V = W0 + s B(e) A(e)",
    "replora": "W0 + s B(e) A(e)",
    "hora": "W0 + s [B_h(e_h) A_h(e_h)]_h (rows of head h)",
    "prediag": "diag(d) W0 + s B A",
    "sora": "(I + s_p (D Cᵀ − C Dᵀ)) (diag(d) W0 + s B A)",
}
