"""One typed, frozen configuration for the whole system, loaded from YAML with dotted overrides.

Why: every stage (data, model, train, sharding, render) reads the same `Config`, and a saved
checkpoint carries it as plain YAML, so a run can be reproduced or restored without the
original command line.

Loading (see `load_config`):
  * A YAML file is a mapping of sections (`model`, `data`, `train`, `mesh`, `render`, ...).
  * `include:` (alias `defaults:`) names one YAML or a list of them, merged *beneath* the mapping
    that holds it. A string where a section is expected is the same thing:
    `model: model/base.yaml`. Paths resolve against the including file's directory (the current
    directory for command-line values), then the repository's `configs/` directory, then the
    repository root (so "configs/pretrain.yaml" works from anywhere).
  * Overrides are `dotted.key=value`, with the value parsed by `yaml.safe_load`
    (`model.hidden=256`, `mesh.shape=[1,8,1]`, `model=model/tiny.yaml`, `train.init_from=null`).
  * Unknown keys and wrongly typed values raise `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
"""The repository's `configs/` directory: the fallback base for relative YAML references."""

SLOTS_PER_NOTE = 8
"""Tokens per note (pitch, IOI, velocity, duration, 4 pedals); the tokenizer owns the layout,
the config only needs the count to check sizes that the note compression divides by it."""

DType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names the dotted key."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    """T5Gemma-style asymmetric encoder-decoder (Gemma-2 blocks). Defaults = paper's 135M base."""

    vocab_size: int = 5389
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
    dtype: DType = "bfloat16"  # activations / matmuls
    param_dtype: DType = "float32"  # stored parameters and optimizer state

    def __post_init__(self) -> None:
        _positive(self, "model", "vocab_size", "hidden", "mlp", "num_heads", "num_kv_heads",
                  "head_dim", "encoder_layers", "decoder_layers", "query_pre_attn_scalar",
                  "rope_theta")
        if self.hidden % SLOTS_PER_NOTE:
            raise ConfigError(f"model.hidden ({self.hidden}) must be divisible by "
                              f"{SLOTS_PER_NOTE}: each token slot is projected to hidden/8")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be divisible by "
                              f"model.num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        for name in ("attn_logit_softcap", "final_logit_softcap", "sliding_window"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name} must be > 0 or null, got {value}")

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

    def __post_init__(self) -> None:
        if not self.name or not self.path:
            raise ConfigError("data.sources: every source needs a name and a path")
        if not self.weight > 0:
            raise ConfigError(f"data.sources[{self.name}].weight must be > 0, got {self.weight}")


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
    seed: int = 0
    worker_count: int = 0  # Grain worker processes (0 = in the main process)

    def __post_init__(self) -> None:
        _positive(self, "data", "block_size", "window_stride")
        if self.block_size % SLOTS_PER_NOTE:
            raise ConfigError(f"data.block_size ({self.block_size}) must be a multiple of "
                              f"{SLOTS_PER_NOTE} (whole notes)")
        if self.window_stride % SLOTS_PER_NOTE or self.window_stride > self.block_size:
            raise ConfigError(f"data.window_stride ({self.window_stride}) must be a multiple of "
                              f"{SLOTS_PER_NOTE} and <= data.block_size")
        for name in ("mask_prob", "crop_prob"):
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
        _positive(self, "train", "lr", "batch_size", "microbatches", "log_every", "eval_every",
                  "eval_steps", "checkpoint_every", "keep_checkpoints")
        if self.steps is None and self.epochs is None:
            raise ConfigError("train.steps or train.epochs must be set")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{name} must be > 0 or null, got {value}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ConfigError(f"train.warmup_steps ({self.warmup_steps}) exceeds "
                              f"train.steps ({self.steps})")
        if self.batch_size % self.microbatches:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by "
                              f"train.microbatches ({self.microbatches})")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ConfigError(f"train.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")


MeshAxes = str | tuple[str, ...] | None
"""What a logical axis maps to: one mesh axis, several (sharded over their product), or None."""

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),  # examples of the global batch
    ("length", None),  # token positions (decoder)
    ("notes", None),  # note positions (encoder)
    ("vocab", "tensor"),  # embedding / output rows
    ("embed", "fsdp"),  # model width: parameters fully sharded over fsdp
    ("slot", None),  # the 8 token slots of the note compression
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
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
            raise ConfigError(f"mesh.axes {self.axes} must be unique and match mesh.shape "
                              f"{self.shape} in length")
        if self.shape.count(-1) > 1 or any(s == 0 or s < -1 for s in self.shape):
            raise ConfigError(f"mesh.shape {self.shape}: sizes must be positive, "
                              "with at most one -1")
        seen: set[str] = set()
        for logical, target in self.rules:
            if logical in seen:
                raise ConfigError(f"mesh.rules: logical axis {logical!r} appears twice")
            seen.add(logical)
            targets = () if target is None else (target,) if isinstance(target, str) else target
            for axis in targets:
                if axis not in self.axes:
                    raise ConfigError(f"mesh.rules: {logical!r} -> {axis!r}, "
                                      f"which is not one of mesh.axes {self.axes}")

    def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
        """Mesh shape for `num_devices`, filling the -1 axis; raises if they do not fit."""
        fixed = 1
        for size in self.shape:
            fixed *= size if size != -1 else 1
        if num_devices % fixed:
            raise ConfigError(f"mesh.shape {self.shape} does not divide {num_devices} devices")
        shape = tuple(num_devices // fixed if s == -1 else s for s in self.shape)
        if -1 not in self.shape and fixed != num_devices:
            raise ConfigError(f"mesh.shape {self.shape} uses {fixed} devices, "
                              f"but {num_devices} are present")
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
        if self.window % SLOTS_PER_NOTE or self.stride % SLOTS_PER_NOTE or self.stride > self.window:
            raise ConfigError(f"render.window ({self.window}) and render.stride ({self.stride}) "
                              f"must be multiples of {SLOTS_PER_NOTE} with stride <= window")
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
            raise ConfigError("data.mask_prob must be > 0 for pretraining (loss is on masked "
                              "tokens only)")


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value!r}")


# --------------------------------------------------------------------------- public API


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load `path` (or the defaults when None), resolve includes, apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = _find_file(str(path), Path.cwd())
        raw = _expand(_read_yaml(path, ()), Config, path.parent, (path,), "")
    raw = apply_overrides(raw, overrides)
    return from_dict(raw)


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Return a copy of the raw nested dict with dotted `key=value` overrides applied."""
    raw = _deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {text!r}: {err}") from None
        _set_dotted(raw, key, value)
    return raw


def override(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """A new Config: `cfg` with dotted overrides applied (validated again)."""
    return from_dict(apply_overrides(to_dict(cfg), overrides))


def config_from_cli(argv: typing.Sequence[str]) -> Config:
    """`[config.yaml] key=value ...` -> Config. Arguments with '=' are overrides."""
    paths = [a for a in argv if "=" not in a]
    if len(paths) > 1:
        raise ConfigError(f"expected at most one config file, got {paths}")
    return load_config(paths[0] if paths else None, [a for a in argv if "=" in a])


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a plain nested dict (e.g. one saved with a checkpoint)."""
    return _build(Config, raw, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of builtins (lists for tuples), suitable for YAML/JSON."""
    return _plain(cfg)


class _Dumper(yaml.SafeDumper):
    """Block-style mappings; short lists on one line (`[data, fsdp]`): readable saved configs."""


def _depth(node: Any) -> int:
    if isinstance(node, dict):
        return 99  # never inline a list of mappings
    return 1 + max(map(_depth, node), default=0) if isinstance(node, list) else 0


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                         flow_style=_depth(data) <= 2))


def to_yaml(cfg: Any) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, width=100)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write `cfg` as self-contained YAML (no includes); `load_config(path) == cfg`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


# --------------------------------------------------------------------------- YAML + includes

_INCLUDE_KEYS = ("include", "defaults")


def _read_yaml(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"include cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _find_file(ref: str, base_dir: Path) -> Path:
    """Resolve a YAML reference: absolute, relative to `base_dir`, then relative to configs/."""
    candidates = [Path(ref)] if Path(ref).is_absolute() else [
        base_dir / ref, CONFIG_ROOT / ref, CONFIG_ROOT.parent / ref]  # last: "configs/x.yaml"
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file {ref!r} not found (looked in "
                      f"{', '.join(str(c) for c in candidates)})")


def _expand(node: Any, cls: type, base_dir: Path, stack: tuple[Path, ...], prefix: str) -> Any:
    """Resolve includes in `node`, which sits where dataclass `cls` is expected."""
    if isinstance(node, str):
        node = {"include": node}
    if not isinstance(node, dict):
        return node  # _build reports the type error with the key name
    node = dict(node)
    merged: dict[str, Any] = {}
    for key in _INCLUDE_KEYS:
        refs = node.pop(key, None)
        for ref in [refs] if isinstance(refs, str) else (refs or []):
            if not isinstance(ref, str):
                raise ConfigError(f"{prefix or '<top>'}.{key}: expected file names, got {ref!r}")
            path = _find_file(ref, base_dir)
            included = _expand(_read_yaml(path, stack), cls, path.parent, (*stack, path), prefix)
            merged = _merge(merged, included)
    hints = _hints(cls)
    for key, value in node.items():
        sub = _dataclass_in(hints.get(key))
        if sub is not None:
            value = _expand(value, sub, base_dir, stack, _join(prefix, key))
        merged = _merge(merged, {key: value})
    return merged


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of mappings; `top` wins; lists and scalars are replaced, not merged."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _deepcopy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deepcopy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deepcopy(v) for v in node]
    return node


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in the raw dict, checking each part against the schema as it goes."""
    cls: Any = Config
    node: Any = raw
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):  # an index into a list of sections, e.g. data.sources.0.weight
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: {here!r} is not an index into a list of "
                                  f"{len(node)}")
            index = int(part)
            if last:
                node[index] = _expand(value, cls, CONFIG_ROOT, (), here) if cls else value
                return
            if not isinstance(node[index], dict):
                raise ConfigError(f"override {key}: {here} is not a mapping")
            node = node[index]
            continue
        hints = _hints(cls)
        if part not in hints:
            raise _unknown_key(here, part, hints)
        hint = hints[part]
        sub = _dataclass_in(hint)
        if last:
            node[part] = _expand(value, sub, Path.cwd(), (), here) if sub else value
            return
        if sub is not None:
            child = node.get(part)
            if isinstance(child, str):  # a not-yet-expanded file reference
                child = _expand(child, sub, Path.cwd(), (), here)
            node[part] = child if isinstance(child, dict) else {}
            node, cls = node[part], sub
            continue
        element = _tuple_element(hint)
        if element is not None and _dataclass_in(element) and isinstance(node.get(part), list):
            node, cls = node[part], _dataclass_in(element)
            continue
        raise ConfigError(f"override {key}: {here} is a value, not a section")


# --------------------------------------------------------------------------- typed building


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = _hints(cls)
    for key in raw:
        if key not in hints:
            raise _unknown_key(_join(prefix, str(key)), str(key), hints)
    kwargs = {key: _convert(hints[key], value, _join(prefix, key)) for key, value in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def _convert(hint: Any, value: Any, key: str) -> Any:
    """Check/convert one value against its type hint; errors name the dotted key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(hint)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        # PyYAML reads "3e-4" (no dot) as a string; accept numeric strings for floats.
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # a schema bug, not a user error


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
    return obj


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type | None) -> dict[str, Any]:
    if cls is None:
        return {}
    if cls not in _HINTS:
        names = {f.name for f in dataclasses.fields(cls)}
        _HINTS[cls] = {k: v for k, v in typing.get_type_hints(cls).items() if k in names}
    return _HINTS[cls]


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type of a field (also through `X | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ():
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _tuple_element(hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _unknown_key(full: str, key: str, hints: dict[str, Any]) -> ConfigError:
    close = difflib.get_close_matches(key, list(hints), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(hints)}"
    return ConfigError(f"unknown config key {full!r}{hint}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
