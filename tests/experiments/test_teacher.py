"""The library's transforms on the least-squares teacher problem (``experiments/teacher.py``).

* The convergence property (plain GD, fixed lr): SDS-LoRA's steps to a 1e-6
  relative loss should not depend on the target's condition number; LoRA's do.
  Measured numbers are printed (run with -s).
* ``sds_lora(optax.sgd)`` against the hand-written reference loop.
* ``sds_lora(optax.adamw)`` against plain LoRA at each one's best learning rate.
* The Riemannian-preconditioned LoRA baseline against plain GD.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sdslora_jax as sl
from experiments import teacher
from sdslora_jax.adapter import with_fresh_bases
from sdslora_jax.basis import factor_bases
from sdslora_jax.optim import riemannian_lora, sds_lora
from testing_utils import assert_bases_consistent

LR, STEPS, THRESHOLD = 0.1, 3000, 1e-6


@functools.cache
def _steps(method, kappa):
  curve = teacher.train(teacher.Teacher(kappa=kappa), method, "sgd", LR, steps=STEPS)
  return teacher.steps_to(curve, THRESHOLD)


def test_sds_lora_convergence_independent_of_condition_number():
  s1, s1000 = _steps("sds", 1.0), _steps("sds", 1000.0)
  print(f"SDS-LoRA (10 warm-up steps): kappa=1 {s1} steps, kappa=1000 {s1000} steps")
  assert s1 is not None and s1000 is not None
  assert s1000 <= 1.5 * s1


def test_lora_convergence_degrades_with_condition_number():
  l1, l1000 = _steps("lora", 1.0), _steps("lora", 1000.0)
  s1000 = _steps("sds", 1000.0)
  print(f"LoRA: kappa=1 {l1} steps, kappa=1000 {l1000} steps (limit {STEPS})")
  assert l1 is not None
  assert l1000 is None or l1000 > 10 * s1000  # far more steps than SDS-LoRA


@pytest.mark.slow
def test_without_warmup_the_property_is_weaker():
  w1, w1000 = _steps("sds", 1.0), _steps("sds", 1000.0)
  n1, n1000 = _steps("sds_no_warmup", 1.0), _steps("sds_no_warmup", 1000.0)
  print(f"SDS-LoRA without warm-up: kappa=1 {n1} steps, kappa=1000 {n1000} steps")
  assert n1 is not None and n1000 is not None
  assert n1000 / n1 > 1.5 * (w1000 / w1)


def test_train_rejects_bad_arguments():
  with pytest.raises(ValueError, match="unknown method"):
    teacher.train(teacher.Teacher(), "dora", "sgd", 0.1, steps=10)
  with pytest.raises(ValueError, match="unknown optimizer"):
    teacher.train(teacher.Teacher(), "lora", "lion", 0.1, steps=10)
  with pytest.raises(ValueError, match="warmup_steps=10 exceeds steps=5"):
    teacher.train(teacher.Teacher(), "sds", "sgd", 0.1, steps=5)


# -------------------------------------------------------- independent reference (teacher)


def _teacher_adapter(cfg, method):
  a, b = teacher.init_factors(cfg)
  if method == "lora":
    return sl.Adapter(a=a, b=b, method="lora", scale=cfg.scale)
  qa, qb = factor_bases(a, b)
  off = jnp.zeros((), jnp.float32)
  return sl.Adapter(a=a, b=b, qa=qa, qb=qb, sds_on=off, method="sds", scale=cfg.scale)


@pytest.mark.parametrize("kappa", [1.0, 100.0])
def test_sgd_matches_hand_written_loop(kappa):
  """LoRA steps, activate_sds, SDS steps with bases recomputed every step."""
  cfg = teacher.Teacher(kappa=kappa, scale=0.5)
  steps, warm, lr = 60, 10, 1.0
  target = teacher.make_target(cfg)
  tx = sds_lora(optax.sgd(lr), warmup_steps=warm, step_scale=1.0, rewarmup_steps=0)
  loss = lambda p: 0.5 * jnp.sum((sl.kernel_delta(p) - target) ** 2)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, u)
    return (p, s), teacher.relative_loss(sl.kernel_delta(p), target)

  p0 = _teacher_adapter(cfg, "sds")
  (p, _), curve = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps))(p0)
  ref = teacher.train(cfg, "sds", "sgd", lr, steps=steps, warmup_steps=warm)
  np.testing.assert_allclose(np.asarray(curve), ref, rtol=2e-3, atol=1e-9)
  # The run converges at SDS-LoRA's conditioning-free GD rate; LoRA lags at kappa=100.
  assert ref[-1] < 1e-4
  if kappa > 1:
    assert ref[-1] < 1e-2 * teacher.train(cfg, "lora", "sgd", lr, steps=steps)[-1]
  assert_bases_consistent(p)


# ------------------------------------------------------------------ teacher comparison

LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def teacher_sweep(method, kappa, *, steps=400, warmup_steps=10, refresh="every_step",
                  lrs=LRS, weight_decay=1e-4):
  """Final relative losses of AdamW + warm-up cosine on the teacher problem, per lr."""
  cfg = teacher.Teacher(kappa=kappa)
  target = teacher.make_target(cfg)
  p0 = with_fresh_bases(_teacher_adapter(cfg, method), refresh == "every_step")
  unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 20), steps, end_value=0.01)
  loss = lambda p: 0.5 * jnp.sum((sl.kernel_delta(p) - target) ** 2)

  def run(lr):
    tx = optax.adamw(lambda c: lr * unit(c), weight_decay=weight_decay)
    if method == "sds":
      tx = sds_lora(tx, warmup_steps=warmup_steps, refresh=refresh, total_steps=steps)

    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (p0, tx.init(p0)), None, length=steps)
    return teacher.relative_loss(sl.kernel_delta(p), target)

  return np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(lrs)))


FLOOR = 1e-10  # below this both methods have converged to float32 round-off


@pytest.mark.parametrize(
    "steps,kappa",
    [
        (400, 1.0),
        pytest.param(
            400,
            100.0,
            marks=pytest.mark.xfail(
                strict=True,
                reason="measured: with AdamW + warm-up cosine over 400 steps, SDS-LoRA's best "
                "final loss (1.4e-3) is above LoRA's (5.6e-4) at kappa=100; the hand-written "
                "reference loop in experiments/teacher.py shows the same",
            ),
        ),
        (1500, 1.0),
        (1500, 100.0),
    ],
)
def test_sds_at_least_as_good_as_lora_at_best_lr(steps, kappa):
  lora = teacher_sweep("lora", kappa, steps=steps)
  sds = teacher_sweep("sds", kappa, steps=steps)
  assert sds.min() <= max(lora.min(), FLOOR), (lora, sds)


# --------------------------------------------------------------------- baselines


def _teacher_lora(cfg, steps, tx):
  target = teacher.make_target(cfg)
  p0 = _teacher_adapter(cfg, "lora")
  loss = lambda p: 0.5 * jnp.sum((sl.kernel_delta(p) - target) ** 2)

  def body(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  (p, _), _ = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps))(p0)
  return float(teacher.relative_loss(sl.kernel_delta(p), target))


def test_scaled_gd_is_insensitive_to_conditioning():
  """Scaled GD converges at kappa=100 where plain GD on LoRA does not (same budget)."""
  cfg = teacher.Teacher(kappa=100.0)
  scaled = _teacher_lora(cfg, 150, riemannian_lora(0.3))
  plain = _teacher_lora(cfg, 150, optax.sgd(0.3))
  assert scaled < 1e-5 < plain, (scaled, plain)
