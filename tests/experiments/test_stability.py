"""stability's bar (LoRA's largest loss change around the switch) and its table."""

import math

import pytest

from experiments import stability as st

pytestmark = pytest.mark.experiments


def _rec(variant, seed, losses, jump=0.0, acc=0.8):
  return {"task": "minilm", "variant": variant, "seed": seed, "switch_step": 10, "jump": jump,
          "test_accuracy": acc, "mean_loss_last_20": 0.5, "losses": losses}


def test_lora_change_is_the_largest_step_to_step_change_in_the_window():
  losses = [1.0] * 30
  losses[4] = 9.0  # step 5: before the window (steps 6..15), ignored
  losses[11] = 1.3  # step 12: changes of 0.3 into and out of it
  losses[14] = 0.8  # step 15, the last in the window: a change of 0.2 into it
  losses[15] = 5.0  # step 16: after the window, ignored
  recs = [_rec("lora", 0, losses)]
  assert math.isclose(st.lora_change(recs, "minilm", 0), 0.3)
  assert st.lora_change(recs, "minilm", 1) is None


def test_table_counts_divergence_and_jumps_under_the_bar():
  bar = [1.0] * 30
  bar[11] = 1.1  # LoRA's largest change: 0.1 for both seeds
  learned = bar[:20] + [0.5] * 10  # falls after the window: ends at 75 % of its start
  recs = [_rec("lora", 0, learned), _rec("lora", 1, learned),
          _rec("sds", 0, learned, jump=0.05, acc=0.8),
          _rec("sds", 1, bar, jump=0.2, acc=0.5)]  # flat: diverged
  rows = {line.split(" | ")[2]: line for line in st.table(recs).splitlines()[2:]}
  assert rows["sds"].endswith("| 2 | 1 | 0.6500 ± 0.2121 | 0.5000 | +0.125 / +0.200 | "
                              "0.100 / 0.100 | 1 / 2 |")
  assert rows["lora"].split(" | ")[-1] == "- |"


def test_diverged_means_the_loss_ended_near_where_it_started():
  start = [0.69] * 5
  assert st.diverged(start + [0.70] * 95)  # collapsed to one class: ln 2 again
  assert st.diverged(start + [0.67] * 95)  # 97 % of the start
  assert not st.diverged(start + [0.69] * 80 + [0.45] * 20)  # learned (a late drop counts)


def test_plot_draws_every_variant(tmp_path):
  """Every variant has a colour (a new variant once crashed the report after its runs)."""
  st.plot([_rec(name, 0, [1.0] * 30) for name in st.VARIANTS], tmp_path / "s.png")
  assert (tmp_path / "s.png").stat().st_size > 1000
