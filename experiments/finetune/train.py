"""Config-driven, sharded fine-tuning: ``train_and_evaluate(config, workdir)``.

One code path from a laptop to a pod slice:

* a device mesh ``("data", "fsdp", "tensor")`` from ``config.mesh`` (``-1`` fills);
* the frozen base placed with :func:`base_shardings` (FSDP on the largest divisible
  axis, tensor parallelism on the last), adapters laid out like their kernels
  (``sdslora_jax.sharding.adapter_shardings``), optimizer state like its parameters
  (``opt_state_shardings``), batches split over ``("data", "fsdp")``;
* everything initialised through ``jax.eval_shape`` and ``jax.jit(out_shardings=...)``;
* one ``jax.jit`` train step with explicit shardings and donated state, the base passed
  as an argument; gradient accumulation by a scan over micro-batches;
* orbax ``CheckpointManager`` checkpoints (trainable tree, optimizer state, step, the
  data position and the run's metadata) every ``checkpoint_every`` steps, on SIGTERM
  and at the end; ``resume=True`` continues exactly; a damaged latest checkpoint is
  reported and the one before it used;
* batches from grain (``input_pipeline.BatchIterator``); a progress bar, metrics through
  clu's metric writers (JSON lines, TensorBoard events, logging), logging windows timed
  by clu's ``ReportProgress``, evaluation every ``eval_every`` steps and checkpoints as
  clu ``PeriodicCallback`` actions; a summary, curves as PNG and an adapters-only export.

The trainable tree is ``{"adapters": ..., "head": ...}`` (the head trains fully, like
PEFT's ``modules_to_save``), or ``{"params": ...}`` for full fine-tuning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sdslora_jax import checkpoint as sl_ckpt
from sdslora_jax import diagnostics as sl_diagnostics
from sdslora_jax.adapter import is_adapter
from sdslora_jax import sharding as sl_sharding
from sdslora_jax.optim import sds_lora
from sdslora_jax.optim.schedules import refreshes_every_update
from sdslora_jax.optim.sds import REFRESH_RULES, STEP_SCALE, SWITCH_STATES
from sdslora_jax.optim.baselines import scale_by_riemannian_lora
from sdslora_jax.targets import path_keys, path_str, rule
from experiments.finetune import input_pipeline as ip
from experiments.finetune import reporting
from experiments.finetune.tasks import Task, build_task

log = logging.getLogger("sdslora.train")

METHODS = ("lora", "rslora", "sds", "riemannian", "full")
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# How the training batches are ordered (``input_pipeline.BatchIterator``), recorded in
# each checkpoint: a run resumed from a checkpoint of another order is warned.
DATA_ORDER = "grain-index-shuffle"


# ----------------------------------------------------------------------------------------
# Config checks, mesh, shardings.


def check_config(config) -> None:
  """Raises ``ValueError`` naming the field for a config the trainer cannot run."""
  def need(cond, field, msg):
    if not cond:
      raise ValueError(f"config.{field}: {msg}")

  need(config.method in METHODS, "method", f"{config.method!r} is not one of {METHODS}")
  for field in ("num_steps", "batch_size", "accum_steps", "eval_batch_size", "log_every",
                "eval_every", "checkpoint_every", "keep_checkpoints"):
    value = getattr(config, field)
    need(isinstance(value, int) and value >= 1, field, f"must be a positive int, got {value!r}")
  need(config.batch_size % config.accum_steps == 0, "accum_steps",
       f"{config.accum_steps} does not divide batch_size {config.batch_size}")
  need(config.compute_dtype in ("float32", "bfloat16"), "compute_dtype",
       f"{config.compute_dtype!r} is not 'float32' or 'bfloat16'")
  if config.method != "full":
    need(isinstance(config.adapter.rank, int) and config.adapter.rank >= 1, "adapter.rank",
         f"must be a positive int, got {config.adapter.rank!r}")
    need(len(config.adapter.targets) > 0, "adapter.targets", "no target patterns")
  qtype = config.model.quantization
  need(qtype in ("none", "int8", "int4", "nf4"), "model.quantization",
       f"{qtype!r} is not one of 'none', 'int8', 'int4', 'nf4'")
  need(qtype == "none" or config.method != "full", "model.quantization",
       "a quantized base is frozen: use an adapter method, not 'full'")
  tile = config.model.quantization_tile
  need(isinstance(tile, int) and tile >= 1, "model.quantization_tile",
       f"must be a positive int, got {tile!r}")
  need(config.adapter.sds_init in ("lora", "zero"), "adapter.sds_init",
       f"must be 'lora' or 'zero', got {config.adapter.sds_init!r}")
  need(config.adapter.sds_init == "lora" or config.method == "sds", "adapter.sds_init",
       f"'zero' starts SDS-LoRA adapters in the SDS phase; method is {config.method!r}")
  need(config.optim.sds_switch_state in SWITCH_STATES, "optim.sds_switch_state",
       f"{config.optim.sds_switch_state!r} is not one of {SWITCH_STATES}")
  need(config.optim.get("sds_refresh_rule", "orth") in REFRESH_RULES, "optim.sds_refresh_rule",
       f"{config.optim.get('sds_refresh_rule')!r} is not one of {REFRESH_RULES}")
  step_scale = config.optim.get("sds_step_scale", STEP_SCALE)
  need(isinstance(step_scale, (int, float)) and not isinstance(step_scale, bool)
       and math.isfinite(step_scale) and step_scale > 0, "optim.sds_step_scale",
       f"must be a positive number, got {step_scale!r}")
  rewarm = config.optim.sds_rewarmup_steps
  need(isinstance(rewarm, int) and rewarm >= 0, "optim.sds_rewarmup_steps",
       f"must be an int >= 0, got {rewarm!r}")
  every = config.diagnostics.every
  need(isinstance(every, int) and every >= 0, "diagnostics.every",
       f"must be an int >= 0, got {every!r}")
  need(every == 0 or config.method != "full", "diagnostics.every",
       "diagnostics are of adapters; method 'full' has none")
  until = config.diagnostics.get("step_metrics_until", 0)
  need(isinstance(until, int) and not isinstance(until, bool) and until >= 0,
       "diagnostics.step_metrics_until", f"must be an int >= 0, got {until!r}")
  need(until == 0 or config.method != "full", "diagnostics.step_metrics_until",
       "step metrics are of adapters; method 'full' has none")
  lr = config.optim.learning_rate
  need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "optim.learning_rate",
       f"must be finite and positive, got {lr!r}")
  need(0 <= config.optim.warmup_steps <= config.num_steps, "optim.warmup_steps",
       f"{config.optim.warmup_steps} is not in [0, num_steps={config.num_steps}]")
  seed = config.seed
  need(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**31, "seed",
       f"must be an int in [0, 2**31), got {seed!r}")
  o = config.optim
  real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  need(real(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip",
       f"must be finite and >= 0 (0: no clipping), got {o.grad_clip!r}")
  for field in ("b1", "b2"):
    v = getattr(o, field)
    need(real(v) and 0 <= v < 1, f"optim.{field}", f"must be in [0, 1), got {v!r}")
  need(real(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay",
       f"must be finite and >= 0, got {o.weight_decay!r}")
  if config.method == "sds" and config.adapter.sds_init == "lora":
    sw = o.sds_warmup_steps
    need(isinstance(sw, int) and 0 <= sw < config.num_steps, "optim.sds_warmup_steps",
         f"{sw!r} is not in [0, num_steps={config.num_steps}): SDS-LoRA would never switch on")
  for axis in MESH_AXES:
    size = getattr(config.mesh, axis)
    need(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.{axis}",
         f"must be a positive int or -1, got {size!r}")
  need(sum(getattr(config.mesh, a) == -1 for a in MESH_AXES) <= 1, "mesh",
       "at most one axis may be -1")


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """The ``("data", "fsdp", "tensor")`` mesh; a ``-1`` axis takes the devices left."""
  devices = jax.devices() if devices is None else devices
  sizes = [getattr(mesh_config, a) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % fixed:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices "
                       f"are not a multiple of {fixed}")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices, found {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def base_shardings(params: Any, mesh: jax.sharding.Mesh) -> Any:
  """FSDP and tensor-parallel shardings for a parameter tree.

  A matrix (or higher) gets ``"tensor"`` on its last axis and ``"fsdp"`` on its largest
  other axis, each only where the axis size divides; vectors and scalars are replicated.
  """
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]

  def spec(x):
    shape = np.shape(x)
    axes = [None] * len(shape)
    if len(shape) >= 2:
      if tensor > 1 and shape[-1] % tensor == 0:
        axes[-1] = "tensor"
      if fsdp > 1:
        free = [i for i in range(len(shape)) if axes[i] is None and shape[i] % fsdp == 0]
        if free:
          axes[max(free, key=lambda i: shape[i])] = "fsdp"
    return NamedSharding(mesh, P(*axes))

  return jax.tree.map(spec, params)


def _replicated(tree, mesh):
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def _place(tree, shardings):
  """Host numpy -> global arrays; each process supplies the shards it addresses."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


# ----------------------------------------------------------------------------------------
# Optimizer.


def make_schedule(config) -> optax.Schedule:
  """Linear warm-up over ``optim.warmup_steps`` updates, then cosine decay to 0.

  Update ``i`` (from 0) uses the value at ``i + 1``, so the first update is not a no-op.
  """
  o = config.optim
  if o.warmup_steps >= config.num_steps:
    base = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
  else:
    base = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, max(o.warmup_steps, 1), config.num_steps + 1, end_value=0.0)
  return lambda step: base(step + 1)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of ``config.method`` (``sds_lora`` outermost for SDS-LoRA)."""
  o = config.optim
  schedule = make_schedule(config)
  clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  if config.method == "riemannian":
    # sdslora_jax.optim.riemannian_lora, with clipping and momentum.
    tx = optax.chain(*clip, scale_by_riemannian_lora(o.riemannian_damping),
                     optax.sgd(schedule, momentum=0.9))
    return tx, schedule
  adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  tx = optax.chain(*clip, adamw)
  if config.method == "sds":
    tx = sds_lora(tx, warmup_steps=o.sds_warmup_steps, refresh=_sds_refresh(config),
                  total_steps=config.num_steps, switch_state=o.sds_switch_state,
                  rewarmup_steps=o.sds_rewarmup_steps,
                  refresh_rule=o.get("sds_refresh_rule", "orth"),
                  step_scale=float(o.get("sds_step_scale", STEP_SCALE)))
  return tx, schedule


def _sds_on_at_init(config) -> bool:
  return config.method == "sds" and config.adapter.sds_init == "zero"


def _sds_refresh(config):
  """``optim.sds_refresh`` as ``sds_lora`` takes it (a digit string is an int)."""
  refresh = config.optim.sds_refresh
  return int(refresh) if isinstance(refresh, str) and refresh.isdigit() else refresh


def adapter_rules(config) -> list:
  a = config.adapter
  method = "sds" if config.method == "sds" else "lora"
  sqrt_scale = config.method == "rslora" or a.sqrt_rank_scaling
  # Bases refreshed after every update let SDS adapters run at rank r (Adapter.fresh_bases).
  fresh = refreshes_every_update(_sds_refresh(config))
  return [rule(t, method=method, rank=a.rank, alpha=a.alpha, rslora=sqrt_scale, fresh_bases=fresh)
          for t in a.targets]


# ----------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class _Run:
  """What the step functions close over: static parts only (no arrays)."""

  task: Task
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  full: bool
  accum: int
  compute_dtype: Any
  batch_spec: P
  mesh: jax.sharding.Mesh
  traces: int = 0

  def _params(self, trainable, base):
    if self.full:
      params = trainable["params"]
    else:
      params = {**base, "head": trainable["head"]}
    if self.compute_dtype != jnp.float32:
      params = jax.tree.map(lambda x: x.astype(self.compute_dtype)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return params, None if self.full else trainable["adapters"]

  def loss(self, trainable, base, batch, rng):
    params, adapters = self._params(trainable, base)
    inputs = {k: batch[k] for k in self.task.input_keys}
    logits = self.task.logits(params, adapters, inputs, train=True, rng=rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["label"])
    return jnp.mean(ce)

  def train_step(self, state, base, batch):
    self.traces += 1  # runs only when jax traces: counts compilations of the step
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(state["seed"]), step)
    grad_fn = jax.value_and_grad(self.loss)
    if self.accum == 1:
      loss, grads = grad_fn(state["trainable"], base, batch, rng)
    else:
      def split(x):
        x = x.reshape((self.accum, x.shape[0] // self.accum) + x.shape[1:])
        spec = P(None, *self.batch_spec) if len(self.batch_spec) else P()
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        i, mb = xs
        loss, g = grad_fn(state["trainable"], base, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, g)), None

      zero = (jnp.zeros((), jnp.float32),
              jax.tree.map(jnp.zeros_like, state["trainable"]))
      (loss, grads), _ = jax.lax.scan(body, zero, (jnp.arange(self.accum), micro))
      loss, grads = jax.tree.map(lambda x: x / self.accum, (loss, grads))
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    metrics = {"loss": loss, "learning_rate": self.schedule(step),
               "grad_norm": optax.tree.norm(grads)}
    new_state = {**state, "trainable": trainable, "opt_state": opt_state, "step": step + 1}
    return new_state, metrics

  def diagnostics_step(self, trainable, base, batch, alignment: bool):
    """Gradient geometry of every 2-D adapter on ``batch`` (``sdslora_jax.diagnostics``).

    The gradient of the training loss (dropout from a fixed key) at the current
    state: effective rank and condition numbers of the factor gradients, condition
    number and stable rank of the factors, and with ``alignment`` the cosine between
    the full fine-tuning gradient of each adapted kernel and the kernel update its
    adapter's gradient step induces. Means over the adapters are under ``mean/``.
    """
    rng = jax.random.key(0)
    if alignment:
      g_train, g_base = jax.grad(self.loss, argnums=(0, 1))(trainable, base, batch, rng)
    else:
      g_train, g_base = jax.grad(self.loss)(trainable, base, batch, rng), None
    adapters = trainable["adapters"]
    out = sl_diagnostics.tree_diagnostics(adapters, g_train["adapters"])
    if alignment:
      leaves, _ = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=is_adapter)
      for key_path, ad in leaves:
        if not is_adapter(ad) or ad.a.ndim != 2:
          continue
        node = g_base
        for k in path_keys(key_path):
          node = node[k]
        out[f"{path_str(key_path)}/alignment"] = sl_diagnostics.update_alignment(ad, node)
    names = sorted({k.rsplit("/", 1)[1] for k in out})
    for name in names:
      values = [v for k, v in out.items() if k.rsplit("/", 1)[1] == name]
      out[f"mean/{name}"] = jnp.mean(jnp.stack(values))
    return out

  def eval_step(self, trainable, base, batch):
    params, adapters = self._params(trainable, base)
    inputs = {k: batch[k] for k in self.task.input_keys}
    logits = self.task.logits(params, adapters, inputs, train=False, rng=None)
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    w = batch["weight"]
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(ce * w), "correct": jnp.sum(correct * w), "count": jnp.sum(w)}


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
      else dict(config)


def run_metadata(config, task: Task) -> dict:
  """What a checkpoint or export records about the run (JSON)."""
  return {
    "method": config.method,
    "rank": None if config.method == "full" else config.adapter.rank,
    "alpha": None if config.method == "full" else config.adapter.alpha,
    "rules": [] if config.method == "full" else list(config.adapter.targets),
    "model": config.model.name,
    "classes": list(task.classes),
    "config": _config_dict(config),
  }


class _Terminate:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks after each step: the
  run saves a checkpoint and stops (main thread only). A second SIGINT interrupts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = None  # the signal's name once one arrived
    self._previous = {}

  def __enter__(self):
    import threading
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested == "SIGINT" and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


def _global_batch(local: Mapping[str, np.ndarray], mesh, spec: P) -> dict:
  def put(x):
    s = NamedSharding(mesh, P(*spec, *([None] * (x.ndim - len(spec)))))
    return jax.make_array_from_process_local_data(s, x)
  return {k: put(v) for k, v in local.items()}


def _check_batch(config, mesh) -> None:
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  for field in ("batch_size", "eval_batch_size"):
    size = getattr(config, field) // (config.accum_steps if field == "batch_size" else 1)
    if size % shards:
      raise ValueError(
        f"config.{field}: {getattr(config, field)} (per micro-batch {size}) is not divisible "
        f"by the {shards} batch shards of the mesh (data x fsdp = {shards})"
      )
  for field in ("batch_size", "eval_batch_size"):
    if getattr(config, field) % jax.process_count():
      raise ValueError(f"config.{field} must be divisible by the {jax.process_count()} processes")


def evaluate(run: _Run, eval_step, state, base, source, config, mesh) -> dict:
  """Loss and accuracy over a whole split (padded batches, weight 0 on the padding)."""
  if source is None or not len(source):
    return {}
  it = ip.BatchIterator(source, batch_size=config.eval_batch_size, shuffle=False,
                        drop_remainder=False, num_epochs=1,
                        process_index=jax.process_index(), process_count=jax.process_count())
  per_process = config.eval_batch_size // jax.process_count()
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  template = None
  for examples in it:
    n = len(examples["label"]) if "label" in examples else len(next(iter(examples.values())))
    if n:
      encoded = run.task.encode(examples)
      template = template or {k: v[:1] for k, v in encoded.items()}
    else:
      encoded = {k: v[:0] for k, v in template.items()}
    pad = per_process - len(encoded["label"])
    batch = {k: np.concatenate([v, np.repeat(template[k], pad, 0)]) if pad else v
             for k, v in encoded.items()}
    batch["weight"] = np.concatenate([np.ones(per_process - pad, np.float32),
                                      np.zeros(pad, np.float32)])
    out = jax.device_get(eval_step(state["trainable"], base, _global_batch(batch, mesh,
                                                                           run.batch_spec)))
    for k in totals:
      totals[k] += float(out[k])
  count = max(totals["count"], 1.0)
  return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count,
          "examples": int(totals["count"])}


def _manager(directory: pathlib.Path, keep: int):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options)


def _restore_latest(manager, target, meta: dict, damaged_dir: pathlib.Path):
  """The newest intact checkpoint as ``(step, tree, extra)``, or ``None`` if there is none.

  A checkpoint that cannot be read is reported and moved to ``damaged_dir`` (kept for
  inspection, never deleted), and the one before it is tried. A checkpoint of another
  run (method, model, rank, alpha, rules or classes differ) is an error.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    step_dir = pathlib.Path(manager.directory) / str(step)
    try:
      extra = sl_ckpt.read_extra(step_dir) or {}
      if "data" not in extra or "step" not in extra:
        raise FileNotFoundError(f"its {sl_ckpt.EXTRA}/ (the data position) is missing or "
                                "incomplete")
      saved = extra.get("run", {})
      for field in ("method", "model", "rank", "alpha", "rules", "classes"):
        if field in saved and saved[field] != meta[field]:
          raise _OtherRun(f"resume: the checkpoint at {step_dir} was written with "
                          f"{field}={saved[field]!r}, the config has {meta[field]!r}")
      changed = config_changes(saved.get("config"), meta["config"])
      if changed:
        raise _OtherRun(f"resume: the checkpoint at {step_dir} was written with another "
                        "config: " + "; ".join(f"{k} was {a!r}, is {b!r}" for k, a, b in changed)
                        + ". Resume with the checkpoint's values, or start a new workdir")
      tree = sl_ckpt.restore_from_manager(manager, target, step=step)
      return step, tree, extra
    except _OtherRun as e:
      raise ValueError(str(e)) from None
    except (sl_ckpt.CheckpointDamagedError, FileNotFoundError) as e:  # unreadable, or files
      # missing; a checkpoint that reads but differs (CheckpointMismatchError), a format
      # version this code does not read, or no permission is an error: nothing is moved.
      damaged_dir.mkdir(parents=True, exist_ok=True)
      moved = damaged_dir / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      if jax.process_index() == 0:
        step_dir.rename(moved)
      log.warning("checkpoint at step %d is damaged: %s", step, e)
      print(f"warning: checkpoint step {step} in {manager.directory} is damaged or "
            f"incomplete ({type(e).__name__}: {str(e)[:300]}); moved to {moved}, using the "
            "previous one", file=sys.stderr)
      manager.reload()
  if steps:
    raise FileNotFoundError(
        f"resume: none of the {len(steps)} checkpoint(s) in {manager.directory} could be "
        "read (each was moved to damaged_checkpoints/); to start over deliberately, use a new "
        "workdir or remove the checkpoints directory")
  return None


class _OtherRun(Exception):
  pass


# Config fields a resumed run may change: how long it runs, how often it logs, evaluates
# and saves, where it finds its data, how it is laid out on devices. Any other change
# (shapes, the optimizer state's structure, the data order, the model) is refused.
RESUMABLE = ("num_steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
             "progress", "export", "eval_batch_size", "diagnostics.", "distributed.", "mesh.",
             "data.data_dir")


def config_changes(saved: Mapping | None, now: Mapping) -> list[tuple[str, Any, Any]]:
  """``(field, saved value, current value)`` for every field that differs and may not."""
  if not saved:
    return []
  flat = lambda d, pre="": {k2: v2 for k, v in d.items() for k2, v2 in (
      flat(v, f"{pre}{k}.").items() if isinstance(v, Mapping) else [(f"{pre}{k}", v)])}
  a, b = flat(saved), flat(now)
  out = []
  for key in sorted(set(a) | set(b)):
    if any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE):
      continue
    if a.get(key) != b.get(key):
      out.append((key, a.get(key), b.get(key)))
  return out


def finished_summary(config, workdir: str | os.PathLike) -> dict | None:
  """The summary of a finished run of ``config`` in ``workdir``, to reuse instead of training.

  ``None`` when there is none: nothing there, or an interrupted run (which
  ``train_and_evaluate(..., resume=True)`` continues).

  Raises:
    ValueError: when the run there finished with another configuration (a field outside
      ``RESUMABLE`` differs, or ``num_steps``), e.g. one trained before a default changed:
      its results are not this config's. Move it away or use another workdir.
  """
  workdir = pathlib.Path(workdir)
  done = workdir / "summary.json"
  if not done.exists():
    return None
  summary = json.loads(done.read_text())
  if summary.get("interrupted", True):
    return None
  saved = workdir / "config.json"
  saved = json.loads(saved.read_text()).get("config") if saved.exists() else None
  if saved is None:
    raise ValueError(f"{workdir} holds a finished run without its config.json: cannot tell "
                     "whether it was trained with this configuration; move it away or use "
                     "another workdir")
  changed = config_changes(saved, _config_dict(config))
  if summary.get("steps") != config.num_steps:
    changed.append(("num_steps", summary.get("steps"), config.num_steps))
  if changed:
    listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in changed[:5])
    raise ValueError(f"{workdir} holds a finished run with another configuration ({listed}"
                     f"{' ...' if len(changed) > 5 else ''}); its results are not this "
                     "configuration's. Move it away (or use another workdir) to train anew")
  return summary


def train_and_evaluate(config, workdir: str | os.PathLike, *, resume: bool = False) -> dict:
  """Fine-tunes ``config.model`` on ``config.data`` with ``config.method``; see the module.

  Args:
    config: an ``ml_collections.ConfigDict`` like ``configs/default.py``.
    workdir: where checkpoints, metrics, plots and exports go. One trainer at a time:
      a second one on the same workdir (fresh or resuming) is refused while the first
      runs (``workdir/.lock``, released when its process ends, however it ends).
    resume: continue from the newest intact checkpoint in ``workdir`` (a fresh start
      if there is none). Without it, a ``workdir`` holding checkpoints is refused.

  Returns:
    The summary (also written to ``workdir/summary.json``).
  """
  check_config(config)
  workdir = pathlib.Path(workdir).absolute()
  with _workdir_lock(workdir), _quiet_closed_event_loops():
    return _train_and_evaluate(config, workdir, resume)


# What the trainer writes in a workdir, besides the files it opens without following links.
WRITTEN = ("checkpoints", "damaged_checkpoints", "tensorboard", "export", "export.partial",
           "export.previous")


def _refuse_planted_links(workdir: pathlib.Path) -> None:
  """Refuses a symbolic link where the trainer writes (Orbax and TensorBoard would follow
  it): at the top of each of ``WRITTEN`` or anywhere below it."""
  for name in WRITTEN:
    top = workdir / name
    found = [top] if top.is_symlink() else [
        pathlib.Path(d) / f for d, dirs, files in os.walk(top) for f in dirs + files
        if (pathlib.Path(d) / f).is_symlink()]
    if found:
      raise ValueError(f"{found[0]} is a symbolic link; the trainer writes only files it "
                       "creates itself in its workdir. Remove the link (or use another "
                       "workdir)")


@contextlib.contextmanager
def _quiet_closed_event_loops():
  """Drops the 'Event loop is closed' reports a damaged checkpoint leaves behind.

  When one array of a checkpoint fails to read, Orbax closes its event loop while
  TensorStore still completes the other reads; each completion then reports
  ``RuntimeError: Event loop is closed`` as an unraisable exception, one traceback per
  array on stderr. The damage itself is reported once, by ``_restore_latest``.
  """
  import gc
  previous = sys.unraisablehook

  def hook(report):
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
      previous(report)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


class WorkdirInUseError(RuntimeError):
  """Another trainer holds the workdir."""


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path):
  """An exclusive ``flock`` on ``workdir/.lock`` by process 0 of the run (the kernel drops
  it when the process dies, so it is never stale)."""
  if jax.process_index() != 0:
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / ".lock"
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
      raise WorkdirInUseError(f"{workdir} is in use by another trainer ({holder}); wait for "
                              "it to end or choose another workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def _train_and_evaluate(config, workdir: pathlib.Path, resume: bool) -> dict:
  ckpt_dir = workdir / "checkpoints"
  if not resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise FileExistsError(f"{ckpt_dir} holds checkpoints: pass resume=True (--resume) to "
                          "continue that run, or choose another workdir")
  lead = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  _refuse_planted_links(workdir)

  mesh = make_mesh(config.mesh)
  _check_batch(config, mesh)
  key = jax.random.key(config.seed)
  task = build_task(config, jax.random.fold_in(key, 1))
  if len(task.train) < config.batch_size:
    raise ValueError(f"config.batch_size: {config.batch_size} is larger than the training "
                     f"split ({len(task.train)} examples)")
  full = config.method == "full"
  tx, schedule = make_optimizer(config)
  compute_dtype = jnp.dtype(config.compute_dtype)
  run = _Run(task, tx, schedule, full, config.accum_steps, compute_dtype,
             P(BATCH_AXES), mesh)

  # The frozen base (low-precision storage with bfloat16 compute) and its shardings.
  base_np = task.params
  if compute_dtype != jnp.float32 and not full:
    base_np = jax.tree.map(lambda x: np.asarray(x).astype(compute_dtype)
                           if np.issubdtype(np.asarray(x).dtype, np.floating) else x, base_np)
  base_sh = base_shardings(base_np, mesh)
  if full:
    trainable_abs = {"params": jax.eval_shape(lambda: jax.tree.map(jnp.asarray, base_np))}
    trainable_sh = {"params": base_sh}
    # Placed from host memory shard by shard (not embedded in a compiled program).
    init_trainable = lambda: {"params": _place(base_np, trainable_sh["params"])}  # noqa: E731
    base, base_sh = {}, {}
  else:
    rules = adapter_rules(config)
    head_np = base_np["head"]
    init_fn = lambda k: {  # noqa: E731
      "adapters": task.init_adapters(k, rules, sds_on=_sds_on_at_init(config)),
      "head": jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), head_np)}
    adapters_key = jax.random.fold_in(key, 2)
    trainable_abs = jax.eval_shape(init_fn, adapters_key)
    trainable_sh = {
      "adapters": sl_sharding.adapter_shardings(trainable_abs["adapters"], base_sh, mesh=mesh),
      "head": _replicated(trainable_abs["head"], mesh),
    }
    init_trainable = lambda: jax.jit(init_fn, out_shardings=trainable_sh)(adapters_key)  # noqa: E731
    base = _place(base_np, base_sh)
  opt_sh = sl_sharding.opt_state_shardings(tx, trainable_abs, trainable_sh, mesh=mesh)
  scalar = NamedSharding(mesh, P())
  state_sh = {"trainable": trainable_sh, "opt_state": opt_sh, "step": scalar, "seed": scalar}

  def init_state(trainable):
    return {"trainable": trainable, "opt_state": tx.init(trainable),
            "step": jnp.zeros((), jnp.int32), "seed": jnp.asarray(config.seed, jnp.uint32)}

  state_abs = jax.eval_shape(init_state, trainable_abs)
  data = ip.BatchIterator(task.train, batch_size=config.batch_size, seed=config.seed,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())

  manager = _manager(ckpt_dir, config.keep_checkpoints)
  meta = run_metadata(config, task)
  state, start = None, 0
  if resume:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          state_abs, state_sh)
    restored = _restore_latest(manager, target, meta, workdir / "damaged_checkpoints")
    if restored is not None:
      start, state, extra = restored
      data.set_state(extra["data"])
      if extra.get("data_order") != DATA_ORDER and lead:
        print(f"warning: the checkpoint at step {start} was written before the data order "
              f"became {DATA_ORDER!r}: from here the batches differ from those the run would "
              "have seen uninterrupted", file=sys.stderr)
      if lead:
        print(f"resumed from step {start} in {ckpt_dir}", file=sys.stderr)
  if state is None:
    state = jax.jit(init_state, in_shardings=(trainable_sh,), out_shardings=state_sh,
                    donate_argnums=(0,))(init_trainable())

  metrics_batch = {"loss": scalar, "learning_rate": scalar, "grad_norm": scalar}
  train_step = jax.jit(run.train_step, in_shardings=(state_sh, base_sh, None),
                       out_shardings=(state_sh, metrics_batch), donate_argnums=(0,))
  eval_step = jax.jit(run.eval_step, in_shardings=(trainable_sh, base_sh, None))
  diag_every = config.diagnostics.every
  diagnostics_step = jax.jit(
      functools.partial(run.diagnostics_step, alignment=bool(config.diagnostics.alignment)),
      in_shardings=(trainable_sh, base_sh, None)) if diag_every else None

  metrics_until = config.diagnostics.get("step_metrics_until", 0)
  copy_trainable = jax.jit(lambda t: jax.tree.map(jnp.copy, t))  # kept: the step donates
  step_metrics = jax.jit(sl_diagnostics.tree_step_metrics)

  writer = reporting.MetricWriter(workdir, enabled=lead)
  writer.write_hparams(meta)
  if lead:
    reporting.write_atomic(workdir / "config.json", json.dumps(meta, indent=2))

  all_finite = jax.jit(lambda t: jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)
       if jnp.issubdtype(x.dtype, jnp.floating)] or [True])))

  def diverged(step, what):
    last = manager.latest_step()
    return FloatingPointError(
        f"step {step}: {what}; training stopped. The last good checkpoint is "
        + (f"step {last} (resume with a lower optim.learning_rate, or keep optim.grad_clip "
           "> 0)" if last is not None else "none (nothing was saved)"))

  def save(step):
    if not bool(all_finite(state["trainable"])):  # never a checkpoint of NaN parameters
      raise diverged(step, "the trainable parameters hold NaN or inf")
    extra = {"data": data.get_state(), "data_order": DATA_ORDER, "step": step, "run": meta}
    manager.save(step, args=sl_ckpt.save_args(state, extra=extra), force=True)
    manager.wait_until_finished()

  progress = reporting.Progress(config.num_steps, start, enabled=lead and config.progress)
  pa = reporting.periodic_actions
  # Logging windows: ReportProgress's steps/s between its reports, on a clock that stops
  # while evaluating, saving and computing diagnostics (they are not step time).
  clock, window = reporting.TrainClock(), reporting.LastScalars()
  report = pa.ReportProgress(num_train_steps=config.num_steps, every_steps=config.log_every,
                             every_secs=None, writer=window)
  report(start, clock())  # the first window starts here (its first call never reports)
  log_due = lambda s: s % config.log_every == 0 or s == config.num_steps  # noqa: E731

  @contextlib.contextmanager
  def not_step_time(name, pending):
    jax.block_until_ready(pending)  # the steps dispatched before belong to the window
    with report.timed(name, wait_jax_async_dispatch=False), clock.paused():
      yield

  def write_diagnostics(step, t, batch):
    del t
    with not_step_time("diagnostics", state):
      diag = jax.device_get(diagnostics_step(state["trainable"], base, batch))
    writer.write("diagnostics", step, {k: float(v) for k, v in diag.items()})

  def write_eval(step, t):
    del t
    if step < config.num_steps:  # the final evaluation follows the loop
      with not_step_time("eval", state):
        values = evaluate(run, eval_step, state, base, task.validation, config, mesh)
      writer.write("eval", step, values)

  def write_checkpoint(step, t):
    del t
    with not_step_time("checkpoint", state):
      save(step)

  # Called after every step (diagnostics: before it, on the state it starts from).
  diagnostics = pa.PeriodicCallback(every_steps=diag_every, callback_fn=write_diagnostics) \
      if diag_every else None
  evaluation = pa.PeriodicCallback(every_steps=config.eval_every, callback_fn=write_eval)
  checkpoint = pa.PeriodicCallback(every_steps=config.checkpoint_every,
                                   on_steps=[config.num_steps], callback_fn=write_checkpoint)
  interrupted = False
  step = start
  step_times = []  # per logging window: its time / its steps (async dispatch included)
  window_units, window_start = 0, start
  with _Terminate() as term:
    while step < config.num_steps:
      examples = next(data)
      local = task.encode(examples)
      batch = _global_batch(local, mesh, run.batch_spec)
      if diagnostics:  # before the step, which donates the state
        diagnostics(step, batch=batch)
      before = None
      if step < metrics_until:
        with not_step_time("step_metrics", state):
          before = copy_trainable(state["trainable"])
      state, metrics = train_step(state, base, batch)
      step += 1
      if before is not None:
        with not_step_time("step_metrics", state):
          moved = jax.device_get(step_metrics(before, state["trainable"]))
        writer.write("step_metrics", step, {k: float(v) for k, v in moved.items()})
      window_units += task.units(local) * jax.process_count()
      if log_due(step):  # the steps ReportProgress reports at
        m = jax.device_get(metrics)  # waits for the window's steps
      if report(step, clock()):
        steps_per_s = window.scalars["steps_per_sec"]
        record = {"loss": float(m["loss"]), "learning_rate": float(m["learning_rate"]),
                  "grad_norm": float(m["grad_norm"]),
                  f"{task.unit}_per_s": window_units * steps_per_s / (step - window_start),
                  "step_time_s": 1.0 / steps_per_s}
        step_times.append(record["step_time_s"])
        writer.write("train", step, record)
        if not math.isfinite(record["loss"]):
          raise diverged(step, f"the training loss is {record['loss']}")
        progress.update(step, record, task.unit)
        window_units, window_start = 0, step
      evaluation(step)
      checkpoint(step)
      if term.requested:
        interrupted = True
        if manager.latest_step() != step:
          save(step)
        break
  progress.close()

  summary = {"method": config.method, "model": config.model.name, "steps": step,
             "interrupted": interrupted, "step_compilations": run.traces,
             "trainable_parameters": int(sum(np.size(x) for x in jax.tree.leaves(
               _trainable_arrays(state["trainable"]))))}
  if interrupted:
    if lead:
      print(f"stopped by {term.requested} at step {step}; checkpoint saved, continue with "
            "--resume",
            file=sys.stderr)
  else:
    val = evaluate(run, eval_step, state, base, task.validation, config, mesh)
    test = evaluate(run, eval_step, state, base, task.test, config, mesh)
    writer.write("eval", step, val)
    if test:
      writer.write("test", step, test)
    records = writer.read()
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    summary.update({
      "validation_accuracy": val.get("accuracy"), "validation_loss": val.get("loss"),
      "test_accuracy": test.get("accuracy"), "test_loss": test.get("loss"),
      "final_train_loss": train_losses[-1] if train_losses else None,
      # The first window holds the compilation.
      "step_time_median_s": float(np.median(step_times[1:] or step_times or [np.nan])),
    })
    if lead:
      reporting.plot_run(records, workdir / "curves.png", title=f"{config.model.name} "
                         f"{config.method}")
    if config.export and not full:
      summary["export"] = export(workdir / "export", state["trainable"], task, meta)
  writer.close()
  manager.close()
  if lead:
    reporting.write_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
    if not interrupted:
      print(reporting.summary_table([summary]), file=sys.stderr)
  return summary


def _trainable_arrays(trainable):
  """The arrays an optimizer updates (SDS bases, flags and stamps are not parameters)."""
  from sdslora_jax.optim.sds import trainable_params
  return trainable_params(trainable)


def export(directory: pathlib.Path, trainable, task: Task, meta: dict) -> dict:
  """Adapters and head in the library's format and, for MiniLM, the adapters as PEFT.

  Written to ``<directory>.partial`` and renamed into place: ``directory`` holds a
  complete export or none (a run killed while exporting leaves only the partial
  directory, which the next export replaces), and a resumed run's export replaces the
  previous one.
  """
  out = {}
  tree = jax.device_get(trainable)
  if jax.process_index() != 0:
    return out
  partial = directory.with_name(directory.name + ".partial")
  previous = directory.with_name(directory.name + ".previous")
  for stale in (partial, previous):
    _remove(stale)
  partial.mkdir(parents=True)
  sl_ckpt.save_adapters(partial / "adapters", tree, extra=meta)
  out["adapters"] = str(directory / "adapters")
  if task.peft_module_name is not None:
    from sdslora_jax.peft import export_peft
    export_peft(partial / "peft", tree["adapters"], module_names=task.peft_module_name,
                base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    out["peft"] = str(directory / "peft")
  if directory.exists() or directory.is_symlink():
    directory.rename(previous)  # renames a link itself, never what it points to
  partial.rename(directory)
  _remove(previous)
  return out


def _remove(path: pathlib.Path) -> None:
  """Deletes a file, link or directory tree of the trainer's own (links are not followed)."""
  if path.is_symlink() or path.is_file():
    path.unlink()
  elif path.exists():
    shutil.rmtree(path)
