"""The step-overhead benchmark's op-level variants (``intercept.apply``) on a tiny configuration."""

from __future__ import annotations

import numpy as np

from experiments import step_overhead

NEW_KEYS = {"frontend", "ratio_vs_frontend", "compile_ratio_vs_frontend", "temp_ratio_vs_frontend"}


def test_oplevel_dense_stack_rows_mirror_the_frontend_and_keep_existing_keys():
  rows = step_overhead.run_configuration(
      {"model": "dense_stack", "d": 32, "rank": 2, "tokens": 128, "repeats": 1}, lambda _: None,
      only=("full", "lora", "sds", "op_lora", "op_sds"))
  by = {r["method"]: r for r in rows}
  assert list(by) == ["full", "lora", "sds", "op_lora", "op_sds"]
  # Existing records keep exactly their keys; the op-level ones add the frontend ratios.
  for name in ("full", "lora", "sds"):
    assert not NEW_KEYS & set(by[name]), name
  for name, ref in (("op_lora", "lora"), ("op_sds", "sds")):
    r = by[name]
    assert set(r) == set(by["lora"]) | NEW_KEYS and r["frontend"] == ref
    assert r["ratio_vs_frontend"] > 0 and r["compile_ratio_vs_frontend"] > 0
    # Same rules, initialisation and optimizer as the frontend: the same losses.
    np.testing.assert_allclose(r["first_loss"], by["full"]["first_loss"], rtol=1e-6)
    np.testing.assert_allclose(r["last_loss"], by[ref]["last_loss"], rtol=1e-5)
  text = step_overhead.oplevel_table(rows)
  assert "| op_lora |" in text and "| op_sds |" in text
  assert step_overhead.oplevel_table([by["lora"]]) == ""


def test_oplevel_variants_are_opt_in_for_run_configuration():
  assert set(step_overhead.OP_VARIANTS) <= set(step_overhead.ALL_VARIANTS)
  assert not set(step_overhead.OP_VARIANTS) & set(step_overhead.VARIANTS)
