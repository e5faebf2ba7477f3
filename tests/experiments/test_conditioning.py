"""The seeded convergence-vs-condition-number sweep (experiments/conditioning.py), quick setting."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from experiments import conditioning, teacher

QUICK = conditioning.QUICK
FIELDS = {"optimizer", "kappa", "method", "lr", "seed", "steps_to_tol", "final_loss", "best_lr"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """One quick sweep (the only real training in this module but the next test's)."""
  root = tmp_path_factory.mktemp("conditioning")
  work, out = root / "work", root / "out"
  conditioning.main(["--quick", "--workdir", str(work), "--out", str(out)])
  return work, out, json.loads((out / "conditioning.json").read_text())


@pytest.mark.slow
def test_quick_sweep_records(quick):
  _, out, recs = quick
  n_lrs = sum(len(lrs) for _, lrs in QUICK.lrs)
  assert len(recs) == len(QUICK.kappas) * len(teacher.METHODS) * n_lrs * len(QUICK.seeds)
  best = {}
  for r in recs:
    assert FIELDS <= set(r), r
    assert r["steps_to_tol"] is None or isinstance(r["steps_to_tol"], int)
    assert r["final_loss"] is None or isinstance(r["final_loss"], float)
    if r["best_lr"]:
      best.setdefault((r["optimizer"], r["kappa"], r["method"]), []).append(r)
  # Exactly one lr per cell, flagged on all of its seeds' records.
  assert len(best) == len(QUICK.kappas) * len(teacher.METHODS) * len(QUICK.lrs)
  for rs in best.values():
    assert len({r["lr"] for r in rs}) == 1
    assert sorted(r["seed"] for r in rs) == list(QUICK.seeds)
  assert (out / "conditioning.png").stat().st_size < 100_000


@pytest.mark.slow
def test_train_seeds_equals_train_per_seed(quick):
  # After the quick sweep: same steps and number of seeds, so its compilations are reused.
  # SDS runs at kappa 1: at kappa 100 within 300 steps some runs (Adam on its plateau, SDS
  # without warm-up at lr 0.3) amplify the batched ops' different float32 rounding to 1e-3.
  # make_adamw (weight decay 0) is checked against teacher.train's Adam.
  # (LoRA and SDS-LoRA without warm-up are the two phases of the "sds" case.)
  cases = [(1.0, "sds", "sgd", 0.1, "sgd"), (1.0, "sds", teacher.make_adamw, 1e-2, "adam")]
  for kappa, method, opt, lr, ref_opt in cases:
    cfg = teacher.Teacher(kappa=kappa)
    curves = teacher.train_seeds(cfg, QUICK.seeds, method, opt, lr, steps=QUICK.steps)
    assert curves.shape == (len(QUICK.seeds), QUICK.steps)
    for seed, curve in zip(QUICK.seeds, curves):
      ref = teacher.train(teacher.Teacher(kappa=kappa, seed=seed), method, ref_opt, lr,
                          steps=QUICK.steps)
      # atol: in float32 (the batched ops round differently) the relative loss of a dK near
      # T is known to about 1e-7 * sqrt(loss) absolutely: ~1e-10 at the 1e-6 threshold.
      np.testing.assert_allclose(curve, ref, rtol=1e-5, atol=1e-9, err_msg=f"{method} {seed}")


def test_rerun_recomputes_nothing_and_gives_the_same_results(quick, monkeypatch, tmp_path):
  work, out, recs = quick

  def fail(*args, **kwargs):
    raise AssertionError("a cached cell was recomputed")

  monkeypatch.setattr(teacher, "train_seeds", fail)
  assert conditioning.run(QUICK, work) == recs
  conditioning.main(["--quick", "--workdir", str(work), "--out", str(tmp_path)])
  assert (tmp_path / "conditioning.json").read_text() == (out / "conditioning.json").read_text()


def test_interrupted_sweep_runs_only_the_missing_cells(quick, monkeypatch, tmp_path):
  work, _, _ = quick
  lines = (work / "cells.jsonl").read_text().splitlines()
  (tmp_path / "cells.jsonl").write_text("\n".join(lines[:-2]) + '\n{"optimizer": "gd", "ka')
  calls = []

  def fake(cfg, seeds, method, opt, lr, *, steps):
    calls.append((cfg.kappa, method, lr))
    return np.ones((len(seeds), steps))

  monkeypatch.setattr(teacher, "train_seeds", fake)
  conditioning.run(QUICK, tmp_path)
  assert calls == [(float(json.loads(x)["kappa"]), json.loads(x)["method"], json.loads(x)["lr"])
                   for x in lines[-2:]]


def test_refuses_to_overwrite_results(quick):
  work, out, _ = quick
  before = (out / "conditioning.json").read_text()
  with pytest.raises(SystemExit):
    conditioning.main(["--quick", "--workdir", str(work), "--out", str(out)])
  with pytest.raises(FileExistsError):
    conditioning.write([], out)
  assert (out / "conditioning.json").read_text() == before


def test_regenerate_reproduces_the_table(quick, tmp_path):
  _, out, _ = quick
  shutil.copy(out / "conditioning.json", tmp_path)
  conditioning.regenerate(tmp_path / "conditioning.json", tmp_path / "regen")
  assert (tmp_path / "regen" / "conditioning.md").read_text() == (
      (out / "conditioning.md").read_text()
  )
  assert (tmp_path / "regen" / "conditioning.png").stat().st_size > 0


def test_gd_sds_lora_insensitive_to_kappa_lora_not(quick):
  _, _, recs = quick
  best = conditioning._best(recs)

  def median_steps(kappa, method):
    hits = [r["steps_to_tol"] for r in best[("gd", kappa, method)]]
    return float(np.median([np.inf if h is None else h for h in hits]))

  s1, s100 = median_steps(1, "sds"), median_steps(100, "sds")
  assert np.isfinite(s1) and np.isfinite(s100) and max(s1, s100) / min(s1, s100) < 3
  assert median_steps(100, "lora") >= median_steps(1, "lora")


def test_divergence_never_reaches_and_best_lr_rule(monkeypatch):
  curve = np.array([1.0, 1e-7, np.nan])  # below the threshold, then diverged

  monkeypatch.setattr(teacher, "train_seeds", lambda *a, **k: np.stack([curve, curve]))
  line = conditioning._cell(QUICK, "gd", 1, "lora", 0.1)
  assert line["steps_to_tol"] == [None, None] and line["final_loss"] == [None, None]

  def cell(lr, hits, finals):
    return dict(optimizer="gd", kappa=1, method="lora", lr=lr, steps=10, threshold=1e-6,
                seeds=[0, 1, 2], steps_to_tol=hits, final_loss=finals)

  lines = [cell(0.1, [5, None, None], [1e-8, 1.0, 1.0]),  # median: not reached
           cell(0.3, [9, 9, None], [1e-9, 1e-9, None]),   # median 9
           cell(1.0, [8, 9, 9], [1e-7, 1e-7, 1e-7])]      # median 9, worse final loss
  best = {r["lr"] for r in conditioning.records(lines) if r["best_lr"]}
  assert best == {0.3}
