"""The fine-tuning tasks: a pretrained model, its fresh head, its inputs and its data.

A :class:`Task` is everything the trainer needs that depends on the model and data:

* ``model`` (Linen), ``params`` (numpy, the pretrained base with a fresh head under
  ``head``), frozen ``extra`` collections (EfficientNet's ``batch_stats``);
* ``encode``: host-side, a batch of examples -> numpy model inputs (tokens or pixels);
* ``logits``: device-side, ``(variables, adapters, inputs, train, rng) -> logits``;
* the data sources (``train``, ``validation``, ``test``) and the class names.

Two models (``config.model.name``): ``"minilm"`` (all-MiniLM-L6-v2 + mean pooling + a
linear head) and ``"efficientnet_lite0"`` (ImageNet weights + a new ``fc`` head). Data
(``config.data.source``): ``"rotten_tomatoes"``, ``"fashion_mnist"``, ``"csv"`` (a user's
CSV / JSONL file) and ``"tfds"`` (any array_record TFDS dataset by name and ``data_dir``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sdslora_jax.linen as sl_linen
from experiments import quantize
from experiments.finetune import input_pipeline as ip
from sdslora_jax import intercept

__all__ = ["Task", "build_task", "DATA_SOURCES", "MODELS", "default_data_dir"]

MODELS = ("minilm", "efficientnet_lite0")
DATA_SOURCES = ("rotten_tomatoes", "fashion_mnist", "csv", "tfds")


def default_data_dir() -> str:
  """Where the set-up prepares the TFDS datasets: ``$SDSLORA_DATA_DIR`` or ``./data/tfds``."""
  return os.environ.get("SDSLORA_DATA_DIR", os.path.join("data", "tfds"))


@dataclasses.dataclass
class Task:
  """One model on one data set; see the module docstring."""

  model: Any
  params: dict
  extra: dict
  head: str
  classes: tuple[str, ...]
  unit: str  # "tokens" or "images": what throughput counts
  input_keys: tuple[str, ...]
  encode: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
  apply_kwargs: Callable[[bool], dict]
  train: Any
  validation: Any
  test: Any
  peft_module_name: Callable[[str], str | None] | None = None
  max_len: int = 0
  encode_inputs: Callable[[Any], dict[str, np.ndarray]] | None = None  # raw texts / images

  def logits(self, params, adapters, inputs, *, train: bool, rng) -> jax.Array:
    """The model's logits; ``adapters`` may be ``None`` (full fine-tuning)."""
    variables = {"params": params, **self.extra}
    args = [inputs[k] for k in self.input_keys]
    kwargs = self.apply_kwargs(train)
    if train:
      kwargs["rngs"] = {"dropout": rng}
    if adapters is None:
      return self.model.apply(variables, *args, **kwargs)
    return self.model.adapted_apply(variables, adapters, *args, **kwargs)

  def example_inputs(self) -> dict[str, np.ndarray]:
    """One encoded example (batch of 1), e.g. for shapes and layouts."""
    if self.train is None:  # built without data (prediction): zeros of the input shapes
      if self.unit == "tokens":
        n = self.max_len
        return {"input_ids": np.zeros((1, n), np.int32), "attention_mask": np.ones((1, n), np.int32)}
      return {"image": np.zeros((1, 28, 28, 1), np.uint8)}
    examples = ip.collate([self.train[0]])
    return {k: v for k, v in self.encode(examples).items() if k in self.input_keys}

  def init_adapters(self, key: jax.Array, rules, sds_on: bool = False) -> dict:
    """Adapters for ``params`` (head excluded by the rules' patterns), layouts from a trace.

    ``sds_on``: SDS adapters start in the SDS phase (zero factors, random bases).
    """
    example = self.example_inputs()
    return self.model.init_adapters(key, self.params, rules,
                                    *(example[k] for k in self.input_keys), sds_on=sds_on,
                                    **self.apply_kwargs(False))

  def units(self, inputs: Mapping[str, np.ndarray]) -> int:
    """Tokens (non-padding) or images in a batch, for throughput."""
    if self.unit == "tokens":
      return int(np.sum(inputs["attention_mask"]))
    return int(next(iter(inputs.values())).shape[0])


# ----------------------------------------------------------------------------------------
# Data.


def _tfds_splits(name: str, data_dir: str, splits: Mapping[str, str]) -> dict:
  out = {}
  for role, split in splits.items():
    if not split:
      out[role] = None
      continue
    try:
      out[role] = ip.load_tfds(name, data_dir, split)
    except Exception as e:  # TFDS raises several kinds for a missing dataset or split.
      raise FileNotFoundError(
        f"TFDS dataset {name!r} split {split!r} not found in data_dir {data_dir!r} "
        f"({type(e).__name__}: {e}); run `python -m experiments.finetune.prepare_data` "
        "(the README's set-up does) or set config.data.data_dir"
      ) from e
  return out


def _text_data(config) -> tuple[dict, tuple[str, ...], str, str]:
  """Sources with text and label features, the class names, the text and label keys."""
  data = config.data
  if data.source == "rotten_tomatoes":
    splits = _tfds_splits(
      "rotten_tomatoes_sentences", data.data_dir or default_data_dir(),
      {"train": data.train_split, "validation": data.eval_split, "test": data.test_split},
    )
    return splits, ("negative", "positive"), "text", "label"
  if data.source == "csv":
    if not data.train_file:
      raise ValueError("config.data.train_file: a CSV or JSONL file is needed for source 'csv'")
    loaded = ip.load_text_classification(
      data.train_file,
      validation_file=data.validation_file or None,
      text_key=data.text_key,
      label_key=data.label_key,
      classes=tuple(data.classes) if data.classes else None,
      validation_fraction=data.validation_fraction,
      seed=data.split_seed,
      accept_odd_labels=data.accept_odd_labels,
    )
    test = None
    if data.test_file:
      test = ip.load_text_classification(
        data.test_file, validation_file=data.test_file, text_key=data.text_key,
        label_key=data.label_key, classes=loaded.classes,
      ).validation
    splits = {"train": loaded.train, "validation": loaded.validation, "test": test}
    return splits, loaded.classes, "text", "label"
  if data.source == "tfds":
    splits = _tfds_splits(
      data.name, data.data_dir or default_data_dir(),
      {"train": data.train_split, "validation": data.eval_split, "test": data.test_split},
    )
    return splits, _tfds_classes(splits["train"], data), data.text_key, data.label_key
  raise ValueError(f"config.data.source {data.source!r} does not hold text for model 'minilm'")


def _tfds_classes(source, data) -> tuple[str, ...]:
  if data.classes:
    return tuple(data.classes)
  feature = source.dataset_info.features[data.label_key]
  names = getattr(feature, "names", None)
  if not names:
    raise ValueError(
      f"config.data.classes: TFDS feature {data.label_key!r} has no class names; list them"
    )
  return tuple(names)


def _image_data(config) -> tuple[dict, tuple[str, ...], str, str]:
  data = config.data
  if data.source == "fashion_mnist":
    name = "fashion_mnist_idx"
    classes = ip._FASHION_MNIST_CLASSES
  elif data.source == "tfds":
    name, classes = data.name, None
  else:
    raise ValueError(
      f"config.data.source {data.source!r} does not hold images for model 'efficientnet_lite0'"
    )
  # Fashion-MNIST has no validation split: hold out the end of train (TFDS slicing).
  splits = _tfds_splits(
    name, data.data_dir or default_data_dir(),
    {"train": data.train_split, "validation": data.eval_split, "test": data.test_split},
  )
  if classes is None:
    classes = _tfds_classes(splits["train"], data)
  return splits, tuple(classes), data.image_key, data.label_key


# ----------------------------------------------------------------------------------------
# Models.


def _minilm_task(config, rng, classes=None) -> Task:
  from experiments.models import SentenceClassifier
  from experiments.models import minilm

  if classes is None:
    splits, classes, text_key, label_key = _text_data(config)
  else:
    splits, text_key, label_key = _NO_DATA, "text", "label"
  overrides = {"dropout_rate": config.model.dropout_rate}
  if config.model.num_layers:
    overrides["num_layers"] = config.model.num_layers
  if config.compute_dtype != "float32":
    overrides["dtype"] = jnp.dtype(config.compute_dtype)
  bert_config, params = minilm.init_classifier_params(len(classes), rng, **overrides)
  max_len = config.data.max_len
  if not 2 <= max_len <= bert_config.max_position_embeddings:
    raise ValueError(
      f"config.data.max_len {max_len} must be in [2, {bert_config.max_position_embeddings}]"
    )

  def encode(batch):
    ids, mask = minilm.tokenize([_text(t) for t in batch[text_key]], max_len)
    return {"input_ids": ids, "attention_mask": mask, "label": _labels(batch, label_key)}

  def peft_name(module_path):
    try:
      return minilm.hf_module_name(module_path)
    except ValueError:
      return None

  head = params.pop("classifier")
  params = {**params, "head": head}  # the trainer's name for the head
  return Task(
    model=_RenamedHead(SentenceClassifier(bert_config, len(classes)), "classifier"),
    params=params, extra={}, head="head", classes=classes, unit="tokens",
    input_keys=("input_ids", "attention_mask"), encode=encode,
    apply_kwargs=lambda train: {"deterministic": not train},
    peft_module_name=peft_name, max_len=max_len,
    encode_inputs=lambda texts: dict(zip(("input_ids", "attention_mask"),
                                         minilm.tokenize([_text(t) for t in texts], max_len))),
    **splits,
  )


def _efficientnet_task(config, rng, classes=None) -> Task:
  from experiments.models import load_efficientnet_lite0

  if classes is None:
    splits, classes, image_key, label_key = _image_data(config)
  else:
    splits, image_key, label_key = _NO_DATA, "image", "label"
  model, variables = load_efficientnet_lite0(len(classes), head_rng=rng, verbose=False)
  size = config.data.image_size

  def encode(batch):
    images = np.asarray(batch[image_key])
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"expected (B, H, W, 1 or 3) images, got shape {images.shape}")
    return {"image": images.astype(np.uint8), "label": _labels(batch, label_key)}

  params = dict(variables["params"])
  params["head"] = params.pop("fc")
  extra = {k: v for k, v in variables.items() if k != "params"}
  return Task(
    model=_Resized(_RenamedHead(model, "fc"), size), params=params, extra=extra,
    head="head", classes=classes, unit="images", input_keys=("image",), encode=encode,
    # Inference mode throughout: BatchNorm keeps its pretrained statistics (frozen, like
    # the rest of the base) and there is no dropout.
    apply_kwargs=lambda train: {"train": False},
    encode_inputs=lambda images: {"image": np.asarray(images, np.uint8)},
    **splits,
  )


def _text(t) -> str:
  """TFDS ``Text`` features come back as bytes; CSV and JSONL text as str."""
  return t.decode("utf-8") if isinstance(t, bytes) else str(t)


def _labels(batch, key) -> np.ndarray:
  if key not in batch:
    raise KeyError(f"the data have no feature {key!r} (features: {sorted(batch)})")
  return np.asarray(batch[key]).astype(np.int32)


class _RenamedHead:
  """A Linen model whose head parameters live under ``head`` instead of ``name``.

  Keeps the trainer's trees uniform across models (``params["head"]``) without editing
  the model: the head is renamed back just before ``model.apply``.
  """

  def __init__(self, model, name: str):
    self.model, self.name = model, name

  def apply(self, variables, *args, **kwargs):
    return self.model.apply(self._rename(variables), *args, **kwargs)

  def _rename(self, variables):
    params = dict(variables["params"])
    params[self.name] = params.pop("head")
    return {**variables, "params": params}

  def adapted_apply(self, variables, adapters, *args, **kwargs):
    return sl_linen.apply(self.model, self._rename(variables), adapters, *args, **kwargs)

  def init_adapters(self, key, params, rules, *example_args, sds_on=False, **apply_kwargs):
    del apply_kwargs  # the layouts come from the module types, traced with the defaults
    renamed = self._rename({"params": params})["params"]
    adapters = sl_linen.init_adapters(key, self.model, renamed, rules, *example_args,
                                      sds_on=sds_on)
    if self.name in adapters:
      adapters["head"] = adapters.pop(self.name)
    return adapters


class _Resized:
  """EfficientNet on grayscale or small images: resize to ``size`` and repeat to RGB."""

  def __init__(self, model: _RenamedHead, size: int):
    self.model, self.size = model, size

  def _prepare(self, images):
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (self.size, self.size):
      x = jax.image.resize(x, (x.shape[0], self.size, self.size, 3), "bilinear")
    return x

  def apply(self, variables, images, **kwargs):
    return self.model.apply(variables, self._prepare(images), **kwargs)

  def adapted_apply(self, variables, adapters, images, **kwargs):
    return self.model.adapted_apply(variables, adapters, self._prepare(images), **kwargs)

  def init_adapters(self, key, params, rules, images, sds_on=False, **kwargs):
    return self.model.init_adapters(key, params, rules, self._prepare(images), sds_on=sds_on,
                                    **kwargs)


class _QuantizedBase:
  """A model whose frozen kernels are stored quantized (qwix ``QArray``; QLoRA).

  The model is not edited: its function dequantizes each stored kernel where the
  model reads it (``qwix.dequantize``), and the adapters are applied at the op level
  (``sdslora_jax.intercept``), which multiplies each quantized kernel block by block
  without forming it in floating point.
  """

  def __init__(self, model):
    self.model = model

  def _fn(self, variables):
    rest = {k: v for k, v in variables.items() if k != "params"}

    def fn(params, *args, **kwargs):
      return self.model.apply({**rest, "params": quantize.dequantized(params)}, *args,
                              **kwargs)
    return fn

  def apply(self, variables, *args, **kwargs):
    return self._fn(variables)(variables["params"], *args, **kwargs)

  def adapted_apply(self, variables, adapters, *args, **kwargs):
    return intercept.apply(self._fn(variables), variables["params"], adapters, *args, **kwargs)

  def init_adapters(self, key, params, rules, *example_args, sds_on=False, **kwargs):
    return intercept.init_adapters(key, self._fn({}), params, rules, *example_args,
                                   sds_on=sds_on, **kwargs)


_NO_DATA = {"train": None, "validation": None, "test": None}


def build_task(config, rng: jax.Array, classes: tuple[str, ...] | None = None) -> Task:
  """The task of ``config.model`` on ``config.data``; ``rng`` initialises the head.

  With ``classes``, the model alone (no data read): for prediction.
  """
  name = config.model.name
  if name not in MODELS:
    raise ValueError(f"config.model.name {name!r} is not one of {MODELS}")
  if config.data.source not in DATA_SOURCES:
    raise ValueError(f"config.data.source {config.data.source!r} is not one of {DATA_SOURCES}")
  build = _minilm_task if name == "minilm" else _efficientnet_task
  task = build(config, rng, classes)
  qtype = config.model.quantization
  if qtype not in quantize.QUANTIZATIONS:
    raise ValueError(f"config.model.quantization {qtype!r} is not one of "
                     f"{quantize.QUANTIZATIONS}")
  if qtype != "none":
    task = dataclasses.replace(
        task, model=_QuantizedBase(task.model),
        params=quantize.quantize_base(task.params, qtype, config.model.quantization_tile))
  if classes is not None:
    return task
  if task.train is None or not len(task.train):
    raise ValueError("config.data: the training split is empty")
  if task.validation is None:
    raise ValueError("config.data.eval_split: a validation split is needed")
  return task
