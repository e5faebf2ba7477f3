"""The step-overhead benchmark's machinery on a tiny configuration (no timing asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import step_overhead


@pytest.mark.slow
def test_tiny_dense_stack_records_and_equal_starting_losses():
  rows = step_overhead.run_configuration(
      {"model": "dense_stack", "d": 64, "rank": 4, "tokens": 256, "repeats": 2}, lambda _: None)
  by = {r["method"]: r for r in rows}
  assert set(by) == {"full", "handwritten", "lora", "sds", "nnx_lora"}
  for r in rows:
    for key in ("model", "d", "rank", "method", "step_time_median_s", "peak_bytes",
                "ratio_vs_lora", "temp_bytes", "compile_s"):
      assert key in r, key
    assert r["step_time_median_s"] > 0 and r["repeats"] == 2
  assert by["lora"]["ratio_vs_lora"] == 1.0
  # Every adapted variant starts as the unadapted model (a zero update), and the same
  # base: the first step's loss is full fine-tuning's, whatever the implementation.
  for name in ("handwritten", "lora", "sds", "nnx_lora"):
    np.testing.assert_allclose(by[name]["first_loss"], by["full"]["first_loss"], rtol=1e-6)
  # And every variant trains: its loss went down over the 4 steps.
  for r in rows:
    assert r["last_loss"] < r["first_loss"], r["method"]


def test_variant_subset_measures_only_those_and_tabulates_missing_ratios():
  rows = step_overhead.run_configuration(
      {"model": "dense_stack", "d": 32, "rank": 2, "tokens": 128, "repeats": 1}, lambda _: None,
      only=("lora", "sds"))
  assert [r["method"] for r in rows] == ["lora", "sds"]
  assert rows[0]["ratio_vs_full"] is None and rows[1]["ratio_vs_lora"] > 0
  text = step_overhead.table(rows)
  assert "| sds |" in text and "| - |" in text and "| full |" not in text
