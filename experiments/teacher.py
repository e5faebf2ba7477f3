"""The least-squares teacher problem: fit a rank-r target of condition number kappa.

The adapted kernel starts at zero (a frozen base of zeros); the target ``T`` is a
``(d, d)`` matrix of rank ``r`` whose singular values are spaced geometrically from
1 down to ``1 / kappa``. The loss is ``0.5 * ||dK - T||_F^2`` and progress is
reported as the relative loss ``||dK - T||_F^2 / ||T||_F^2``. LoRA's convergence
on this problem degrades with kappa; SDS-LoRA's should not (arXiv 2606.16454).

Used by ``experiments/condition_number.py`` and by the tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sdslora_jax as sds

METHODS = ("lora", "sds", "sds_no_warmup")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Teacher:
  d: int = 64
  rank: int = 8
  kappa: float = 1.0
  scale: float = 1.0
  seed: int = 0


def make_target(cfg: Teacher) -> jax.Array:
  ku, kv = jax.random.split(jax.random.key(cfg.seed))
  u, _ = jnp.linalg.qr(jax.random.normal(ku, (cfg.d, cfg.rank)))
  v, _ = jnp.linalg.qr(jax.random.normal(kv, (cfg.d, cfg.rank)))
  sv = jnp.geomspace(1.0, 1.0 / cfg.kappa, cfg.rank)
  return (u * sv) @ v.T


def init_factors(cfg: Teacher) -> tuple[jax.Array, jax.Array]:
  """LoRA initialisation: ``a`` random with unit-norm-ish columns, ``b = 0``."""
  a = jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.d, cfg.rank)) / np.sqrt(cfg.d)
  return a, jnp.zeros((cfg.rank, cfg.d))


def relative_loss(delta: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.sum((delta - target) ** 2) / jnp.sum(target**2)


def _loss_fn(method: str, scale: float, target: jax.Array):
  if method == "lora":
    delta = lambda f: sds.lora_delta(f[0], f[1], scale=scale)
  else:
    # Bases are recomputed from the current factors at every step.
    delta = lambda f: sds.sds_delta(f[0], f[1], scale=scale)
  loss = lambda f: 0.5 * jnp.sum((delta(f) - target) ** 2)
  return loss, delta


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(
    name: str, lr: float, total_steps: int, offset: int = 0
) -> optax.GradientTransformation:
  """``"sgd"``: plain gradient descent at a fixed ``lr``. ``"adam"``: Adam with a
  linear warm-up over 5% of ``total_steps`` and cosine decay to ``lr / 100``.
  ``offset`` shifts the schedule, so a phase that starts at step ``offset``
  continues the same schedule."""
  if name == "sgd":
    return optax.sgd(lr)
  if name == "adam":
    sched = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(1, total_steps // 20), total_steps, end_value=lr / 100
    )
    return optax.adam(lambda count: sched(count + offset))
  raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def train(
    cfg: Teacher,
    method: str,
    optimizer: str,
    lr: float,
    *,
    steps: int,
    warmup_steps: int = 10,
) -> np.ndarray:
  """Trains the adapter and returns the relative loss after every step, ``(steps,)``.

  ``method``: ``"lora"``; ``"sds"`` (``warmup_steps`` plain-LoRA steps, then
  ``activate_sds`` with fresh optimizer moments, then SDS-LoRA with bases
  refreshed every step); ``"sds_no_warmup"`` (SDS-LoRA from the LoRA
  initialisation, no reparameterization). ``warmup_steps`` counts towards
  ``steps``; the learning-rate schedule runs over all ``steps``.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
  target = make_target(cfg)
  factors = init_factors(cfg)
  n_warm = warmup_steps if method == "sds" else 0
  if n_warm > steps:
    raise ValueError(f"warmup_steps={warmup_steps} exceeds steps={steps}")
  curves = []
  if n_warm:
    opt = make_optimizer(optimizer, lr, steps)
    factors, curve = _run(cfg.scale, "lora", opt, target, factors, n_warm)
    curves.append(curve)
    a, b, _, _ = sds.activate_sds(*factors, scale=cfg.scale)
    factors = (a, b)
  opt = make_optimizer(optimizer, lr, steps, offset=n_warm)
  factors, curve = _run(cfg.scale, method, opt, target, factors, steps - n_warm)
  curves.append(curve)
  return np.concatenate([np.asarray(c) for c in curves])


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 5))
def _run(scale, method, optimizer, target, factors, steps):
  loss, delta = _loss_fn(method, scale, target)
  grad = jax.grad(loss)

  def step(carry, _):
    f, opt_state = carry
    updates, opt_state = optimizer.update(grad(f), opt_state, f)
    f = optax.apply_updates(f, updates)
    return (f, opt_state), relative_loss(delta(f), target)

  (factors, _), curve = jax.lax.scan(
      step, (factors, optimizer.init(factors)), None, length=steps
  )
  return factors, curve


def steps_to(curve: np.ndarray, threshold: float) -> int | None:
  """First 1-based step at which the relative loss is below ``threshold``."""
  hits = np.nonzero(np.asarray(curve) < threshold)[0]
  return int(hits[0]) + 1 if hits.size else None


def make_adamw(lr: float, total_steps: int, offset: int = 0) -> optax.GradientTransformation:
  """AdamW with ``make_optimizer("adam")``'s warm-up + cosine schedule and ``weight_decay=0``.

  The decay is zero because the teacher's optimum is not at zero factors; so this equals
  Adam (up to rounding).
  """
  sched = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, total_steps // 20), total_steps, end_value=lr / 100
  )
  return optax.adamw(lambda count: sched(count + offset), weight_decay=0.0)


def train_seeds(
    cfg: Teacher,
    seeds,
    method: str,
    optimizer,
    lr: float,
    *,
    steps: int,
    warmup_steps: int = 10,
) -> np.ndarray:
  """``train`` for several seeds at once, ``(len(seeds), steps)`` relative-loss curves.

  Seed ``s`` trains ``dataclasses.replace(cfg, seed=s)`` (its target and initial ``a``;
  ``cfg.seed`` is ignored). The seeds run together: one jitted ``lax.scan`` vmapped over
  the targets and initial factors. ``optimizer`` is a name in ``OPTIMIZERS`` or a function
  ``(lr, total_steps, offset) -> optax.GradientTransformation`` such as ``make_adamw``.

  So that one compilation serves every lr, the optimizer is built at lr 1 and its updates
  are multiplied by ``lr``, a traced value: the same as building it at ``lr`` (up to
  rounding) for optimizers whose updates are proportional to the lr, as are all of these.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
  if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {optimizer!r}; choose from {OPTIMIZERS}")
  n_warm = warmup_steps if method == "sds" else 0
  if n_warm > steps:
    raise ValueError(f"warmup_steps={warmup_steps} exceeds steps={steps}")
  cfgs = [dataclasses.replace(cfg, seed=int(s)) for s in seeds]
  if not cfgs:
    raise ValueError("seeds is empty")
  targets = jnp.stack([make_target(c) for c in cfgs])
  a, b = (jnp.stack(x) for x in zip(*(init_factors(c) for c in cfgs)))
  curves = _run_seeds(cfg.scale, method, optimizer, steps, n_warm, jnp.float32(lr), targets, (a, b))
  return np.asarray(curves)


def _scaled_optimizer(optimizer, lr, total_steps, offset):
  """``optimizer`` built at lr 1, its updates multiplied by the (traced) ``lr``."""
  if isinstance(optimizer, str):
    unit = make_optimizer(optimizer, 1.0, total_steps, offset=offset)
  else:
    unit = optimizer(1.0, total_steps, offset)
  return optax.chain(unit, optax.scale(lr))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _run_seeds(scale, method, optimizer, steps, n_warm, lr, targets, factors):
  def phase(method, opt, target, factors, length):
    loss, delta = _loss_fn(method, scale, target)
    grad = jax.grad(loss)

    def step(carry, _):
      f, opt_state = carry
      updates, opt_state = opt.update(grad(f), opt_state, f)
      f = optax.apply_updates(f, updates)
      return (f, opt_state), relative_loss(delta(f), target)

    (factors, _), curve = jax.lax.scan(step, (factors, opt.init(factors)), None, length=length)
    return factors, curve

  def one_seed(target, factors):
    curves = []
    if n_warm:
      opt = _scaled_optimizer(optimizer, lr, steps, 0)
      factors, curve = phase("lora", opt, target, factors, n_warm)
      curves.append(curve)
      a, b, _, _ = sds.activate_sds(*factors, scale=scale)
      factors = (a, b)
    opt = _scaled_optimizer(optimizer, lr, steps, n_warm)
    _, curve = phase(method, opt, target, factors, steps - n_warm)
    curves.append(curve)
    return jnp.concatenate(curves)

  return jax.vmap(one_seed)(targets, factors)
