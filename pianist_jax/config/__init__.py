"""One typed, frozen configuration for the whole system, loaded from YAML with dotted overrides.

Why: every stage (data, model, train, sharding, render) reads the same `Config`, and a saved
checkpoint carries it as plain YAML, so a run can be reproduced or restored without the
original command line.

Loading (see `load_config`):
  * A YAML file is a mapping of sections (`model`, `data`, `train`, `mesh`, `render`, ...).
  * `include:` (alias `defaults:`) names one YAML or a list of them, merged *beneath* the mapping
    that holds it. A string where a section is expected is the same thing:
    `model: model/base.yaml`. Paths resolve against the including file's directory (the current
    directory for command-line values), then the shipped configs (`pianist_jax/configs`, also
    `configs/` in a checkout), so "configs/pretrain.yaml", "pretrain.yaml" and the bare name
    "pretrain" work from anywhere, an installed wheel included.
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
from pathlib import Path
from typing import Any, Literal

import yaml

from pianist_jax.config.schema import (  # noqa: F401  (re-exported)
    CONFIG_ROOT,
    SLOTS_PER_NOTE,
    Config,
    ConfigError,
    DataConfig,
    DType,
    MeshConfig,
    ModelConfig,
    RenderConfig,
    SourceConfig,
    TrainConfig,
)

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
    list,
    lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=_depth(data) <= 2
    ),
)


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
    """Resolve a YAML reference: absolute, relative to `base_dir`, then among the shipped
    configs (``configs/x.yaml``, ``x.yaml`` or the bare name ``x``)."""
    names = [ref] if ref.endswith((".yaml", ".yml")) else [ref, f"{ref}.yaml"]
    candidates = (
        [Path(ref)]
        if Path(ref).is_absolute()
        else [
            place / name for name in names for place in (base_dir, CONFIG_ROOT, CONFIG_ROOT.parent)
        ]
    )  # last: "configs/x.yaml"
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"config file {ref!r} not found (looked in {', '.join(str(c) for c in candidates)})"
    )


def _expand(node: Any, cls: type, base_dir: Path, stack: tuple[Path, ...], prefix: str) -> Any:
    """Resolve includes in `node`, which sits where dataclass `cls` is expected."""
    if isinstance(node, str):
        preset = CONFIG_ROOT / prefix.split(".")[-1] / f"{node}.yaml"
        if prefix and not node.endswith((".yaml", ".yml")) and preset.is_file():
            node = str(preset)  # a preset name: `model=tiny` -> configs/model/tiny.yaml
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
                raise ConfigError(
                    f"override {key}: {here!r} is not an index into a list of {len(node)}"
                )
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
    for arg in (
        typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    ):
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
