"""Config loading: every YAML under configs/ builds, overrides work, mistakes fail loudly."""

import dataclasses
from pathlib import Path

import pytest

from pianist_jax import config as C
from pianist_jax.config import Config, ConfigError, load_config

# Sweep specs (configs/sweeps/) are not run configs; tests/test_sweep.py loads every one of them.
CONFIGS = sorted(
    p for p in C.CONFIG_ROOT.rglob("*.yaml") if p.relative_to(C.CONFIG_ROOT).parts[0] != "sweeps"
)


def test_configs_found():
    names = {p.relative_to(C.CONFIG_ROOT).as_posix() for p in CONFIGS}
    assert {
        "pretrain.yaml",
        "sft.yaml",
        "model/tiny.yaml",
        "model/small.yaml",
        "model/base.yaml",
        "model/sym66.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(C.CONFIG_ROOT).as_posix())
def test_every_yaml_loads(path, tmp_path):
    """Top-level recipes load as Config; section files (model/...) load as that section."""
    rel = path.relative_to(C.CONFIG_ROOT)
    if len(rel.parts) > 1 and rel.parts[0] == "model":
        cfg = load_config(None, [f"model={path}"])
    else:
        cfg = load_config(path)
    assert isinstance(cfg, Config)
    # Saved configs are self-contained and reload identically.
    assert load_config(C.save_config(cfg, tmp_path / "saved.yaml")) == cfg


def _model(name):
    return load_config(None, [f"model=model/{name}.yaml"]).model


def _approx_params(m):
    """Rough parameter count (embeddings + attention + gated MLP), to keep presets honest."""
    attn = m.hidden * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    mlp = 3 * m.hidden * m.mlp
    embed = 2 * m.vocab_size * m.hidden + m.hidden * m.hidden  # enc + tied dec, compression
    return embed + m.encoder_layers * (attn + mlp) + m.decoder_layers * (2 * attn + mlp)


def test_model_presets():
    base, sym, tiny, small = (_model(n) for n in ("base", "sym66", "tiny", "small"))
    assert (base.hidden, base.mlp, base.num_heads, base.num_kv_heads, base.head_dim) == (
        768,
        3072,
        8,
        4,
        128,
    )
    assert (base.encoder_layers, base.decoder_layers) == (10, 2)
    assert (sym.encoder_layers, sym.decoder_layers, sym.hidden) == (6, 6, 768)
    assert base.vocab_size == 5389 and base.query_pre_attn_scalar == 256.0
    assert (base.attn_logit_softcap, base.final_logit_softcap) == (50.0, 30.0)
    assert 120e6 < _approx_params(base) < 150e6
    assert _approx_params(tiny) < 2e6
    assert 10e6 < _approx_params(small) < 20e6
    assert tiny.dtype == "float32"


def test_recipes_match_paper():
    pre = load_config("configs/pretrain.yaml")
    assert (pre.train.lr, pre.train.schedule, pre.train.warmup_steps) == (3e-4, "cosine", 2500)
    assert (pre.train.batch_size, pre.data.block_size, pre.data.mask_prob) == (64, 4096, 0.3)
    assert pre.model.dtype == "bfloat16" and pre.data.kind == "pretrain"
    sft = load_config(C.CONFIG_ROOT / "sft.yaml")
    assert (sft.train.lr, sft.train.warmup_steps, sft.train.batch_size) == (5e-4, 0, 32)
    assert (sft.train.epochs, sft.data.kind, sft.data.binarize_pedal) == (2, "sft", True)


def test_overrides():
    cfg = load_config(
        "configs/pretrain.yaml",
        [
            "model=model/tiny.yaml",  # swap a whole section for a file, then tweak it
            "model.hidden=128",
            "train.lr=1e-3",  # PyYAML reads 1e-3 as a string; float fields accept it
            "train.init_from=runs/x",
            "train.grad_clip=null",
            "mesh.shape=[2, 2, 2]",
            "data.sources.0.weight=3",
            "mesh.rules=[[batch, data], [embed, null]]",
        ],
    )
    assert cfg.model.hidden == 128 and cfg.model.encoder_layers == 2
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.init_from == "runs/x" and cfg.train.grad_clip is None
    assert cfg.mesh.shape == (2, 2, 2) and cfg.mesh.resolved_shape(8) == (2, 2, 2)
    assert cfg.data.sources[0].weight == 3.0
    assert cfg.mesh.rules == (("batch", "data"), ("embed", None))
    assert C.override(cfg, ["model.mlp=64"]).model.mlp == 64
    assert C.config_from_cli(["configs/sft.yaml", "train.epochs=1"]).train.epochs == 1


def test_defaults_without_file():
    cfg = load_config()
    assert cfg == Config() and cfg.mesh.axes == ("data", "fsdp", "tensor")
    assert cfg.mesh.resolved_shape(8) == (8, 1, 1)
    assert cfg.model.slot_dim == 96 and cfg.data.notes_per_block == 512


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.hiden=3", "model.hiden"),
        ("modle.hidden=3", "modle"),
        ("train.lr.x=3", "train.lr"),
        ("data.sources.0.wieght=2", "data.sources.0.wieght"),
    ],
)
def test_unknown_override_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/pretrain.yaml", [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  include: model/tiny.yaml\n  hiden: 64\n")
    with pytest.raises(ConfigError, match=r"model\.hiden.*did you mean hidden"):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.hidden=abc", "model.hidden"),
        ("model.hidden=64.0", "model.hidden"),
        ("model.hidden=true", "model.hidden"),
        ("train.lr=fast", "train.lr"),
        ("data.binarize_pedal=1", "data.binarize_pedal"),
        ("train.schedule=cosin", "train.schedule"),
        ("model.dtype=float64", "model.dtype"),
        ("mesh.shape=8", "mesh.shape"),
        ("train.steps=[1]", "train.steps"),
    ],
)
def test_type_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/pretrain.yaml", [override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.hidden=100", "model.hidden"),  # not divisible by 8
        ("model.num_kv_heads=3", "model.num_heads"),
        ("data.block_size=4095", "data.block_size"),
        ("data.mask_prob=1.5", "data.mask_prob"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.microbatches=3", "train.batch_size"),
        ("mesh.shape=[-1, -1, 1]", "mesh.shape"),
        ("mesh.rules=[[batch, pipeline]]", "mesh.rules"),
        ("mesh.rules=[[batch, data], [batch, null]]", "mesh.rules"),
    ],
)
def test_validation(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/pretrain.yaml", [override])


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(None, ["model=model/nope.yaml"])


def test_include_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_include_order_and_relative_paths(tmp_path):
    (tmp_path / "m.yaml").write_text("include: model/tiny.yaml\nhidden: 32\n")
    (tmp_path / "run.yaml").write_text(
        "defaults: [pretrain.yaml]\nname: mine\nmodel: m.yaml\ntrain: {steps: 10, warmup_steps: 1}\n"  # noqa: E501
    )
    cfg = load_config(tmp_path / "run.yaml", ["train.steps=20"])
    assert cfg.name == "mine" and cfg.model.hidden == 32 and cfg.model.mlp == 256
    assert cfg.train.steps == 20 and cfg.train.lr == 3e-4  # the rest comes from pretrain.yaml


def test_frozen_and_hashable():
    cfg = load_config("configs/pretrain.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.hidden = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = None
    assert isinstance(cfg.data.sources, tuple) and isinstance(cfg.mesh.rules[0], tuple)
    assert hash(cfg) == hash(load_config("configs/pretrain.yaml"))  # usable as a jit static arg


def test_round_trip(tmp_path):
    cfg = load_config("configs/sft.yaml", ["model=model/small.yaml", "mesh.shape=[2, 4, 1]"])
    text = C.to_yaml(cfg)
    assert "include" not in text
    saved = C.save_config(cfg, tmp_path / "ckpt" / "config.yaml")
    assert load_config(saved) == cfg
    assert C.from_dict(C.to_dict(cfg)) == cfg
    assert isinstance(C.to_dict(cfg)["mesh"]["rules"], list)


def test_resolved_shape_errors():
    with pytest.raises(ConfigError):
        C.MeshConfig(shape=(3, -1, 1)).resolved_shape(8)
    with pytest.raises(ConfigError):
        C.MeshConfig(shape=(2, 2, 1)).resolved_shape(8)
    assert C.MeshConfig(shape=(1, -1, 2)).resolved_shape(8) == (1, 4, 2)


def test_paths_resolve_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        load_config(str(C.CONFIG_ROOT / "pretrain.yaml"), ["model=model/tiny.yaml"]).model.hidden
        == 64
    )
    assert Path(C.CONFIG_ROOT).name == "configs"


def test_model_preset_by_name():
    by_name = load_config("configs/pretrain.yaml", ["model=tiny"]).model
    by_path = load_config("configs/pretrain.yaml", ["model=model/tiny.yaml"]).model
    assert by_name == by_path and by_name.hidden == 64
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/pretrain.yaml", ["model=no_such_preset"])
