"""The pure, jitted parts of training: optimiser, loss, train/eval steps and their shardings.

Why separate from the loop (`pianist_jax.train`): everything here is a pure function of
``(state, batch)`` that is split once from the NNX model and compiled once with explicit
``in_shardings``/``out_shardings`` and donation of the old state, which is what makes it run
unchanged on 1 CPU, 8 fake devices, a GPU or a pod. The state is a plain dict::

    {"params": pure dict, "opt_state": optax state, "step": int32, "bad_step": int32}

``bad_step`` is the NaN guard: a step whose loss or gradient is not finite leaves params and
optimiser state untouched and records its number; the loop stops when it sees it, so the last
good parameters (and checkpoint) are kept.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pianist_jax.config.schema import SLOTS_PER_NOTE, Config, TrainConfig
from pianist_jax.model import SLOT_GROUPS
from pianist_jax.train import sharding

BATCH_KEYS = ("encoder_ids", "decoder_input_ids", "targets", "loss_mask")


def lr_schedule(train: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr`` then cosine / linear decay to ``lr * end_lr_ratio`` (or flat)."""
    warmup = min(train.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = train.lr * train.end_lr_ratio
    if train.schedule == "cosine":
        decay = optax.cosine_decay_schedule(train.lr, decay_steps, alpha=train.end_lr_ratio)
    elif train.schedule == "linear":
        decay = optax.linear_schedule(train.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(train.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, train.lr, warmup), decay], [warmup])


def make_optimizer(train: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decay on matrices only, not norms/biases) after global-norm clipping."""
    adamw = optax.adamw(
        lr_schedule(train, total_steps),
        b1=train.b1,
        b2=train.b2,
        eps=train.eps,
        weight_decay=train.weight_decay,
        mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
    )
    if train.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)


def loss_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Summed cross-entropy, correct predictions and weight over the weighted positions."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(ce * weights), jnp.sum(correct * weights), jnp.sum(weights)


def slot_loss_sums(groups: list[jax.Array], targets: jax.Array, weights: jax.Array):
    """`loss_sums` for per-slot logits (`PianistTransformer.slot_logits`, one array per group
    of `model.SLOT_GROUPS`): softmax and argmax over each slot's id range only. A target
    outside its slot's range (PAD after a piece, ...) gets no weight here, whatever its
    ``weights``; the count is the weight actually used."""
    b, t = targets.shape
    targets = targets.reshape(b, t // SLOTS_PER_NOTE, SLOTS_PER_NOTE)
    weights = weights.reshape(b, t // SLOTS_PER_NOTE, SLOTS_PER_NOTE)
    loss = correct = count = jnp.zeros((), jnp.float32)
    for (slots, lo, hi), logits in zip(SLOT_GROUPS, groups, strict=True):
        local = targets[:, :, slots[0] : slots[-1] + 1] - lo
        valid = (local >= 0) & (local < hi - lo)
        local = jnp.where(valid, local, 0)
        w = jnp.where(valid, weights[:, :, slots[0] : slots[-1] + 1], 0.0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, local)
        hit = (jnp.argmax(logits, axis=-1) == local).astype(jnp.float32)
        loss, correct, count = (
            loss + jnp.sum(ce * w),
            correct + jnp.sum(hit * w),
            count + jnp.sum(w),
        )
    return loss, correct, count


class StepFns:
    """Compiled train/eval steps for one model config, optimiser and mesh."""

    def __init__(self, cfg: Config, mesh: Mesh, total_steps: int):
        self.cfg, self.mesh = cfg, mesh
        self.graphdef, self.abstract = sharding.abstract_model(cfg.model)
        self.tx = make_optimizer(cfg.train, total_steps)
        self.schedule = lr_schedule(cfg.train, total_steps)
        rules = cfg.mesh.rules
        self.param_specs = sharding.param_specs(cfg.model, rules, mesh)
        self.state_specs = self._state_specs()
        self.state_shardings = sharding.named(self.state_specs, mesh)
        self.batch_sharding = NamedSharding(mesh, sharding.batch_spec(rules, mesh))
        batch_shardings = {k: self.batch_sharding for k in BATCH_KEYS}
        replicated = NamedSharding(mesh, P())
        self.train_step = jax.jit(
            self._train_step,
            donate_argnums=0,
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, replicated),
        )
        self.eval_step = jax.jit(
            self._eval_sums,
            in_shardings=(self.state_shardings["params"], batch_shardings),
            out_shardings=replicated,
        )

    # ----------------------------------------------------------------------- state

    def _abstract_params(self) -> dict:
        return jax.tree.map(
            lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(self.abstract)
        )

    def _fresh(self, params: dict) -> dict:
        """The state at step 0 around ``params``: one definition for init and restore targets."""
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "bad_step": jnp.full((), -1, jnp.int32),
        }

    def _state_specs(self) -> dict:
        opt_shape = jax.eval_shape(self.tx.init, self._abstract_params())
        opt_specs = optax.tree_utils.tree_map_params(
            self.tx,
            lambda _, spec: spec,
            opt_shape,
            self.param_specs,
            transform_non_params=lambda _: P(),
            is_leaf=lambda x: isinstance(x, P),
        )
        return {"params": self.param_specs, "opt_state": opt_specs, "step": P(), "bad_step": P()}

    def init_state(self, params: dict | None = None, seed: int = 0) -> dict:
        """A fresh state, born sharded (``params`` given: start from them, fresh optimiser)."""
        if params is None:
            params = sharding.init_params(self.cfg.model, self.mesh, self.cfg.mesh.rules, seed)
        params = jax.device_put(params, self.state_shardings["params"])
        return jax.jit(self._fresh, out_shardings=self.state_shardings)(params)

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of the state on *this* mesh (the restore target)."""
        shapes = jax.eval_shape(self._fresh, self._abstract_params())
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_shardings,
        )

    # ----------------------------------------------------------------------- steps

    def _sums(self, params: dict, batch: dict):
        model = sharding.bind(self.graphdef, self.abstract, params)
        weights = batch["loss_mask"].astype(jnp.float32)
        per_slot = self.cfg.model.slot_logits
        with sharding.activation_rules(self.mesh, self.cfg.mesh.rules):
            forward = model.slot_logits if per_slot else model
            logits = forward(batch["encoder_ids"], batch["decoder_input_ids"])
        return (slot_loss_sums if per_slot else loss_sums)(logits, batch["targets"], weights)

    def _eval_sums(self, params: dict, batch: dict) -> dict:
        loss, correct, count = self._sums(params, batch)
        return {"loss_sum": loss, "correct": correct, "count": count}

    def _grads(self, params: dict, batch: dict):
        """Summed loss gradients over ``train.microbatches`` slices of the batch (scan)."""
        grad_fn = jax.grad(lambda p, b: (lambda s: (s[0], s))(self._sums(p, b)), has_aux=True)
        m = self.cfg.train.microbatches
        if m == 1:
            return grad_fn(params, batch)

        def split(x):  # row i*m + j -> microbatch j: each device keeps its own rows
            x = x.reshape((x.shape[0] // m, m) + x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        def body(carry, micro):
            grads, sums = grad_fn(params, micro)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), (jnp.zeros(()),) * 3)
        (grads, sums), _ = jax.lax.scan(body, zeros, jax.tree.map(split, batch))
        return grads, sums

    def _train_step(self, state: dict, batch: dict):
        grad_sum, (loss_sum, correct, count) = self._grads(state["params"], batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grad_sum)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state["bad_step"] < 0)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        step = state["step"]
        new_state = {
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": step + 1,
            "bad_step": jnp.where(ok | (state["bad_step"] >= 0), state["bad_step"], step),
        }
        metrics = {
            "loss": loss,
            "accuracy": correct / denom,
            "grad_norm": grad_norm,
            "lr": self.schedule(step),
            "loss_tokens": count,
        }
        return new_state, metrics


def tree_equal(a: Any, b: Any, cmp: Callable = jnp.array_equal) -> bool:
    """True if two pytrees have the same structure and equal leaves (host-side check)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(bool(cmp(x, y)) for x, y in zip(la, lb))
