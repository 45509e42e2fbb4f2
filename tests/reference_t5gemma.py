"""PyTorch reference of the Pianist Transformer, built from `transformers` 4.54.0's T5Gemma.

A test helper (not a test module) for parity tests of `pianist_jax`: an *independent* model
whose blocks, masks, RoPE, normaliser and soft-caps are the transformers classes themselves,
with only the reference's 8-slot note compression added here (REFERENCE_MODEL_NOTES.md).

    module = build_reference(model_cfg_from_yaml("model/tiny.yaml"), seed=0)
    save_reference(module, out_dir, model_cfg)    # model.safetensors + config.json (HF layout)
    enc, logits = reference_forward(module, encoder_ids, decoder_input_ids)

The module is a `T5GemmaForConditionalGeneration` (eager attention, float32) with two extra
sub-modules, as in the reference checkpoint: `model.encoder.embeddings` (the compression that
is used) and a top-level `embeddings` (unused, like `model.encoder.embed_tokens`). Needs
`pip install -r requirements-reference.txt`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration
from transformers.models.t5gemma.modeling_t5gemma import T5GemmaRMSNorm

PAD = 0
SLOTS = 8
RMS_NORM_EPS = 1e-6
# Keys of a model_cfg dict (pianist_jax ModelConfig names, plus rms_norm_eps).
MODEL_CFG_KEYS = (
    "vocab_size",
    "hidden",
    "mlp",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "encoder_layers",
    "decoder_layers",
    "query_pre_attn_scalar",
    "attn_logit_softcap",
    "final_logit_softcap",
    "rope_theta",
    "sliding_window",
    "rms_norm_eps",
)

# Tiny test models: one intra-op thread is ~30x faster than two on the 2-core CI machine
# (OpenMP barriers for 64-wide matmuls, plus XLA's threads in the same process).
torch.set_num_threads(1)


class NoteEmbeddings(nn.Module):
    """The reference's encoder input compression: 8 token slots of a note -> one hidden vector.

    ids [B, 8N] -> Embedding [B, 8N, H] -> [B, N, 8, H] -> slot i through projection_layers[i]
    (H -> H/8, with bias) -> concatenated in slot order -> [B, N, H]. No normaliser here: the
    T5Gemma encoder multiplies its `inputs_embeds` by sqrt(H) itself.
    """

    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        if hidden % SLOTS:
            raise ValueError(f"hidden ({hidden}) must be divisible by {SLOTS}")
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.projection_layers = nn.ModuleList(
            nn.Linear(hidden, hidden // SLOTS, bias=True) for _ in range(SLOTS)
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        grouped = self.word_embeddings(input_ids).view(batch, length // SLOTS, SLOTS, -1)
        return torch.cat(
            [proj(grouped[:, :, i]) for i, proj in enumerate(self.projection_layers)], dim=-1
        )


def _module_config(cfg: dict, layers: int) -> dict:
    """T5GemmaModuleConfig kwargs of one stack (encoder or decoder)."""
    window = cfg["sliding_window"]
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["mlp"],
        num_hidden_layers=layers,
        num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"],
        head_dim=cfg["head_dim"],
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=cfg.get("rms_norm_eps", RMS_NORM_EPS),
        rope_theta=float(cfg["rope_theta"]),
        attention_bias=False,
        query_pre_attn_scalar=_int_if_integral(cfg["query_pre_attn_scalar"]),
        attn_logit_softcapping=cfg["attn_logit_softcap"],
        final_logit_softcapping=cfg["final_logit_softcap"],
        # T5Gemma's default layer_types (layer i sliding iff (i + 1) % 2) need a window; without
        # one every layer is full attention.
        sliding_window=window if window is not None else 4096,
        layer_types=None if window is not None else ["full_attention"] * layers,
        pad_token_id=PAD,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
    )


def _int_if_integral(value):
    return int(value) if float(value).is_integer() else float(value)


def t5gemma_config(model_cfg: dict) -> T5GemmaConfig:
    """The T5GemmaConfig of `model_cfg` (eager attention; top-level vocab_size set, since
    T5GemmaConfig copies its own vocab_size, default 256000, into both sub-configs)."""
    config = T5GemmaConfig(
        encoder=_module_config(model_cfg, model_cfg["encoder_layers"]),
        decoder=_module_config(model_cfg, model_cfg["decoder_layers"]),
        vocab_size=model_cfg["vocab_size"],
        tie_word_embeddings=True,
        dropout_rate=0.0,
        attention_dropout=0.0,
        pad_token_id=PAD,
        bos_token_id=2,
        eos_token_id=3,
    )
    config.architectures = ["T5GemmaForConditionalGeneration"]
    config.torch_dtype = torch.float32  # written as "float32"
    config._attn_implementation = "eager"  # propagated to encoder/decoder by __setattr__
    return config


@torch.no_grad()
def build_reference(model_cfg: dict, seed: int, qk_gain: float = 4.0) -> nn.Module:
    """Reference model with seeded random weights, float32, eval mode, eager attention.

    Init (all from one `torch.Generator(seed)`): embeddings N(0, 1) with the PAD rows of the
    used tables zeroed (as `padding_idx` init and training leave them); linear weights
    std 1/sqrt(fan_in), q/k projections `qk_gain` times wider so attention logits reach the
    soft-cap region; compression biases N(0, 0.1); every RMSNorm weight (applied as 1 + w)
    N(0, 0.1) instead of HF's init.
    """
    module = T5GemmaForConditionalGeneration(t5gemma_config(model_cfg))
    hidden, vocab = model_cfg["hidden"], model_cfg["vocab_size"]
    module.model.encoder.embeddings = NoteEmbeddings(vocab, hidden)
    module.embeddings = NoteEmbeddings(vocab, hidden)  # unused copy, as in the checkpoint
    gen = torch.Generator().manual_seed(seed)

    def normal(param: torch.Tensor, std: float) -> None:
        param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)

    for name, sub in module.named_modules():  # tied lm_head.out_proj skipped (decoder table)
        if name == "lm_head.out_proj":
            continue
        if isinstance(sub, nn.Embedding):
            normal(sub.weight, 1.0)
        elif isinstance(sub, nn.Linear):
            gain = qk_gain if name.endswith(("q_proj", "k_proj")) else 1.0
            normal(sub.weight, gain / math.sqrt(sub.in_features))
            if sub.bias is not None:
                normal(sub.bias, 0.1)  # compression biases (the only biases)
        elif isinstance(sub, T5GemmaRMSNorm):
            normal(sub.weight, 0.1)
    module.model.encoder.embeddings.word_embeddings.weight[PAD] = 0.0
    module.model.decoder.embed_tokens.weight[PAD] = 0.0
    assert module.lm_head.out_proj.weight is module.model.decoder.embed_tokens.weight
    return module.float().eval()


def state_dict_for_file(module: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors: the module's state_dict without the tied `lm_head` copy."""
    return {
        name: t.detach().contiguous().clone()
        for name, t in module.state_dict().items()
        if not name.startswith("lm_head.")
    }


def hf_config_dict(module: nn.Module) -> dict:
    """`T5GemmaConfig.to_dict()` of the module (nested `encoder`/`decoder` dicts), without the
    runtime-only attention-implementation fields."""
    config = module.config.to_dict()
    for part in (config, config["encoder"], config["decoder"]):
        for key in [k for k in part if k.startswith("_attn_implementation")]:
            del part[key]
    return config


def save_reference(module: nn.Module, out_dir, model_cfg: dict) -> Path:
    """Write `out_dir/model.safetensors` (reference names, no lm_head) and `out_dir/config.json`
    (Hugging Face T5Gemma layout). `model_cfg` is checked against the module's config."""
    from safetensors.torch import save_file

    expected = t5gemma_config(model_cfg).to_dict()
    config = hf_config_dict(module)
    for part in ("encoder", "decoder"):
        for key, value in config[part].items():
            if not key.startswith("_") and expected[part].get(key) != value:
                raise ValueError(f"model_cfg does not match the module: {part}.{key}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        state_dict_for_file(module), str(out_dir / "model.safetensors"), metadata={"format": "pt"}
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_reference(out_dir) -> nn.Module:
    """Rebuild a reference module from `save_reference`'s files (strict: every tensor present)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    raw = json.loads((out_dir / "config.json").read_text())
    module = build_reference(model_cfg_from_hf(raw), seed=0)
    state = load_file(str(out_dir / "model.safetensors"))
    state["lm_head.out_proj.weight"] = state["model.decoder.embed_tokens.weight"]
    module.load_state_dict(state, strict=True)
    module.tie_weights()
    return module.eval()


def model_cfg_from_hf(config: dict) -> dict:
    """The model_cfg dict of a T5Gemma config.json dict (encoder/decoder share widths)."""
    enc, dec = config["encoder"], config["decoder"]
    full = enc.get("layer_types") and all(t == "full_attention" for t in enc["layer_types"])
    return dict(
        vocab_size=config["vocab_size"],
        hidden=enc["hidden_size"],
        mlp=enc["intermediate_size"],
        num_heads=enc["num_attention_heads"],
        num_kv_heads=enc["num_key_value_heads"],
        head_dim=enc["head_dim"],
        encoder_layers=enc["num_hidden_layers"],
        decoder_layers=dec["num_hidden_layers"],
        query_pre_attn_scalar=enc["query_pre_attn_scalar"],
        attn_logit_softcap=enc["attn_logit_softcapping"],
        final_logit_softcap=dec["final_logit_softcapping"],
        rope_theta=enc["rope_theta"],
        sliding_window=None if full else enc["sliding_window"],
        rms_norm_eps=enc["rms_norm_eps"],
    )


def note_mask(encoder_ids: torch.Tensor) -> torch.Tensor:
    """[B, 8N] ids -> [B, N] long: a note is real iff any of its 8 tokens is not PAD."""
    batch, length = encoder_ids.shape
    return (encoder_ids != PAD).view(batch, length // SLOTS, SLOTS).any(-1).long()


@torch.no_grad()
def reference_forward(
    module: nn.Module,
    encoder_ids: np.ndarray,
    decoder_input_ids: np.ndarray,
    decoder_attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(encoder states [B, N, H], soft-capped logits [B, T, V]), both float32 numpy.

    encoder ids -> `model.encoder.embeddings` -> `T5GemmaForConditionalGeneration.forward(
    inputs_embeds=..., attention_mask=note mask, decoder_input_ids=..., use_cache=False)`:
    the note mask is the encoder's padding mask and the decoder's cross-attention mask;
    positions are 0..N-1 (encoder) and 0..T-1 (decoder). With `decoder_attention_mask` None
    the decoder self-attention also masks PAD (id 0) *keys* (HF's default without a cache;
    only rows at or after a PAD differ from a purely causal mask).
    """
    ids = torch.as_tensor(np.asarray(encoder_ids, dtype=np.int64))
    dec = torch.as_tensor(np.asarray(decoder_input_ids, dtype=np.int64))
    if ids.ndim != 2 or ids.shape[1] % SLOTS:
        raise ValueError(f"encoder_ids must be [B, 8N], got {tuple(ids.shape)}")
    dec_mask = (
        None
        if decoder_attention_mask is None
        else torch.as_tensor(np.asarray(decoder_attention_mask, dtype=np.int64))
    )
    out = module(
        inputs_embeds=module.model.encoder.embeddings(ids),
        attention_mask=note_mask(ids),
        decoder_input_ids=dec,
        decoder_attention_mask=dec_mask,
        use_cache=False,
        return_dict=True,
    )
    return (out.encoder_last_hidden_state.float().numpy(), out.logits.float().numpy())


def model_cfg_from_yaml(path) -> dict:
    """A `configs/model/*.yaml` (includes resolved by `pianist_jax.config`) -> model_cfg dict."""
    from pianist_jax.config import load_config

    model = dataclasses.asdict(load_config(None, [f"model={path}"]).model)
    cfg = {key: model[key] for key in MODEL_CFG_KEYS if key in model}
    cfg.setdefault("rms_norm_eps", RMS_NORM_EPS)
    return cfg
