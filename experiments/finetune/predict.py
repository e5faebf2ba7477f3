r"""Labels texts or images with a fine-tuned model.

  python -m experiments.finetune.predict --model runs/sst/lora --input sentences.txt
  python -m experiments.finetune.predict --model runs/fm/export/adapters --input a.png b.png

``--model`` is a trainer workdir (its newest intact checkpoint) or an exported adapter
directory (``WORKDIR/export/adapters``, which records the run's config). ``--input`` is a
text file (one text per line) for a text model, or image files for an image model.
Prints ``label<TAB>probability<TAB>input`` per line, or JSON lines with ``--jsonl``.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
from absl import flags

from experiments import cli



def load(model_dir: str | pathlib.Path):
  """``(task, trainable, meta)`` from a workdir or an export directory."""
  import ml_collections

  from sdslora_jax import checkpoint as sl_ckpt
  from experiments.finetune import train as T
  from experiments.finetune.tasks import build_task

  path = pathlib.Path(model_dir).absolute()  # orbax needs absolute paths
  if (path / "config.json").exists():  # a workdir
    meta = json.loads((path / "config.json").read_text())
    manager = T._manager(path / "checkpoints", meta["config"]["keep_checkpoints"])
    if manager.latest_step() is None:
      raise FileNotFoundError(f"{path} has no checkpoints")
    trainable = None
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        trainable = sl_ckpt.restore_from_manager(manager, step=step)["trainable"]
        break
      except (sl_ckpt.CheckpointDamagedError, FileNotFoundError) as e:
        print(f"warning: checkpoint step {step} unreadable ({e}); trying the previous one",
              file=sys.stderr)
    manager.close()
    if trainable is None:
      raise ValueError(f"no readable checkpoint in {path / 'checkpoints'}")
  else:
    meta = sl_ckpt.read_extra(path)
    if not meta or "config" not in meta:
      raise ValueError(f"{path} is neither a trainer workdir nor an export with its config")
    trainable = sl_ckpt.restore_adapters(path)
  config = ml_collections.ConfigDict(meta["config"])
  task = build_task(config, jax.random.key(0), classes=tuple(meta["classes"]))
  return task, trainable, meta


def predict(task, trainable, raw, batch_size: int = 64) -> np.ndarray:
  """Class probabilities ``(len(raw), num_classes)`` for texts or images."""
  full = "params" in trainable

  @jax.jit
  def probs(trainable, inputs):
    if full:
      params, adapters = trainable["params"], None
    else:
      params, adapters = {**task.params, "head": trainable["head"]}, trainable["adapters"]
    return jax.nn.softmax(task.logits(params, adapters, inputs, train=False, rng=None), -1)

  out = []
  for i in range(0, len(raw), batch_size):
    chunk = raw[i : i + batch_size]
    pad = batch_size - len(chunk)  # one shape, one compilation
    inputs = task.encode_inputs(list(chunk) + [chunk[-1]] * pad)
    out.append(np.asarray(probs(trainable, inputs))[: len(chunk)])
  return np.concatenate(out)


def _read_images(paths):
  from skimage import io, transform

  images = []
  for p in paths:
    image = io.imread(p)
    if image.ndim == 2:
      image = image[..., None]
    image = image[..., :3]
    if image.shape[-1] == 3:  # grayscale, as the Fashion-MNIST images the model saw
      image = np.round(image @ np.array([0.299, 0.587, 0.114]))[..., None]
    image = transform.resize(image, (28, 28), preserve_range=True, anti_aliasing=True)
    images.append(image.astype(np.uint8))
  return images


FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "A workdir or an export directory.", flag_values=FLAGS)
flags.DEFINE_multi_string("input", None, "A text file, or images (repeat the flag for several).",
                          flag_values=FLAGS)
flags.DEFINE_bool("jsonl", False, "One JSON record per input.", flag_values=FLAGS)
flags.mark_flags_as_required(["model", "input"], flag_values=FLAGS)


def main(argv=None) -> int:
  args = cli.parse(FLAGS, argv)
  try:
    task, trainable, _ = load(args.model)
    if task.unit == "tokens":
      if len(args.input) != 1:
        raise ValueError("a text model takes one text file (one text per line)")
      with open(args.input[0], encoding="utf-8") as f:
        raw = [line.rstrip("\n") for line in f if line.strip()]
      if not raw:
        raise ValueError(f"{args.input[0]}: no text")
      shown = raw
    else:
      raw, shown = _read_images(args.input), args.input
  except (ValueError, FileNotFoundError, UnicodeDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  probs = predict(task, trainable, raw)
  for p, item in zip(probs, shown):
    k = int(np.argmax(p))
    if args.jsonl:
      print(json.dumps({"input": item, "label": task.classes[k], "probability": float(p[k])}))
    else:
      print(f"{task.classes[k]}\t{p[k]:.3f}\t{item}")
  return 0


if __name__ == "__main__":
  cli.run(main, FLAGS)
