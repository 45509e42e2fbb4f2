"""The typed, frozen sections of the one `Config` (model, data, train, mesh, render).

Why a module of its own: these dataclasses are what every stage reads; how they are loaded from
YAML and overridden from the command line lives in `pianist_jax.config`, which re-exports all
of them.  Each section validates itself in `__post_init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pianist_jax.tokenizer import SLOT_KIND, TOKENS_PER_NOTE, VOCAB_SIZE

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
"""The shipped configs (package data; `configs/` in a checkout links here): the fallback base
for relative YAML references and where presets (`model=tiny`) are found."""

SLOTS_PER_NOTE = TOKENS_PER_NOTE
"""Tokens per note; the tokenizer owns the layout, the config only checks sizes against it."""

DType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names the dotted key."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    """T5Gemma-style asymmetric encoder-decoder (Gemma-2 blocks). Defaults = paper's 135M base."""

    vocab_size: int = VOCAB_SIZE
    hidden: int = 768
    mlp: int = 3072
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 128
    encoder_layers: int = 10
    decoder_layers: int = 2
    query_pre_attn_scalar: float = 256.0  # attention scale = this ** -0.5 (not head_dim)
    attn_logit_softcap: float | None = 50.0  # None disables
    final_logit_softcap: float | None = 30.0  # None disables
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # local-attention window of Gemma-2 local layers
    # Decoder self-attention over a whole block runs in query chunks of this many tokens and
    # skips the keys the causal mask (and window) hides: same result, about half the work and
    # far less memory at 4096 tokens. null = one chunk.
    attn_chunk: int | None = 512
    # Training/eval loss from per-slot logits: position p (target slot p % 8) is scored only
    # against the ids its slot can take (pitch 128, IOI 4991, velocity 128, duration 5000,
    # pedal 128; mean ~1345 of 5389), softmax over that range - how the renderer samples -
    # with ~4x less output-projection and softmax work. Targets outside their slot's range
    # (PAD, ...) get no weight. Same
    # parameters either way; only the loss (and flops_per_token) changes. false = softmax
    # over the full vocabulary.
    slot_logits: bool = False
    # Each decoder token also receives the encoder state of the score note it performs (note
    # p // 8 for position p), added to its input embedding. Cross-attention carries no
    # position, so without this the decoder must find "its" note by content alone, which a
    # small model trained briefly does not learn: it then ignores the score's dynamics and
    # tempo. No extra parameters; false = the reference architecture (reference weights).
    note_conditioning: bool = False
    # Slot kinds (velocity, pedal, ioi, duration) whose tokens the decoder reads as MASK: it
    # still predicts them, but never conditions on earlier notes' values, so at rendering time
    # its own samples cannot feed back (a drifting loudness, a pedal that stays down); those
    # slots then follow the score and the timing. () = the reference architecture.
    unread_inputs: tuple[str, ...] = ()
    # Every velocity, time (IOI, duration) and pedal id's embedding row also gets a learned
    # projection of smooth features of its value (Fourier features of the velocity, of log
    # milliseconds), in the encoder's table and the decoder's tied one. Plain embeddings learn
    # each of the 5,000 time ids on its own: one that fine-tuning rarely or never sees (a
    # 795 ms rest) stays random, so the model cannot read it nor draw it and shortens long
    # gaps. false = the reference architecture (reference weights).
    value_embedding: bool = False
    dtype: DType = "bfloat16"  # activations / matmuls
    param_dtype: DType = "float32"  # stored parameters and optimizer state

    def __post_init__(self) -> None:
        _positive(
            self,
            "model",
            "vocab_size",
            "hidden",
            "mlp",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "encoder_layers",
            "decoder_layers",
            "query_pre_attn_scalar",
            "rope_theta",
        )
        if self.hidden % SLOTS_PER_NOTE:
            raise ConfigError(
                f"model.hidden ({self.hidden}) must be divisible by "
                f"{SLOTS_PER_NOTE}: each token slot is projected to hidden/8"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be divisible by "
                f"model.num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        for name in ("attn_logit_softcap", "final_logit_softcap", "sliding_window", "attn_chunk"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name} must be > 0 or null, got {value}")
        if isinstance(self.unread_inputs, str):
            raise ConfigError("model.unread_inputs is a list of kinds, e.g. [velocity, pedal]")
        object.__setattr__(self, "unread_inputs", tuple(self.unread_inputs))  # YAML/JSON lists
        kinds = [k for k in dict.fromkeys(SLOT_KIND) if k]
        unknown = set(self.unread_inputs) - set(kinds)
        if unknown:
            raise ConfigError(
                f"model.unread_inputs: unknown kinds {sorted(unknown)} "
                f"(choose from {', '.join(kinds)})"
            )

    @property
    def slot_dim(self) -> int:
        """Width of one token slot after note compression (hidden / 8)."""
        return self.hidden // SLOTS_PER_NOTE


@dataclass(frozen=True)
class SourceConfig:
    """One corpus of record shards: a directory or a glob, and its sampling weight in the mix."""

    name: str
    path: str  # directory of shards or a glob such as "out/shards/asap/*.array_record"
    weight: float = 1.0
    # Augmentation for coarse transcriptions (paper section 3, Aria-MIDI): each note's
    # velocity / IOI / duration id moves by a uniform integer in [-a, a] token steps
    # (velocity units, ms), clipped to the slot's valid range. 0 = off.
    jitter_velocity: int = 0
    jitter_ioi: int = 0
    jitter_duration: int = 0

    def __post_init__(self) -> None:
        if not self.name or not self.path:
            raise ConfigError("data.sources: every source needs a name and a path")
        if not self.weight > 0:
            raise ConfigError(f"data.sources[{self.name}].weight must be > 0, got {self.weight}")
        for name in ("jitter_velocity", "jitter_ioi", "jitter_duration"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"data.sources[{self.name}].{name} must be >= 0, got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how examples are cut and masked (paper section 3)."""

    kind: Literal["pretrain", "sft"] = "pretrain"
    sources: tuple[SourceConfig, ...] = ()
    eval_sources: tuple[SourceConfig, ...] = ()
    block_size: int = 4096  # tokens per example (512 notes)
    mask_prob: float = 0.3  # pretraining: fraction of real tokens replaced by MASK
    crop_prob: float = 0.1  # fraction of examples randomly cropped shorter (multiples of 8)
    window_stride: int = 2048  # SFT: windows of block_size with this stride (50% overlap)
    crops_per_window: int = 1  # SFT: extra random crops taken from each window
    binarize_pedal: bool = False  # SFT targets: pedal >= 64 -> 127 else 0
    # SFT training: fraction of the decoder's input tokens (the performance so far, shifted
    # right; pitches excepted, the renderer always knows them) replaced by MASK. Teacher
    # forcing with the human's previous velocities and pedal lets a model lean on them instead
    # of the score; when it renders, its own samples stand in for them and it drifts.
    decoder_mask_prob: float = 0.0
    seed: int = 0
    worker_count: int = 0  # Grain worker processes (0 = in the main process)

    def __post_init__(self) -> None:
        _positive(self, "data", "block_size", "window_stride")
        if self.block_size % SLOTS_PER_NOTE:
            raise ConfigError(
                f"data.block_size ({self.block_size}) must be a multiple of "
                f"{SLOTS_PER_NOTE} (whole notes)"
            )
        if self.window_stride % SLOTS_PER_NOTE or (
            self.kind == "sft" and self.window_stride > self.block_size
        ):
            raise ConfigError(
                f"data.window_stride ({self.window_stride}) must be a multiple of "
                f"{SLOTS_PER_NOTE} and <= data.block_size"
            )
        for name in ("mask_prob", "crop_prob", "decoder_mask_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("worker_count", "crops_per_window"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: duplicate source names {names}")

    @property
    def notes_per_block(self) -> int:
        return self.block_size // SLOTS_PER_NOTE


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, batch and loop cadence. Defaults = paper's pre-training recipe."""

    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 2500
    end_lr_ratio: float = 0.0  # lr at the end of the decay, as a fraction of lr
    steps: int | None = 40_000  # total optimiser steps; null -> derived from `epochs`
    epochs: int | None = None  # SFT counts epochs; the loop turns them into steps
    batch_size: int = 64  # global batch, in examples of data.block_size tokens
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global-norm clip; null disables
    seed: int = 0  # parameter init and dropout-free model RNG
    log_every: int = 50
    eval_every: int = 1000
    eval_steps: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    output_dir: str = "runs/default"
    init_from: str | None = None  # checkpoint or params file to start from (SFT from pretrain)

    def __post_init__(self) -> None:
        _positive(
            self,
            "train",
            "lr",
            "batch_size",
            "microbatches",
            "log_every",
            "eval_every",
            "eval_steps",
            "checkpoint_every",
            "keep_checkpoints",
        )
        if self.steps is None and self.epochs is None:
            raise ConfigError("train.steps or train.epochs must be set")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{name} must be > 0 or null, got {value}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) exceeds train.steps ({self.steps})"
            )
        if self.batch_size % self.microbatches:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be divisible by "
                f"train.microbatches ({self.microbatches})"
            )
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ConfigError(f"train.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")


MeshAxes = str | tuple[str, ...] | None
"""What a logical axis maps to: one mesh axis, several (sharded over their product), or None."""


def mesh_axes(target: MeshAxes) -> tuple[str, ...]:
    """A rule's target (``None``, one mesh axis, or several) as a tuple of mesh axes."""
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),  # examples of the global batch
    ("length", None),  # token positions (decoder)
    ("notes", None),  # note positions (encoder)
    ("vocab", "tensor"),  # embedding / output rows
    ("embed", "fsdp"),  # model width: parameters fully sharded over fsdp
    ("slot", None),  # the 8 token slots of the note compression
    ("slot_embed", None),  # hidden / 8: one slot's share of a note vector
    ("value_features", None),  # model.value_embedding's features of an id's value
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),  # key/value heads (grouped-query attention)
    ("head_dim", None),
    ("norm", None),  # RMSNorm scales: tiny, replicated
    ("layers", None),
)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the logical-axis -> mesh-axis rule table (MaxText style: rules are data)."""

    axes: tuple[str, ...] = ("data", "fsdp", "tensor")
    shape: tuple[int, ...] = (-1, 1, 1)  # one -1 takes all remaining devices
    rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.shape) or len(set(self.axes)) != len(self.axes):
            raise ConfigError(
                f"mesh.axes {self.axes} must be unique and match mesh.shape {self.shape} in length"
            )
        if self.shape.count(-1) > 1 or any(s == 0 or s < -1 for s in self.shape):
            raise ConfigError(
                f"mesh.shape {self.shape}: sizes must be positive, with at most one -1"
            )
        seen: set[str] = set()
        for logical, target in self.rules:
            if logical in seen:
                raise ConfigError(f"mesh.rules: logical axis {logical!r} appears twice")
            seen.add(logical)
            for axis in mesh_axes(target):
                if axis not in self.axes:
                    raise ConfigError(
                        f"mesh.rules: {logical!r} -> {axis!r}, "
                        f"which is not one of mesh.axes {self.axes}"
                    )

    def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
        """Mesh shape for `num_devices`, filling the -1 axis; raises if they do not fit."""
        fixed = 1
        for size in self.shape:
            fixed *= size if size != -1 else 1
        if num_devices % fixed:
            raise ConfigError(f"mesh.shape {self.shape} does not divide {num_devices} devices")
        shape = tuple(num_devices // fixed if s == -1 else s for s in self.shape)
        if -1 not in self.shape and fixed != num_devices:
            raise ConfigError(
                f"mesh.shape {self.shape} uses {fixed} devices, but {num_devices} are present"
            )
        return shape


@dataclass(frozen=True)
class RenderConfig:
    """Sampling and long-piece windowing for the renderer (paper section 4)."""

    temperature: float = 1.0
    top_p: float = 0.95
    window: int = 4096  # tokens per window
    stride: int = 2048  # next window starts this many tokens later
    drop_tail: float = 0.2  # fraction of the previous window's overlap not reused as prime
    min_ioi_ms: int = 5  # IOI kept >= this where the score's IOI is > 0
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "render", "temperature", "window", "stride")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"render.top_p must be in (0, 1], got {self.top_p}")
        if (
            self.window % SLOTS_PER_NOTE
            or self.stride % SLOTS_PER_NOTE
            or self.stride > self.window
        ):
            raise ConfigError(
                f"render.window ({self.window}) and render.stride ({self.stride}) "
                f"must be multiples of {SLOTS_PER_NOTE} with stride <= window"
            )
        if not 0.0 <= self.drop_tail < 1.0:
            raise ConfigError(f"render.drop_tail must be in [0, 1), got {self.drop_tail}")


@dataclass(frozen=True)
class Config:
    """Everything a run needs; saved next to every checkpoint."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    render: RenderConfig = field(default_factory=RenderConfig)

    def __post_init__(self) -> None:
        if self.data.kind == "pretrain" and not self.data.mask_prob:
            raise ConfigError(
                "data.mask_prob must be > 0 for pretraining (loss is on masked tokens only)"
            )


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value!r}")
