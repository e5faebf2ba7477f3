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
  assert "| t | 8 | 3/3/3 | 0.9120 | 0.8120 | 0.8620 | +0.50 |" in md
  # A LoRA-to-full gap below one point (or the seeds' spread) gets no share.
  close = [dict(r, test_accuracy=r["test_accuracy"] - 0.095) if r["method"] == "full" else r
           for r in recs]
  md = grid.table(close)
  assert "| t | 8 | 3/3/3 | 0.8170 | 0.8120 | 0.8620 | - (gap +0.0050 within noise 0.0100) |" in md


@pytest.mark.slow
def test_train_one_runs_then_reads_back(tmp_path, monkeypatch):
  from experiments.finetune import train

  rec = grid.train_one(tmp_path, "minilm", "lora", 8, 1e-3, 0, quick=True)
  assert rec["steps"] > 0 and 0.0 <= rec["test_accuracy"] <= 1.0
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
  assert grid.train_one(tmp_path, "minilm", "lora", 8, 1e-3, 0, quick=True) == rec
  assert json.loads((tmp_path / "minilm" / "lora_r8_lr0.001_s0" / "summary.json").read_text())


def test_run_takes_known_records_and_saves_after_every_run(tmp_path, monkeypatch):
  """A grid continues from the results file: matching records are not retrained."""
  trained, saved = [], []

  def fake_train_one(workdir, task, method, rank, lr, seed, quick=False):
    trained.append((method, rank, lr, seed))
    return {"task": task, "method": method, "rank": rank, "lr": lr, "seed": seed,
            "test_accuracy": 0.5 + lr, "validation_accuracy": 0.5 + lr,
            "validation_loss": 0.5, "final_train_loss": 0.3,
            "steps": grid._steps(task, quick), "wall_seconds": 1.0}

  monkeypatch.setattr(grid, "train_one", fake_train_one)
  monkeypatch.setattr(grid, "METHODS", ("full", "lora"))
  first = fake_train_one(None, "minilm", "full", 0, 3e-5, 0, quick=True)
  stale = dict(fake_train_one(None, "minilm", "lora", 8, 5e-4, 0, quick=True), steps=1)
  trained.clear()
  recs = grid.run(tmp_path, ["minilm"], quick=True, log=lambda m: None,
                  known=[first, stale], save=saved.append)
  assert ("full", 0, 3e-5, 0) not in trained  # known: taken
  assert ("lora", 8, 5e-4, 0) in trained  # a different step count: retrained
  # full: 2 lrs + 1 seed; lora at ranks 8 and 32: 2 lrs + 1 seed each.
  assert len(recs) == 9 and len(saved) == 9 and len(trained) == 8
  assert [len(s) for s in saved] == list(range(1, 10))  # the stale record is dropped
  chosen = {(r["method"], r["rank"], r["seed"]): r["lr"] for r in recs if r["chosen_lr"]}
  assert chosen == {("full", 0, 0): 1e-4, ("full", 0, 1): 1e-4, ("lora", 8, 0): 1e-3,
                    ("lora", 8, 1): 1e-3, ("lora", 32, 0): 1e-3, ("lora", 32, 1): 1e-3}
  # A partial grid: a cell without its whole sweep is not marked, and the table says so.
  part = grid.annotate(saved[2])
  assert not any(r["chosen_lr"] for r in part if r["method"] == "lora")
  assert "Partial grid" in grid.table(part)


def test_interrupted_run_of_one_task_keeps_the_other_tasks_records(tmp_path, monkeypatch):
  """Every write of finetune.json, not only the last, carries the tasks not being run."""
  other = {"task": "efficientnet", "method": "full", "rank": 0, "lr": 3e-4, "seed": 0,
           "test_accuracy": 0.8, "validation_accuracy": 0.8, "validation_loss": 0.5,
           "final_train_loss": 0.3, "steps": 7, "wall_seconds": 1.0}
  (tmp_path / "finetune.json").write_text(json.dumps([other]))
  calls = []

  def train_then_interrupt(workdir, task, method, rank, lr, seed, quick=False):
    if calls:
      raise KeyboardInterrupt
    calls.append(method)
    return dict(other, task=task, method=method, rank=rank, lr=lr, seed=seed,
                steps=grid._steps(task, quick))

  monkeypatch.setattr(grid, "train_one", train_then_interrupt)
  with pytest.raises(KeyboardInterrupt):
    grid.main(["--tasks", "minilm", "--quick", "--results", str(tmp_path),
               "--workdir", str(tmp_path / "runs")])
  saved = json.loads((tmp_path / "finetune.json").read_text())
  assert sorted(r["task"] for r in saved) == ["efficientnet", "minilm"]
  assert [r for r in saved if r["task"] == "efficientnet"][0]["test_accuracy"] == 0.8


def test_sds_records_of_older_defaults_move_aside_and_are_retrained(tmp_path, monkeypatch):
  """SDS records without today's step scale or re-warm-up are superseded: kept apart."""
  base = {"task": "minilm", "rank": 8, "seed": 0, "test_accuracy": 0.8,
          "validation_accuracy": 0.8, "validation_loss": 0.5, "final_train_loss": 0.3,
          "steps": grid._steps("minilm", True), "wall_seconds": 1.0}
  unscaled = dict(base, method="sds", lr=1e-3)  # no sds_step_scale: from before it existed
  defaults = {"sds_step_scale": grid._step_scale(), "sds_rewarmup_steps": grid._rewarmup_steps()}
  # scaled, but from before the re-warm-up default (no sds_rewarmup_steps)
  scaled_only = dict(base, method="sds", lr=4e-3, sds_step_scale=grid._step_scale())
  current = dict(base, method="sds", lr=2e-3, **defaults)
  lora = dict(base, method="lora", lr=5e-4)
  assert grid._step_scale() != 1.0 and grid._rewarmup_steps() != 0
  assert [grid.is_current(r) for r in (unscaled, scaled_only, current, lora)] == [
      False, False, True, True]
  (tmp_path / "finetune.json").write_text(json.dumps([unscaled, scaled_only, current, lora]))
  trained = []

  def fake_train_one(workdir, task, method, rank, lr, seed, quick=False):
    trained.append((method, rank, lr, seed))
    extra = defaults if method == "sds" else {}
    return dict(base, task=task, method=method, rank=rank, lr=lr, seed=seed, **extra)

  monkeypatch.setattr(grid, "train_one", fake_train_one)
  monkeypatch.setattr(grid, "METHODS", ("lora", "sds"))
  assert grid.main(["--tasks", "minilm", "--quick", "--results", str(tmp_path),
                    "--workdir", str(tmp_path / "runs")]) == 0
  assert ("sds", 8, 1e-3, 0) in trained  # superseded: retrained
  assert ("sds", 8, 2e-3, 0) not in trained and ("lora", 8, 5e-4, 0) not in trained
  superseded = json.loads((tmp_path / "finetune_superseded.json").read_text())
  assert superseded == [unscaled, scaled_only]
  saved = json.loads((tmp_path / "finetune.json").read_text())
  assert all(grid.is_current(r) for r in saved) and len(saved) == len(trained) + 2
  # An SDS run directory names its step scale: an older default's run is never read back.
  assert "_step0.408_" in str(grid._run_dir(tmp_path, "minilm", "sds", 8, 1e-3, 0))


def test_long_efficientnet_task_has_three_times_the_steps_and_three_methods(tmp_path):
  """``efficientnet_3x``: EfficientNet's grid task at 3x the steps, full, LoRA and SDS-LoRA only."""
  short, long = (grid.config_for(t, "lora", 8, 1e-3, 0)
                 for t in ("efficientnet", "efficientnet_3x"))
  assert long.num_steps == 3 * short.num_steps == 3 * grid.EFFNET_STEPS
  assert long.checkpoint_every == 3 * short.checkpoint_every
  for field in ("data", "adapter", "optim", "batch_size"):  # nothing else differs
    assert long[field] == short[field]
  assert [c for c in grid.cells(["efficientnet_3x"])] == [
      ("efficientnet_3x", "full", None), ("efficientnet_3x", "lora", 8),
      ("efficientnet_3x", "lora", 32), ("efficientnet_3x", "sds", 8),
      ("efficientnet_3x", "sds", 32)]
  assert len(list(grid.cells(["efficientnet"]))) == 1 + 2 * (len(grid.METHODS) - 1)
  with pytest.raises(ValueError, match="unknown.*efficientnet3x"):
    grid.main(["--tasks", "efficientnet3x", "--quick", "--results", str(tmp_path)])
  assert not list(tmp_path.iterdir())  # refused before anything was written


def test_table_lists_tasks_in_grid_order_whatever_the_file_order():
  recs = [dict(r, task=task) for task in ("efficientnet_3x", "minilm", "efficientnet")
          for r in _records()]
  for r in recs:
    r["chosen_lr"] = r["lr"] == 2e-3
  first_table = grid.table(recs).split("\n\n")[0].splitlines()[2:]
  rows = [line.split(" | ")[0][2:] for line in first_table]
  assert list(dict.fromkeys(rows)) == list(grid.TASKS)  # the long schedule beside the short


def test_a_finished_run_is_reused_only_with_the_same_configuration(tmp_path):
  """A finished run trained with another default (or other steps) is refused, by name;
  an interrupted one is left to resume; the same configuration's summary is reused."""
  from experiments.finetune import train

  config = grid.config_for("minilm", "sds", 8, 2e-3, 0, quick=True)
  wd = tmp_path / "run"
  assert train.finished_summary(config, wd) is None  # nothing there
  wd.mkdir()
  summary = {"interrupted": False, "steps": config.num_steps, "test_accuracy": 0.8}
  (wd / "summary.json").write_text(json.dumps(summary))
  with pytest.raises(ValueError, match="without its config.json"):
    train.finished_summary(config, wd)
  (wd / "config.json").write_text(json.dumps({"config": train._config_dict(config)}))
  assert train.finished_summary(config, wd) == summary
  older = grid.config_for("minilm", "sds", 8, 2e-3, 0, quick=True)
  older.optim.sds_rewarmup_steps = 0  # trained before the re-warm-up default
  (wd / "config.json").write_text(json.dumps({"config": train._config_dict(older)}))
  with pytest.raises(ValueError, match=r"optim\.sds_rewarmup_steps: 0 there, 10 now"):
    train.finished_summary(config, wd)
  (wd / "config.json").write_text(json.dumps({"config": train._config_dict(config)}))
  (wd / "summary.json").write_text(json.dumps(dict(summary, steps=config.num_steps + 1)))
  with pytest.raises(ValueError, match="num_steps"):
    train.finished_summary(config, wd)
  (wd / "summary.json").write_text(json.dumps(dict(summary, interrupted=True)))
  assert train.finished_summary(config, wd) is None  # resumed by train_and_evaluate
