"""switch_dynamics' summary: medians over adapters of the logged step metrics."""

import math

from experiments import switch_dynamics as sd


def _row(step, values):
  row = {"split": "step_metrics", "step": step}
  for i, (a_norm, a_step, angle, ratio, switched) in enumerate(values):
    p = f"adapters/l{i}/kernel/"
    row.update({p + "a_norm": a_norm, p + "b_norm": 2 * a_norm, p + "a_step": a_step,
                p + "b_step": a_step, p + "a_angle": angle, p + "b_angle": angle,
                p + "refresh_to_step": ratio, p + "switched": switched})
  return row


def test_per_step_medians_relative_steps_and_degrees():
  rows = [_row(4, [(1.0, 0.1, 0.0, 0.5, 0.0), (2.0, 1.0, math.pi / 2, float("nan"), 1.0),
                   (4.0, 1.0, math.pi, 1.5, 0.0)])]
  [rec] = sd._per_step(rows, {4: 0.25})
  assert rec["step"] == 4 and rec["loss"] == 0.25 and rec["switched"] == 1.0
  assert rec["a_norm"] == 2.0 and rec["b_norm"] == 4.0
  assert math.isclose(rec["a_rel_step"], 0.25)  # median of 0.1, 0.5, 0.25
  assert math.isclose(rec["a_angle_deg"], 90.0, rel_tol=1e-6)
  assert rec["refresh_to_step"] == 1.0  # NaN (the switching adapter) left out: median(0.5, 1.5)
  table = sd._table([{"method": "sds", "lr": 1e-3, "steps": [rec]}])
  assert table.splitlines()[2].startswith("| sds | 0.001 | 4 | 0.2500 | 2 | 4 | 0.25 |")
