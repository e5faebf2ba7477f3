"""The fine-tuning trainer end to end, on the pretrained models and tiny slices of real data.

Tests marked ``slow`` (sharded vs single device, two processes, SIGKILL and SIGTERM,
accumulation, bfloat16, the other methods) keep the default suite within its time
budget; run them with ``pytest -m slow tests/test_trainer.py`` (about 6 minutes).

In this process JAX has 8 simulated CPU devices (conftest), so in-process runs are
sharded over a mesh of 8; single-device and multi-process runs go through
``python -m experiments.finetune.main`` in subprocesses. The data are the prepared TFDS
datasets of the README's set-up (``$SDSLORA_DATA_DIR`` or ``./data/tfds``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from experiments.finetune import input_pipeline as ip
from experiments.finetune import train as T
from experiments.finetune.configs import efficientnet_fashion_mnist, minilm_sentiment, text_csv
import sdslora_jax as sl
from sdslora_jax import checkpoint as sl_ckpt

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA_DIR = os.path.abspath(os.environ.get("SDSLORA_DATA_DIR", REPO / "data" / "tfds"))
MAIN = [sys.executable, "-m", "experiments.finetune.main"]
MINILM_SMOKE = f"--config={REPO}/experiments/finetune/configs/minilm_sentiment.py:smoke"


@pytest.fixture(scope="module", autouse=True)
def _data():
  if not (pathlib.Path(DATA_DIR) / "rotten_tomatoes_sentences").exists():
    pytest.fail(f"no prepared data in {DATA_DIR}: run `make data` (part of `make test`)")


def smoke(module=minilm_sentiment, **overrides):
  config = module.get_config("smoke")
  config.data.data_dir = DATA_DIR
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def records(workdir, split="train"):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  latest = {}
  for line in lines:
    r = json.loads(line)
    if r["split"] == split:
      latest[r["step"]] = r
  return [latest[k] for k in sorted(latest)]


def run_main(workdir, *flags, devices=1, extra_env=None, wait=True, timeout=600):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(SDSLORA_DATA_DIR=DATA_DIR, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(extra_env or {})
  cmd = [*MAIN, f"--workdir={workdir}", *flags]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def exported(workdir):
  return jax.device_get(sl_ckpt.restore_adapters(pathlib.Path(workdir) / "export" / "adapters"))


def assert_trees_equal(x, y):
  lx, tx = jax.tree.flatten(x)
  ly, ty = jax.tree.flatten(y)
  assert tx == ty
  for a, b in zip(lx, ly):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------
# End to end, in process (8 devices).


@pytest.fixture(scope="module")
def sds_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sds")
  summary = T.train_and_evaluate(smoke(method="sds"), workdir)
  return workdir, summary


def test_minilm_smoke_trains_logs_exports_and_never_retraces(sds_run):
  workdir, summary = sds_run
  assert summary["steps"] == 6 and not summary["interrupted"]
  assert summary["step_compilations"] == 1  # 6 steps, warm-up switch included: one trace
  train = records(workdir)
  assert [r["step"] for r in train] == list(range(1, 7))
  assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
  evals = records(workdir, "eval")
  assert [r["step"] for r in evals] == [3, 6] and all(r["examples"] == 32 for r in evals)
  assert records(workdir, "test")[0]["examples"] == 32
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "curves.png").stat().st_size > 1000
  meta = json.loads((workdir / "config.json").read_text())
  assert (meta["method"], meta["rank"], meta["model"]) == ("sds", 4, "minilm")
  # The export is the final checkpoint's trainable tree.
  manager = T._manager(workdir / "checkpoints", 2)
  final = jax.device_get(sl_ckpt.restore_from_manager(manager, step=6))
  manager.close()
  assert_trees_equal(exported(workdir), final["trainable"])
  peft_cfg = json.loads((workdir / "export" / "peft" / "adapter_config.json").read_text())
  # An SDS-LoRA update qa b + a qb.T has rank 2r: PEFT gets a rank-8 LoRA for r = 4.
  assert peft_cfg["r"] == 8 and "bert.encoder.layer.1.attention.self.query" in \
      peft_cfg["target_modules"]


def test_first_loss_is_the_pretrained_models_loss(sds_run):
  """Adapters start as a zero update: step 1's loss is the base model's on that batch."""
  from experiments.models import SentenceClassifier, minilm

  workdir, _ = sds_run
  config = smoke()
  task = T.build_task(config, jax.random.fold_in(jax.random.key(config.seed), 1))
  batch = task.encode(next(ip.BatchIterator(task.train, batch_size=8, seed=config.seed)))
  cfg = minilm.minilm_config(num_layers=2, dropout_rate=0.0)
  params = {**{k: v for k, v in task.params.items() if k != "head"},
            "classifier": task.params["head"]}
  logits = SentenceClassifier(cfg, 2).apply({"params": params}, batch["input_ids"],
                                             batch["attention_mask"])
  want = float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean())
  assert abs(records(workdir)[0]["loss"] - want) < 1e-5 * abs(want)


def test_csv_file_trains_with_held_out_split(tmp_path):
  rows = ip.load_tfds("rotten_tomatoes_sentences", DATA_DIR, "train[:80]")
  path = tmp_path / "reviews.csv"
  import csv
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["review", "sentiment"])
    for i in range(len(rows)):
      ex = rows[i]
      w.writerow([ex["text"].decode(), ["neg", "pos"][int(ex["label"])]])
  config = smoke(text_csv, method="lora", data__train_file=str(path), data__text_key="review",
                 data__label_key="sentiment", data__validation_fraction=0.25)
  summary = T.train_and_evaluate(config, tmp_path / "run")
  assert summary["steps"] == 6 and summary["step_compilations"] == 1
  assert records(tmp_path / "run", "eval")[-1]["examples"] == 20
  assert json.loads((tmp_path / "run" / "config.json").read_text())["classes"] == ["neg", "pos"]


@pytest.mark.slow
def test_efficientnet_fashion_mnist_smoke(tmp_path):
  summary = T.train_and_evaluate(smoke(efficientnet_fashion_mnist, method="lora"), tmp_path)
  assert summary["steps"] == 4 and summary["step_compilations"] == 1
  train = records(tmp_path)
  assert len(train) == 4 and all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in train)
  # 10 classes, fresh head: the first loss is near log(10).
  assert abs(train[0]["loss"] - np.log(10)) < 1.0
  assert "peft" not in summary["export"]


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  """Two micro-batches of 4 give the update of one batch of 8 (mean of the gradients)."""
  mesh = {"mesh__data": 4, "mesh__tensor": 2}  # micro-batches of 4 over 4 batch shards
  one = T.train_and_evaluate(smoke(method="lora", num_steps=2, export=False, **mesh),
                             tmp_path / "a")
  two = T.train_and_evaluate(
    smoke(method="lora", num_steps=2, accum_steps=2, export=False, **mesh), tmp_path / "b")
  la, lb = records(tmp_path / "a"), records(tmp_path / "b")
  for ra, rb in zip(la, lb):
    np.testing.assert_allclose(rb["loss"], ra["loss"], rtol=1e-5)
    np.testing.assert_allclose(rb["grad_norm"], ra["grad_norm"], rtol=1e-4)
  assert one["step_compilations"] == two["step_compilations"] == 1


@pytest.mark.slow
def test_bfloat16_compute_trains(tmp_path):
  summary = T.train_and_evaluate(smoke(method="lora", compute_dtype="bfloat16", export=False),
                                 tmp_path)
  losses = [r["loss"] for r in records(tmp_path)]
  f32 = T.train_and_evaluate(smoke(method="lora", export=False), tmp_path / "f32")
  ref = [r["loss"] for r in records(tmp_path / "f32")]
  assert summary["step_compilations"] == f32["step_compilations"] == 1
  np.testing.assert_allclose(losses, ref, rtol=0.05)  # bf16 rounding, same trajectory


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_dropout_model_trains(tmp_path, quantization):
  """The main job's model keeps dropout (the smoke config turns it off). Links planted in
  the workdir are replaced, never written through."""
  outside = tmp_path / "outside"
  outside.mkdir()
  run = tmp_path / "run"
  run.mkdir()
  for name in ("summary.json", "config.json", "curves.png"):
    (outside / name).write_text("precious")
    (run / name).symlink_to(outside / name)
  summary = T.train_and_evaluate(smoke(method="sds", model__dropout_rate=0.1, num_steps=3,
                                       model__quantization=quantization, export=False), run)
  assert summary["steps"] == 3 and np.isfinite(summary["final_train_loss"])
  for name in ("summary.json", "config.json", "curves.png"):
    assert (outside / name).read_text() == "precious" and not (run / name).is_symlink()


def test_quantized_base_trains_near_the_float_run_and_predicts(tmp_path, sds_run):
  """QLoRA: the frozen kernels stored as nf4 (8 devices): one compilation, a trajectory
  near the float base's (quantization error only), and prediction from the workdir uses
  the same quantized base as evaluation did."""
  from experiments.finetune import predict
  summary = T.train_and_evaluate(smoke(method="sds", model__quantization="nf4"), tmp_path)
  assert summary["step_compilations"] == 1
  losses = [r["loss"] for r in records(tmp_path)]
  ref = [r["loss"] for r in records(sds_run[0])]
  np.testing.assert_allclose(losses, ref, rtol=0.05)
  assert losses != ref  # the base really is quantized
  task, trainable, _ = predict.load(tmp_path)
  assert "QArray" in str(jax.tree_util.tree_structure(task.params))
  source = ip.load_tfds("rotten_tomatoes_sentences", DATA_DIR, "validation[:32]")
  texts = [source[i]["text"].decode() for i in range(len(source))]
  labels = np.array([int(source[i]["label"]) for i in range(len(source))])
  probs = predict.predict(task, trainable, texts, batch_size=16)
  assert float(np.mean(probs.argmax(-1) == labels)) == records(tmp_path, "eval")[-1]["accuracy"]


# ----------------------------------------------------------------------------------------
# Checkpoints: resume, damage, kill.


def test_resume_from_damaged_latest_checkpoint_uses_the_previous(tmp_path, capsys,
                                                                  monkeypatch):
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  workdir = tmp_path / "run"
  T.train_and_evaluate(smoke(method="lora", export=False), workdir)
  want = {r["step"]: r["loss"] for r in records(workdir)}
  damaged = next((workdir / "checkpoints" / "6" / "adapter_arrays").rglob("d/*"))
  if damaged.is_dir():
    damaged = next(p for p in damaged.rglob("*") if p.is_file())
  damaged.write_bytes(b"\0" * max(damaged.stat().st_size // 2, 1))
  (workdir / "summary.json").unlink()
  summary = T.train_and_evaluate(smoke(method="lora", export=False), workdir, resume=True)
  err = capsys.readouterr().err
  assert "checkpoint step 6" in err and "damaged" in err and "resumed from step 3" in err
  assert err.count("checkpoint step 6") == 1 and not unraisable  # one report, no traces
  assert summary["steps"] == 6
  # The damaged checkpoint is kept aside, not deleted.
  assert len(list((workdir / "damaged_checkpoints").iterdir())) == 1
  # Steps 4-6 redone from step 3 give the losses of the uninterrupted run, exactly.
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  redone = [json.loads(x) for x in lines[-12:] if json.loads(x)["split"] == "train"]
  assert [r["step"] for r in redone][-3:] == [4, 5, 6]
  for r in redone[-3:]:
    assert r["loss"] == want[r["step"]], r


@pytest.mark.parametrize("overrides,field", [
    ({"adapter__sqrt_rank_scaling": True}, "adapter.sqrt_rank_scaling was False, is True"),
    ({"optim__grad_clip": 0.0}, "optim.grad_clip was 1.0, is 0.0"),  # another state structure
    ({"model__num_layers": 1}, "model.num_layers was"),
])
def test_resume_with_a_changed_config_is_refused_and_moves_nothing(tmp_path, sds_run, overrides,
                                                                  field):
  import shutil
  shutil.copytree(sds_run[0], tmp_path / "run")
  before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
  with pytest.raises(ValueError, match=re.escape(field)):
    T.train_and_evaluate(smoke(method="sds", **overrides), tmp_path / "run", resume=True)
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
  assert not (tmp_path / "run" / "damaged_checkpoints").exists()


def test_checkpoint_without_its_extra_is_damaged_and_the_previous_one_is_used(tmp_path,
                                                                              sds_run):
  import shutil
  shutil.copytree(sds_run[0], tmp_path / "run")
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                 if p.name.isdigit())
  shutil.rmtree(tmp_path / "run" / "checkpoints" / str(steps[-1]) / sl_ckpt.EXTRA)
  summary = T.train_and_evaluate(smoke(method="sds"), tmp_path / "run", resume=True)
  assert summary["steps"] == steps[-1]  # resumed from the step before and trained again
  assert (tmp_path / "run" / "damaged_checkpoints").exists()
  assert_trees_equal(exported(tmp_path / "run"), exported(sds_run[0]))


def test_resume_when_no_checkpoint_reads_stops_instead_of_restarting(tmp_path, sds_run):
  import shutil
  shutil.copytree(sds_run[0], tmp_path / "run")
  for step_dir in (tmp_path / "run" / "checkpoints").iterdir():
    for sub in step_dir.iterdir():
      if sub.is_dir():
        shutil.rmtree(sub)  # every checkpoint loses its arrays
  with pytest.raises(FileNotFoundError, match="none of the .* checkpoint"):
    T.train_and_evaluate(smoke(method="sds"), tmp_path / "run", resume=True)


def test_workdir_with_checkpoints_needs_resume(sds_run):
  workdir, _ = sds_run
  with pytest.raises(FileExistsError, match="resume"):
    T.train_and_evaluate(smoke(), workdir)


def test_resume_with_another_method_is_refused(tmp_path):
  T.train_and_evaluate(smoke(method="lora", num_steps=3, export=False), tmp_path)
  with pytest.raises(ValueError, match="method|adapter"):
    T.train_and_evaluate(smoke(method="sds", num_steps=6, export=False), tmp_path, resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_leaves_a_checkpoint_and_resume_continues(tmp_path, sig):
  workdir = tmp_path / "run"
  proc = run_main(workdir, MINILM_SMOKE, "--config.method=lora", "--config.num_steps=100000",
                  "--config.checkpoint_every=100000", wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and not (
      (workdir / "metrics.jsonl").exists() and len(records(workdir)) >= 3):
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    time.sleep(0.2)
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["interrupted"] and summary["steps"] >= 3
  assert f"stopped by {sig.name}" in out
  assert (workdir / "checkpoints" / str(summary["steps"]) / "commit_success.txt").exists()


# ----------------------------------------------------------------------------------------
# Sharding.


@pytest.mark.slow
def test_sharded_run_gives_the_single_device_losses(tmp_path, sds_run):
  """8 devices as data x fsdp x tensor = 2 x 2 x 2 against one device, relative 1e-5."""
  out = run_main(tmp_path / "one", MINILM_SMOKE, devices=1)
  assert "| sds |" in out
  sharded = tmp_path / "mesh"
  T.train_and_evaluate(
    smoke(method="sds", mesh__data=2, mesh__fsdp=2, mesh__tensor=2, export=False), sharded)
  single = records(tmp_path / "one")
  for name, run in (("data=8", records(sds_run[0])), ("2x2x2", records(sharded))):
    for a, b in zip(single, run):
      np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5, err_msg=f"{name} {a['step']}")


def test_fsdp_and_tensor_shardings_split_the_base():
  mesh = T.make_mesh(smoke(mesh__data=2, mesh__fsdp=2, mesh__tensor=2).mesh)
  shard = T.base_shardings({"k": np.zeros((384, 12, 32)), "v": np.zeros((384,)),
                            "odd": np.zeros((3, 5))}, mesh)
  assert shard["k"].spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
  assert shard["v"].spec == jax.sharding.PartitionSpec(None)
  assert shard["odd"].spec == jax.sharding.PartitionSpec(None, None)


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
  """Two processes with 4 CPU devices each, through jax.distributed on localhost."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "multi"
  procs = [
    run_main(workdir, MINILM_SMOKE, "--config.distributed.enabled=True",
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
             "--config.export=False", devices=4, wait=False)
    for i in range(2)
  ]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  run_main(tmp_path / "one", MINILM_SMOKE, "--config.export=False", devices=1)
  for a, b in zip(records(tmp_path / "one"), records(workdir)):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
  assert len(records(workdir)) == 6


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_ends_with_the_same_adapters(tmp_path):
  flags = [MINILM_SMOKE, "--config.num_steps=120", "--config.checkpoint_every=20",
           "--config.keep_checkpoints=3", "--config.eval_every=1000"]
  run_main(tmp_path / "whole", *flags)
  killed = tmp_path / "killed"
  proc = run_main(killed, *flags, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and not (killed / "checkpoints" / "40").exists():
    assert proc.poll() is None, "finished before it could be killed"
    time.sleep(0.05)
  proc.kill()
  proc.communicate()
  assert not (killed / "summary.json").exists()
  reached = max(r["step"] for r in records(killed))
  assert reached < 120
  run_main(killed, *flags, "--resume")
  assert_trees_equal(exported(killed), exported(tmp_path / "whole"))
  want = {r["step"]: r["loss"] for r in records(tmp_path / "whole")}
  assert all(r["loss"] == want[r["step"]] for r in records(killed))


# ----------------------------------------------------------------------------------------
# Misuse.


@pytest.mark.parametrize("overrides, field", [
  ({"method": "adalora"}, "config.method"),
  ({"adapter__rank": 0}, "config.adapter.rank"),
  ({"batch_size": 9, "accum_steps": 2}, "config.accum_steps"),
  ({"optim__learning_rate": float("nan")}, "config.optim.learning_rate"),
  ({"mesh__data": 3}, "config.mesh"),
  ({"mesh__data": 1, "mesh__fsdp": 8, "batch_size": 4}, "config.batch_size"),
  ({"compute_dtype": "float16"}, "config.compute_dtype"),
  ({"model__name": "gpt2"}, "config.model.name"),
  ({"data__max_len": 1}, "config.data.max_len"),
  ({"adapter__sds_init": "random"}, "config.adapter.sds_init"),
  ({"method": "lora", "adapter__sds_init": "zero"}, "config.adapter.sds_init"),
  ({"optim__sds_switch_state": "rescale"}, "config.optim.sds_switch_state"),
  ({"optim__sds_rewarmup_steps": -2}, "config.optim.sds_rewarmup_steps"),
  ({"optim__sds_refresh_rule": "qr"}, "config.optim.sds_refresh_rule"),
  ({"optim__sds_step_scale": 0.0}, "config.optim.sds_step_scale"),
  ({"model__quantization": "fp4"}, "config.model.quantization"),
  ({"optim__grad_clip": -1.0}, "config.optim.grad_clip"),  # was gradient ascent
  ({"optim__b1": 1.5}, "config.optim.b1"),
  ({"optim__b2": 1.0}, "config.optim.b2"),
  ({"optim__weight_decay": float("nan")}, "config.optim.weight_decay"),
  ({"seed": -1}, "config.seed"),
  ({"optim__sds_warmup_steps": 10_000}, "config.optim.sds_warmup_steps"),  # never switched
  ({"batch_size": 4096}, "config.batch_size"),  # more than the smoke training split
  ({"method": "full", "model__quantization": "int8"}, "config.model.quantization"),
])
def test_bad_config_names_the_field(tmp_path, overrides, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    T.train_and_evaluate(smoke(**overrides), tmp_path)


def test_torn_metrics_line_is_dropped_and_links_are_not_followed(tmp_path):
  from experiments.finetune import reporting
  w = reporting.MetricWriter(tmp_path)
  w.write("train", 1, {"loss": 1.0})
  w.write("train", 2, {"loss": 0.5})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"split": "train", "st')  # a writer killed mid-record
  assert [r["step"] for r in reporting.MetricWriter(tmp_path, enabled=False).read()] == [1, 2]
  w = reporting.MetricWriter(tmp_path)  # a resumed run: the torn record is dropped
  w.write("train", 3, {"loss": 0.25})
  w.close()
  assert [r["step"] for r in w.read()] == [1, 2, 3]
  target = tmp_path / "elsewhere.txt"
  target.write_text("precious\n")
  other = tmp_path / "other"
  other.mkdir()
  (other / "metrics.jsonl").symlink_to(target)
  with pytest.raises(ValueError, match="symbolic link"):
    reporting.MetricWriter(other)
  assert target.read_text() == "precious\n"


def test_export_replaces_a_half_written_or_previous_export(tmp_path, sds_run):
  from experiments.finetune import predict
  task, trainable, meta = predict.load(sds_run[0])
  directory = tmp_path / "export"
  (tmp_path / "export.partial" / "peft").mkdir(parents=True)  # a run killed mid-export
  (tmp_path / "export.partial" / "peft" / "adapter_model.safetensors").write_bytes(b"torn")
  (directory / "adapters").mkdir(parents=True)  # an earlier export of this workdir
  T.export(directory, trainable, task, meta)
  assert not (tmp_path / "export.partial").exists() and not (tmp_path / "export.previous").exists()
  assert_trees_equal(exported(tmp_path), exported(sds_run[0]))
  assert (directory / "peft" / "adapter_config.json").exists()


def _copy_run(sds_run, tmp_path, drop_last_checkpoint=False):
  """A copy of the finished smoke run, optionally without its last checkpoint."""
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(sds_run[0], workdir)
  if drop_last_checkpoint:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    shutil.rmtree(workdir / "checkpoints" / str(steps[-1]))
  return workdir


def test_resume_after_a_torn_metrics_line_ends_with_the_uninterrupted_adapters(tmp_path,
                                                                                sds_run):
  workdir = _copy_run(sds_run, tmp_path, drop_last_checkpoint=True)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"split": "train", "step": 7, "lo')  # a run killed mid-record
  summary = T.train_and_evaluate(smoke(method="sds"), workdir, resume=True)
  assert summary["steps"] == sds_run[1]["steps"] and not summary["interrupted"]
  assert_trees_equal(exported(workdir), exported(sds_run[0]))
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    json.loads(line)  # the torn record is gone, every line parses


def test_resume_after_a_half_written_export_rewrites_it(tmp_path, sds_run):
  workdir = _copy_run(sds_run, tmp_path)
  (workdir / "export").rename(workdir / "export.partial")  # killed before the rename
  torn = workdir / "export.partial" / "adapters" / sl_ckpt.METADATA / "metadata"
  torn.write_text(torn.read_text()[:40])
  summary = T.train_and_evaluate(smoke(method="sds"), workdir, resume=True)
  assert summary["export"]["adapters"] == str(workdir / "export" / "adapters")
  assert not (workdir / "export.partial").exists()
  assert_trees_equal(exported(workdir), exported(sds_run[0]))


def test_sigint_saves_and_resume_ends_with_the_uninterrupted_adapters(tmp_path, sds_run,
                                                                      monkeypatch):
  from experiments.finetune import reporting
  write = reporting.MetricWriter.write

  def interrupt_at_step_2(self, split, step, record):
    write(self, split, step, record)
    if split == "train" and step == 2:
      os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the terminal

  monkeypatch.setattr(reporting.MetricWriter, "write", interrupt_at_step_2)
  workdir = tmp_path / "run"
  summary = T.train_and_evaluate(smoke(method="sds"), workdir)
  assert summary["interrupted"] and summary["steps"] == 2
  assert not (workdir / "export").exists()
  monkeypatch.undo()
  summary = T.train_and_evaluate(smoke(method="sds"), workdir, resume=True)
  assert summary["steps"] == sds_run[1]["steps"] and not summary["interrupted"]
  assert_trees_equal(exported(workdir), exported(sds_run[0]))


@pytest.mark.parametrize("where", ["tensorboard", "checkpoints/3/adapter_extra"])
def test_links_planted_where_orbax_or_tensorboard_write_are_refused(tmp_path, sds_run, where):
  workdir = _copy_run(sds_run, tmp_path)
  target = tmp_path / "precious"
  target.mkdir()
  (target / "keep.txt").write_text("precious\n")
  import shutil
  shutil.rmtree(workdir / where)
  (workdir / where).symlink_to(target, target_is_directory=True)
  with pytest.raises(ValueError, match=f"{re.escape(str(workdir / where))} is a symbolic link"):
    T.train_and_evaluate(smoke(method="sds", num_steps=8), workdir, resume=True)
  assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_predict_takes_a_relative_workdir(sds_run, monkeypatch):
  from experiments.finetune import predict
  workdir = sds_run[0]
  monkeypatch.chdir(workdir.parent)
  _, relative, _ = predict.load(workdir.name)  # orbax needs absolute paths: made so
  _, absolute, _ = predict.load(workdir)
  assert_trees_equal(relative, absolute)


def test_one_trainer_per_workdir(tmp_path):
  """A second trainer on a workdir in use is refused before it touches anything; the
  lock dies with its process (a killed trainer leaves no stale lock)."""
  with T._workdir_lock(tmp_path):
    with pytest.raises(RuntimeError, match="in use by another trainer"):
      T.train_and_evaluate(smoke(), tmp_path, resume=True)
  assert not (tmp_path / "checkpoints").exists()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
       "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
       "time.sleep(600)", str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(RuntimeError, match="in use"):
    with T._workdir_lock(tmp_path):
      pass
  holder.kill()
  holder.wait()
  with T._workdir_lock(tmp_path):  # free again once the holder is gone
    assert "pid" in (tmp_path / ".lock").read_text()


def test_divergence_stops_the_run_and_never_saves_nan(tmp_path):
  config = smoke(method="lora", optim__learning_rate=1e12, optim__grad_clip=0.0, log_every=1,
                 checkpoint_every=1, export=False)
  with pytest.raises(FloatingPointError, match=r"step \d+: .*training stopped"):
    T.train_and_evaluate(config, tmp_path)
  ckpt = tmp_path / "checkpoints"
  for step in sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()):
    restored = sl_ckpt.restore_from_manager(T._manager(ckpt, 2), step=step)
    for leaf in jax.tree.leaves(restored):
      if np.issubdtype(np.asarray(leaf).dtype, np.floating):
        assert np.all(np.isfinite(leaf))


def test_target_that_matches_nothing_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="matches no parameter"):
    T.train_and_evaluate(smoke(adapter__targets=(r"decoder/.*",)), tmp_path)


def test_bad_csv_names_file_and_line(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text("text,label\ngood film,1\nbad film,7\n")
  config = smoke(text_csv, data__train_file=str(path), data__classes=("0", "1"))
  with pytest.raises(ValueError, match=r"bad\.csv:3: label '7'"):
    T.train_and_evaluate(config, tmp_path / "run")


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepare_data"):
    T.train_and_evaluate(smoke(data__data_dir=str(tmp_path)), tmp_path / "run")


def test_main_reports_bad_config_without_a_traceback(tmp_path):
  proc = run_main(tmp_path, MINILM_SMOKE, "--config.method=adalora", wait=False)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2 and "error: config.method" in out and "Traceback" not in out


def test_predict_from_workdir_and_export_agrees_with_evaluation(sds_run):
  from experiments.finetune import predict

  workdir, _ = sds_run
  source = ip.load_tfds("rotten_tomatoes_sentences", DATA_DIR, "validation[:32]")
  texts = [source[i]["text"].decode() for i in range(len(source))]
  labels = np.array([int(source[i]["label"]) for i in range(len(source))])
  task, trainable, meta = predict.load(workdir)
  probs = predict.predict(task, trainable, texts, batch_size=16)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  accuracy = float(np.mean(probs.argmax(-1) == labels))
  assert accuracy == records(workdir, "eval")[-1]["accuracy"]
  task2, exported_tree, _ = predict.load(workdir / "export" / "adapters")
  np.testing.assert_allclose(predict.predict(task2, exported_tree, texts, batch_size=16), probs,
                             rtol=1e-6, atol=1e-7)
  assert meta["classes"] == ["negative", "positive"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rslora", "riemannian", "full"])
def test_other_methods_train(tmp_path, method):
  summary = T.train_and_evaluate(smoke(method=method, num_steps=3, export=False), tmp_path)
  losses = [r["loss"] for r in records(tmp_path)]
  assert summary["step_compilations"] == 1 and len(losses) == 3 and np.all(np.isfinite(losses))
  if method == "full":  # every parameter of the 2-layer model and the head
    task = T.build_task(smoke(), jax.random.key(0))
    assert summary["trainable_parameters"] == sum(np.size(x) for x in jax.tree.leaves(task.params))
  else:
    assert summary["trainable_parameters"] < 60_000


@pytest.mark.slow
def test_diagnostics_are_logged_and_satisfy_the_identities(tmp_path):
  T.train_and_evaluate(smoke(method="lora", export=False, diagnostics__every=2,
                             diagnostics__alignment=True), tmp_path)
  diag = records(tmp_path, "diagnostics")
  assert [r["step"] for r in diag] == [0, 2, 4]
  q = "bert/encoder/layer_0/attention/query/kernel"
  first, later = diag[0], diag[-1]
  # LoRA starts with b = 0, so dL/da = s G b.T is exactly zero at step 0 (rank 0),
  # and not after training has moved b.
  assert first[f"{q}/grad_a_effective_rank"] == 0.0
  assert 0.0 < later[f"{q}/grad_a_effective_rank"] <= 8.0
  for r in diag:
    for k, v in r.items():
      if k.endswith("/alignment"):
        assert 0.0 <= v <= 1.0 + 1e-6, (k, v)
      if k.endswith("effective_rank"):
        assert 0.0 <= v <= 8.0 + 1e-4, (k, v)
  assert "mean/alignment" in first and first["mean/alignment"] > 0.0


def test_sds_init_zero_starts_adapters_in_the_sds_phase():
  """``adapter.sds_init="zero"``: zero factors, orthonormal bases, sds_on = 1, zero update."""
  config = smoke(adapter__sds_init="zero", optim__sds_warmup_steps=0)
  task = T.build_task(config, jax.random.key(0))
  adapters = task.init_adapters(jax.random.key(1), T.adapter_rules(config),
                                sds_on=T._sds_on_at_init(config))
  leaves = [x for x in jax.tree.leaves(adapters, is_leaf=sl.is_adapter) if sl.is_adapter(x)]
  assert leaves and all(float(np.min(x.sds_on)) == 1.0 for x in leaves)
  for x in leaves:
    assert not np.any(x.a) and not np.any(x.b)
    qa = np.asarray(x.qa).reshape(-1, *x.qa.shape[-2:])
    for q in qa:
      np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-5)
  assert not T._sds_on_at_init(smoke())  # the default starts in the LoRA warm-up


def test_step_metrics_are_logged_around_the_switch(tmp_path):
  T.train_and_evaluate(smoke(method="sds", export=False, num_steps=5, optim__sds_warmup_steps=2,
                             diagnostics__step_metrics_until=4), tmp_path)
  rows = records(tmp_path, "step_metrics")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  [q] = [k[:-len("/switched")] for k in rows[0]
         if k.endswith("layer_0/attention/query/kernel/switched")]
  assert [r[f"{q}/switched"] for r in rows] == [0.0, 1.0, 0.0, 0.0]
  assert rows[0][f"{q}/refresh_change"] == 0.0  # the warm-up: plain LoRA, no bases
  assert all(r[f"{q}/refresh_change"] > 0.0 and r[f"{q}/step_change"] > 0.0 for r in rows[2:])
  with pytest.raises(ValueError, match="step_metrics_until"):
    T.check_config(smoke(method="full", diagnostics__step_metrics_until=3))
