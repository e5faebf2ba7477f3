"""Export to / import from the Hugging Face PEFT LoRA format.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with, per adapted module ``<name>``:

* Linear: ``base_model.model.<name>.lora_A.weight`` ``(r, in)`` and
  ``.lora_B.weight`` ``(out, r)``; ``dW = scaling * B @ A`` with PEFT's
  ``(out, in)`` weight orientation, ``dW = dK.T``.
* Embedding: ``.lora_embedding_A`` ``(r, num_embeddings)`` and
  ``.lora_embedding_B`` ``(features, r)``; ``dE = scaling * (B @ A).T``.
* Conv (Flax ``nn.Conv`` / ``nnx.Conv``, ``feature_group_count=1``):
  ``.lora_A.weight`` ``(r, in, *kernel_size)`` and ``.lora_B.weight``
  ``(out, r, 1, ..., 1)``, as PEFT's Conv layers.

Grouped convolutions, ``ConvTranspose`` and ``ConvLocal`` kernels have no
equivalent PEFT LoRA layer here and raise ``NotImplementedError`` (merge them
into the base weights with ``tree.merge`` instead).

Kernels with more than two axes that are not convolutions are exported as
torch ``Linear`` layers over the flattened kernel: ``in`` is the product of the
input axes and ``out`` of the output axes, each flattened row-major in kernel
axis order (e.g. an attention query kernel ``(D, H, K)`` becomes a Linear with
``in = D``, ``out = H * K``, out index ``h * K + k``).

SDS-LoRA is exported as the exact rank-2r LoRA ``lora_B = [b.T, qb]``,
``lora_A = [qa.T; a.T]``; during its warm-up (``sds_on == 0``) as the plain
rank-r LoRA. The scaling is always written as ``lora_alpha / r`` (per module,
through ``rank_pattern`` / ``alpha_pattern``) with ``lora_alpha = s * r``, so
it is exact whether the adapter used ``alpha / r`` or rsLoRA. Tensors are
written in float32. Import reads LoRA adapters (also rsLoRA and per-module
patterns) back as ``method="lora"`` adapters.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdslora_jax.adapter import Adapter
from sdslora_jax.targets import KernelLayout, infer_layout, is_kernel, path_keys, path_str
from sdslora_jax.tree import _set, adapter_items

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_peft", "import_peft"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
}

ModuleNames = Mapping[str, str] | Callable[[str], str]


def _module_path(kernel_path: str) -> str:
  return kernel_path.rsplit("/", 1)[0] if "/" in kernel_path else ""


def _name_for(module_names: ModuleNames, kernel_path: str) -> str | None:
  mod = _module_path(kernel_path)
  if callable(module_names):
    name = module_names(mod)
    if name is None:
      return None
  elif kernel_path in module_names:
    name = module_names[kernel_path]
  elif mod in module_names:
    name = module_names[mod]
  else:
    raise KeyError(
        f"module_names has no entry for {kernel_path!r} (nor its module path {mod!r})"
    )
  if not isinstance(name, str) or not name:
    raise ValueError(f"module name for {kernel_path!r} must be a non-empty string, got {name!r}")
  return name


_UNEXPORTABLE = {
    "conv_grouped": "a grouped convolution (feature_group_count > 1)",
    "conv_transpose": "a ConvTranspose (its kernel orientation differs from torch's)",
    "conv_local": "a ConvLocal (unshared weights; torch has no such layer)",
}


def _kind(ad: Adapter) -> str:
  return ad.kind or "dense"


def _refuse(kind: str, kpath: str, shape: tuple[int, ...], verb: str) -> None:
  if kind in _UNEXPORTABLE:
    raise NotImplementedError(
        f"cannot {verb} the adapter at {kpath!r} (kernel shape {shape}): it is on "
        f"{_UNEXPORTABLE[kind]}, which has no PEFT LoRA equivalent; merge it into the base "
        "weights with sdslora_jax.tree.merge instead"
    )


def _lora_factors(ad: Adapter) -> tuple[np.ndarray, np.ndarray, float]:
  """``(left (d_in, R), right (R, d_out), scale)`` with ``delta = scale * left @ right``."""
  a = np.asarray(ad.a, np.float32)
  b = np.asarray(ad.b, np.float32)
  if ad.method == "lora" or float(np.asarray(ad.sds_on)) < 0.5:
    return a, b, ad.scale
  qa = np.asarray(ad.qa, np.float32)
  qb = np.asarray(ad.qb, np.float32)
  return np.concatenate([qa, a], axis=1), np.concatenate([b, qb.T], axis=0), ad.scale


def _to_torch(ad: Adapter, left: np.ndarray, right: np.ndarray, name: str):
  """PEFT tensors ``(A, B, key suffixes)`` for one module."""
  r = left.shape[1]
  kind = _kind(ad)
  if kind == "embed":
    return left.T, right.T, (".lora_embedding_A", ".lora_embedding_B")
  if kind == "conv":
    shape = ad.target_shape
    spatial, cin, cout = shape[:-2], shape[-2], shape[-1]
    if ad.input_axes != tuple(range(len(shape) - 1)):
      raise ValueError(f"{name}: a conv adapter must have all but the last kernel axis as input")
    a_t = left.T.reshape((r, *spatial, cin))
    a_t = np.moveaxis(a_t, -1, 1)  # (r, cin, *spatial)
    b_t = right.T.reshape((cout, r) + (1,) * len(spatial))
    return a_t, b_t, (".lora_A.weight", ".lora_B.weight")
  return left.T, right.T, (".lora_A.weight", ".lora_B.weight")


def export_peft(
    directory: str | os.PathLike,
    adapters: Any,
    *,
    module_names: ModuleNames,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> tuple[str, str]:
  """Writes an adapter tree as a PEFT LoRA adapter directory.

  Args:
    directory: output directory (created if missing).
    adapters: the adapter tree (Flax paths).
    module_names: Flax path -> torch module name (e.g.
      ``"encoder.layer.0.attention.self.query"``): a dict keyed by the kernel
      path (``".../query/kernel"``) or the module path (``".../query"``), or a
      callable taking the module path (returning ``None`` for a module it does
      not name; an error on export, skipped on import).
    base_model_name_or_path: written to the config.
    overwrite: replace existing files.

  Returns:
    The paths of the config and the weights file.

  Raises:
    FileExistsError: a file exists and ``overwrite`` is false.
    KeyError / ValueError: a module has no name, or two share one.
    NotImplementedError: an adapter is on a grouped, transposed or local
      convolution (checked before anything is written).
  """
  from safetensors.numpy import save_file

  directory = os.fspath(directory)
  cfg_path = os.path.join(directory, CONFIG_NAME)
  w_path = os.path.join(directory, WEIGHTS_NAME)
  if not overwrite:
    for p in (cfg_path, w_path):
      if os.path.exists(p):
        raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
  items = adapter_items(adapters)
  if not items:
    raise ValueError("no adapters to export")
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  owner: dict[str, str] = {}
  for keys, ad in items:
    kpath = path_str(keys)
    name = _name_for(module_names, kpath)
    if name is None:
      raise KeyError(f"module_names gives no module name for {kpath!r}")
    if name in owner:
      raise ValueError(f"module name {name!r} is given to both {owner[name]!r} and {kpath!r}")
    owner[name] = kpath
    _refuse(_kind(ad), kpath, ad.target_shape, "export")
    left, right, scale = _lora_factors(ad)
    a_t, b_t, (sa, sb) = _to_torch(ad, left, right, name)
    tensors[f"{_PREFIX}{name}{sa}"] = np.ascontiguousarray(a_t, np.float32)
    tensors[f"{_PREFIX}{name}{sb}"] = np.ascontiguousarray(b_t, np.float32)
    ranks[name] = int(left.shape[1])
    alphas[name] = float(scale * left.shape[1])
  r_common = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha_common = collections.Counter(alphas.values()).most_common(1)[0][0]
  config = {
      "peft_type": "LORA",
      "task_type": None,
      "base_model_name_or_path": base_model_name_or_path,
      "inference_mode": True,
      "r": r_common,
      "lora_alpha": alpha_common,
      "lora_dropout": 0.0,
      "use_rslora": False,
      "use_dora": False,
      "fan_in_fan_out": False,
      "bias": "none",
      "init_lora_weights": True,
      "target_modules": sorted(ranks),
      "rank_pattern": {n: r for n, r in ranks.items() if r != r_common},
      "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha_common},
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
  }
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, w_path, metadata={"format": "pt"})
  with open(cfg_path, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return cfg_path, w_path


def _read(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  from safetensors.numpy import load_file

  cfg_path = os.path.join(directory, CONFIG_NAME)
  w_path = os.path.join(directory, WEIGHTS_NAME)
  for p in (cfg_path, w_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"PEFT adapter file {p} is missing")
  try:
    with open(cfg_path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, only 'LORA' is read")
  if config.get("use_dora"):
    raise NotImplementedError(f"{cfg_path}: DoRA adapters (use_dora=true) are not supported")
  for field in ("r", "lora_alpha"):
    if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
      raise ValueError(
          f"{cfg_path}: {field!r} must be a positive number, got {config.get(field)!r}"
      )
  try:
    tensors = load_file(w_path)
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise ValueError(f"{w_path} is not a readable safetensors file: {e}") from e
  return config, tensors


def _pattern(patterns: Mapping[str, Any] | None, name: str, default):
  patterns = patterns or {}
  if name in patterns:
    return patterns[name]
  for key, value in patterns.items():
    if re.fullmatch(rf"(.*\.)?{key}", name):
      return value
  return default


def _exact_truncate(left: np.ndarray, right: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Re-factors ``left @ right`` (rank <= k) exactly with inner dimension ``k``."""
  q1, r1 = np.linalg.qr(left.astype(np.float64))
  q2, r2 = np.linalg.qr(right.T.astype(np.float64))
  u, s, vt = np.linalg.svd(r1 @ r2.T)
  root = np.sqrt(s[:k])
  return (q1 @ u[:, :k] * root), (root[:, None] * vt[:k] @ q2.T)


def import_peft(
    directory: str | os.PathLike,
    params: Any,
    *,
    module_names: ModuleNames,
    layouts: Mapping[str, KernelLayout] | None = None,
    dtype: Any = jnp.float32,
) -> dict:
  """Reads a PEFT LoRA adapter as a tree of ``method="lora"`` adapters.

  Args:
    directory: the adapter directory.
    params: the base parameter tree the adapter is for (arrays or
      ``jax.ShapeDtypeStruct``); gives paths, kernel shapes and layouts.
    module_names: as for ``export_peft`` (a dict is inverted; a callable is
      applied to every kernel's module path).
    layouts: kernel layouts by path for kernels the shape heuristic cannot
      decide (e.g. from ``sdslora_jax.linen.module_layouts``).
    dtype: dtype of the factors.

  Returns:
    The adapter tree mirroring ``params``. A module whose rank exceeds
    ``min(d_in, d_out)`` (an exported SDS-LoRA on a small kernel) is
    re-factored exactly to rank ``min(d_in, d_out)``.

  Raises:
    FileNotFoundError, ValueError: missing, corrupt or mismatching files, with
      the offending file, key or module named.
    NotImplementedError: ``layouts`` marks a targeted kernel as a grouped,
      transposed or local convolution.
  """
  directory = os.fspath(directory)
  config, tensors = _read(directory)
  layouts = dict(layouts or {})
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  kernels = {path_str(kp): (kp, leaf) for kp, leaf in flat if is_kernel(path_str(kp), leaf)}
  by_name: dict[str, str] = {}
  for kpath in kernels:
    try:
      name = _name_for(module_names, kpath)
    except KeyError:
      continue
    if name is None:
      continue
    if name in by_name:
      raise ValueError(f"module name {name!r} is given to both {by_name[name]!r} and {kpath!r}")
    by_name[name] = kpath
  if isinstance(module_names, Mapping):
    unknown = [k for k in module_names if k not in kernels and not any(
        _module_path(p) == k for p in kernels)]
    if unknown:
      raise ValueError(f"module_names keys {unknown} name no kernel of the parameter tree")
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
    if not key.startswith(_PREFIX) or suffix is None:
      raise ValueError(
          f"unexpected tensor {key!r} in {WEIGHTS_NAME} (expected "
          f"'{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')"
      )
    name = key[len(_PREFIX) : -len(suffix)]
    groups.setdefault(name, {})[_SUFFIXES[suffix]] = value
  use_rslora = bool(config.get("use_rslora", False))
  tree: dict = {}
  for name, pair in groups.items():
    if set(pair) != {"A", "B"}:
      missing = {"A", "B"} - set(pair)
      raise ValueError(f"module {name!r}: lora_{'/'.join(sorted(missing))} is missing")
    if name not in by_name:
      raise ValueError(
          f"module {name!r} in the adapter has no Flax kernel under module_names; known names: "
          f"{sorted(by_name)[:8]}"
      )
    kpath = by_name[name]
    kp, leaf = kernels[kpath]
    a_t = np.asarray(pair["A"], np.float32)
    b_t = np.asarray(pair["B"], np.float32)
    r = a_t.shape[0]
    if b_t.ndim < 2 or b_t.shape[1] != r:
      raise ValueError(f"module {name!r}: lora_A {a_t.shape} and lora_B {b_t.shape} ranks differ")
    r_cfg = int(_pattern(config.get("rank_pattern"), name, config["r"]))
    if r_cfg != r:
      raise ValueError(f"module {name!r}: tensors have rank {r} but the config says r={r_cfg}")
    alpha = float(_pattern(config.get("alpha_pattern"), name, config["lora_alpha"]))
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    shape = tuple(leaf.shape)
    if kpath in layouts:
      _refuse(layouts[kpath].kind, kpath, shape, "import")
    if a_t.ndim > 2:  # convolution: A (r, cin, *k), B (cout, r, 1...)
      layout = KernelLayout(shape, tuple(range(len(shape) - 1)), "conv")
      want_a = (r, shape[-2], *shape[:-2])
      if a_t.shape != want_a or b_t.shape != (shape[-1], r) + (1,) * (len(shape) - 2):
        raise ValueError(
            f"module {name!r}: conv lora_A {a_t.shape} / lora_B {b_t.shape} do not fit the "
            f"kernel {kpath!r} of shape {shape} (want lora_A {want_a})"
        )
      left = np.moveaxis(a_t, 1, -1).reshape(r, -1).T
      right = b_t.reshape(shape[-1], r).T
    else:
      layout = layouts.get(kpath) or infer_layout(kpath, shape)
      if a_t.shape != (r, layout.d_in) or b_t.shape != (layout.d_out, r):
        raise ValueError(
            f"module {name!r}: lora_A {a_t.shape} / lora_B {b_t.shape} do not fit the kernel "
            f"{kpath!r} of shape {shape} seen as (d_in={layout.d_in}, d_out={layout.d_out}) "
            f"with input axes {layout.in_axes}"
        )
      left, right = a_t.T, b_t.T
    k = min(layout.d_in, layout.d_out)
    if r > k:
      left, right = _exact_truncate(left, right, k)
    ad = Adapter(
        a=jnp.asarray(left, dtype),
        b=jnp.asarray(right, dtype),
        method="lora",
        scale=scale,
        kernel_shape=layout.shape,
        in_axes=layout.in_axes,
        kind=layout.kind,
    )
    _set(tree, path_keys(kp), ad)
  return tree
