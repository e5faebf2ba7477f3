"""The fine-tuning grid's bookkeeping: learning-rate choice, tables, resumable runs."""

from __future__ import annotations

import json

import pytest

from experiments.finetune import grid


def _records():
  recs = []
  acc = {"full": 0.90, "lora": 0.80, "sds": 0.85}
  for method in acc:
    for rank in ((0,) if method == "full" else (8,)):
      for lr, bump in ((1e-3, 0.0), (2e-3, 0.01)):  # the larger lr validates better
        recs.append({"task": "t", "method": method, "rank": rank, "lr": lr, "seed": 0,
                     "validation_accuracy": acc[method] + bump, "validation_loss": 0.5,
                     "test_accuracy": acc[method] + bump, "final_train_loss": 0.3,
                     "steps": 10, "wall_seconds": 1.0})
      for seed in (1, 2):
        recs.append({**recs[-1], "seed": seed, "test_accuracy": acc[method] + 0.01 + 0.002 * seed})
  return recs


def test_choose_lr_takes_best_validation_then_lower_loss():
  recs = _records()
  assert grid.choose_lr(recs, "t", "lora", 8) == 2e-3
  tie = [dict(r, validation_accuracy=0.5, validation_loss=0.2 if r["lr"] == 1e-3 else 0.4)
         for r in recs if r["method"] == "sds" and r["seed"] == 0]
  assert grid.choose_lr(tie, "t", "sds", 8) == 1e-3


def test_table_means_and_gap_share():
  recs = _records()
  best = {(r["method"], r["rank"]): grid.choose_lr(recs, "t", r["method"], r["rank"])
          for r in recs}
  for r in recs:
    r["chosen_lr"] = best[r["method"], r["rank"]] == r["lr"]
  md = grid.table(recs)
  # Chosen-lr test accuracies: seeds 0, 1, 2 -> acc + 0.01, + 0.012, + 0.014: mean acc + 0.012.
  assert "| t | LoRA | 8 | 0.002 | 3 | 0.8120 ± 0.0020 |" in md
  # SDS closes (0.862 - 0.812) / (0.912 - 0.812) = half of the gap.
  assert "| t | 8 | 0.9120 | 0.8120 | 0.8620 | +0.50 |" in md


@pytest.mark.slow
def test_train_one_runs_then_reads_back(tmp_path, monkeypatch):
  from experiments.finetune import train

  rec = grid.train_one(tmp_path, "minilm", "lora", 8, 1e-3, 0, quick=True)
  assert rec["steps"] > 0 and 0.0 <= rec["test_accuracy"] <= 1.0
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
  assert grid.train_one(tmp_path, "minilm", "lora", 8, 1e-3, 0, quick=True) == rec
  assert json.loads((tmp_path / "minilm" / "lora_r8_lr0.001_s0" / "summary.json").read_text())
