"""The convergence property on the least-squares teacher problem (plain GD, fixed lr).

SDS-LoRA's steps to a 1e-6 relative loss should not depend on the target's
condition number; LoRA's do. Measured numbers are printed (run with -s).
"""

import functools

import pytest

from experiments import teacher

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
