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
through ``rank_pattern`` / ``alpha_pattern``, keyed by module name, or by
anchored escaped regexes where PEFT would match a plain name to another module)
with ``lora_alpha = s * r``, so it is exact whether the adapter used
``alpha / r`` or rsLoRA. Tensors are written in float32; NaN or inf in an
adapter is refused.

Import reads LoRA adapters (also rsLoRA and per-module patterns) back as
``method="lora"`` adapters; a module's ``rank_pattern`` / ``alpha_pattern``
entry is chosen as PEFT chooses it: the first key, in the file's order, whose
regex matches the end of the module name at a ``.`` boundary. (PEFT writes its
configs with sorted keys, so that order is the sorted one for its own files.)

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

from sdslora_jax import quantized
from sdslora_jax.adapter import Adapter, take_layer
from sdslora_jax.targets import (
    KernelLayout,
    infer_layout,
    is_kernel,
    path_keys,
    path_str,
    stacked_layout,
)
from sdslora_jax.tree import _set, adapter_items

__all__ = ["export_peft", "import_peft"]

def _safetensors():
  """``safetensors.numpy``, or an ImportError that names the extra to install."""
  try:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("PEFT export and import need safetensors: pip install "
                      "'sdslora-jax[export]' (the [flax] extra includes it)") from e
  return safetensors.numpy


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


def _name_for(module_names: ModuleNames, kernel_path: str, layer: Any = None) -> str | None:
  """The torch module name of a kernel (of one layer of a stacked kernel)."""
  mod = _module_path(kernel_path)
  if callable(module_names):
    name = module_names(mod) if layer is None else module_names(mod, layer)
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
  if isinstance(name, (list, tuple)):  # a fused kernel: one module per part of its output
    if not name:
      raise ValueError(f"module names for {kernel_path!r} must not be an empty sequence")
    return tuple(_format_one(n, kernel_path, layer, callable(module_names)) for n in name)
  return _format_one(name, kernel_path, layer, callable(module_names))


def _format_one(name: Any, kernel_path: str, layer: Any, from_callable: bool) -> str:
  if layer is not None and not from_callable:
    if not isinstance(name, str) or "{layer}" not in name:
      raise ValueError(
          f"{kernel_path!r} is a stacked kernel (one PEFT module per layer): its module_names "
          f"entry must contain '{{layer}}' (e.g. 'model.layers.{{layer}}.mlp.up_proj'), got "
          f"{name!r}"
      )
    name = name.format(layer=layer if isinstance(layer, int) else ".".join(map(str, layer)))
  if not isinstance(name, str) or not name:
    raise ValueError(f"module name for {kernel_path!r} must be a non-empty string, got {name!r}")
  return name


def _fused_rows(ad: Adapter, names: tuple[str, ...], kpath: str) -> int:
  """Rows of ``lora_B`` per module of a fused kernel (``ad``: one layer's adapter).

  The output side is flattened in kernel order, so the first output axis (size
  ``len(names)``: Gemma's ``kv_einsum`` ``(2, K, D, H)``, ``gating_einsum``
  ``(2, D, F)``) is the slowest: part ``i`` is a contiguous block of rows. Each
  module gets the shared ``lora_A`` and its block of ``lora_B``, so their
  updates are exactly the fused update's parts.
  """
  shape, out_axes = ad.kernel_shape, ad.output_axes
  if _kind(ad) != "dense" or not out_axes or shape[out_axes[0]] != len(names):
    first = shape[out_axes[0]] if out_axes else None
    raise ValueError(
        f"{kpath!r} is given {len(names)} module names {list(names)}: a fused kernel is split "
        f"along its first output axis, which here has size {first} (kernel shape {shape}, "
        f"output axes {out_axes}); give one name, or as many as that axis has entries")
  return ad.shape[1] // len(names)


def _layers(ad_or_layout) -> list[Any]:
  """The layer indices of a stacked adapter or layout (ints for one layer axis), or ``[None]``."""
  shape = ad_or_layout.layer_shape
  if not shape:
    return [None]
  return [idx[0] if len(shape) == 1 else idx for idx in np.ndindex(*shape)]


_UNEXPORTABLE = {
    "conv_grouped": "a grouped convolution (feature_group_count > 1)",
    "conv_transpose": "a ConvTranspose (its kernel orientation differs from torch's)",
    "conv_local": "a ConvLocal (unshared weights; torch has no such layer)",
}


def _kind(ad: Adapter) -> str:
  return ad.kind


def _refuse(kind: str, kpath: str, shape: tuple[int, ...], verb: str) -> None:
  if kind in _UNEXPORTABLE:
    raise NotImplementedError(
        f"cannot {verb} the adapter at {kpath!r} (kernel shape {shape}): it is on "
        f"{_UNEXPORTABLE[kind]}, which has no PEFT LoRA equivalent; merge it into the base "
        "weights with sdslora_jax.tree.merge instead"
    )


def _check_finite(ad: Adapter, kpath: str) -> None:
  """Raises if a factor, basis or the scale of ``ad`` holds NaN or inf."""
  if not math.isfinite(ad.scale):
    raise ValueError(f"cannot export the adapter at {kpath!r}: its scale is {ad.scale}")
  for field in ("a", "b", "qa", "qb"):
    value = getattr(ad, field)
    if value is not None and not np.isfinite(np.asarray(value, np.float32)).all():
      raise ValueError(
          f"cannot export the adapter at {kpath!r}: {field} holds non-finite values (NaN or inf)"
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
    shape = ad.kernel_shape
    spatial, cin, cout = shape[:-2], shape[-2], shape[-1]
    if ad.in_axes != tuple(range(len(shape) - 1)):
      raise ValueError(f"{name}: a conv adapter must have all but the last kernel axis as input")
    a_t = left.T.reshape((r, *spatial, cin))
    a_t = np.moveaxis(a_t, -1, 1)  # (r, cin, *spatial)
    b_t = right.T.reshape((cout, r) + (1,) * len(spatial))
    return a_t, b_t, (".lora_A.weight", ".lora_B.weight")
  return left.T, right.T, (".lora_A.weight", ".lora_B.weight")


def _patterns_for(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
  r"""A pattern dict giving every module its value under PEFT's matching.

  Keys are the plain module names, unless PEFT would then misread one (a name
  that ends another at a ``.``, or a ``.`` wildcard hitting another name, in the
  sorted order the config is written in); then they are anchored, escaped regexes
  (``^encoder\.layer\.0\.query``) that match only their own module.
  """
  plain = {n: v for n, v in sorted(values.items()) if v != default}
  if all(_pattern(plain, n, default) == v for n, v in values.items()):
    return plain
  return {f"^{re.escape(n)}": v for n, v in plain.items()}


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
      not name; an error on export, skipped on import). A stacked adapter
      (scanned layers) becomes one PEFT module per layer: the callable is
      called as ``module_names(module_path, layer)`` (``layer`` an int, a
      tuple for several layer axes), and a dict value must contain
      ``"{layer}"``, e.g. ``"model.layers.{layer}.self_attn.q_proj"``. A
      fused kernel (Gemma's ``kv_einsum``, ``gating_einsum``) gets a list of
      names, one per entry of its first output axis (``["...k_proj",
      "...v_proj"]``): the modules share ``lora_A`` and split ``lora_B``'s rows,
      exactly.
    base_model_name_or_path: written to the config.
    overwrite: replace existing files.

  Returns:
    The paths of the config and the weights file.

  Raises:
    FileExistsError: a file exists and ``overwrite`` is false.
    KeyError / ValueError: a module has no name, or two share one.
    ValueError: a factor, basis or scale holds NaN or inf.
    NotImplementedError: an adapter is on a grouped, transposed or local
      convolution.
    All of these are checked before anything is written.
  """
  save_file = _safetensors().save_file

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
  per_module = []
  for keys, stacked in items:
    kpath = path_str(keys)
    _refuse(_kind(stacked), kpath, stacked.kernel_shape, "export")
    _check_finite(stacked, kpath)
    for layer in _layers(stacked):
      ad = stacked if layer is None else take_layer(stacked, layer)
      name = _name_for(module_names, kpath, layer)
      if name is None:
        raise KeyError(f"module_names gives no module name for {kpath!r}"
                       + ("" if layer is None else f" layer {layer}"))
      where = kpath if layer is None else f"{kpath} (layer {layer})"
      for n in (name if isinstance(name, tuple) else (name,)):
        if n in owner:
          raise ValueError(f"module name {n!r} is given to both {owner[n]!r} and {where!r}")
        owner[n] = where
      rows = _fused_rows(ad, name, kpath) if isinstance(name, tuple) else None
      per_module.append((name, ad, rows))
  for name, ad, rows in per_module:
    left, right, scale = _lora_factors(ad)
    a_t, b_t, (sa, sb) = _to_torch(ad, left, right, str(name))
    parts = ([(n, a_t, b_t[i * rows:(i + 1) * rows]) for i, n in enumerate(name)]
             if rows is not None else [(name, a_t, b_t)])
    for n, a_n, b_n in parts:
      tensors[f"{_PREFIX}{n}{sa}"] = np.ascontiguousarray(a_n, np.float32)
      tensors[f"{_PREFIX}{n}{sb}"] = np.ascontiguousarray(b_n, np.float32)
      ranks[n] = int(left.shape[1])
      alphas[n] = float(scale * left.shape[1])
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
      "rank_pattern": _patterns_for(ranks, r_common),
      "alpha_pattern": _patterns_for(alphas, alpha_common),
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
  }
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, w_path, metadata={"format": "pt"})
  with open(cfg_path, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return cfg_path, w_path


def _check_positive(cfg_path: str, field: str, value: Any) -> None:
  """Raises unless ``value`` is a finite positive JSON number (not a bool)."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not ok or not math.isfinite(value) or value <= 0:
    raise ValueError(f"{cfg_path}: {field} must be a finite positive number, got {value!r}")


def _read(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  load_file = _safetensors().load_file

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
    _check_positive(cfg_path, repr(field), config.get(field))
  for field in ("rank_pattern", "alpha_pattern"):
    patterns = config.get(field)
    if patterns is None:
      continue
    if not isinstance(patterns, dict):
      raise ValueError(
          f"{cfg_path}: {field!r} must be a JSON object, got {type(patterns).__name__}"
      )
    for key, value in patterns.items():
      _check_positive(cfg_path, f"{field}[{key!r}]", value)
      try:
        re.compile(key)
      except re.error as e:
        raise ValueError(f"{cfg_path}: {field} key {key!r} is not a valid regex: {e}") from e
      if _nested_repeat(key):
        raise ValueError(
            f"{cfg_path}: {field} key {key!r} repeats a group that itself repeats or "
            "alternates, which can take exponential time to match; PEFT matches a key as "
            "re.match(rf'(.*\\.)?({key})$', module_name): use a module name or its suffix "
            "(e.g. 'q_proj', 'layers.0.self_attn.q_proj')")
  try:
    tensors = load_file(w_path)
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise ValueError(f"{w_path} is not a readable safetensors file: {e}") from e
  return config, tensors


def _nested_repeat(key: str) -> bool:
  """Whether a regex repeats a group containing a repeat or an alternation (the shapes
  that backtrack exponentially, e.g. ``(\\w|.)*Q``, ``(a+)+``). Reads the pattern's parse
  tree (``re._parser``: stdlib, but private; tested in tests/test_peft.py)."""
  from re import _parser  # noqa: PLC0415

  repeats = (_parser.MAX_REPEAT, _parser.MIN_REPEAT, getattr(_parser, "POSSESSIVE_REPEAT", None))

  def walk(items, inside: bool) -> bool:
    for op, arg in items:
      if op in repeats:
        _, hi, sub = arg
        if inside or (hi > 1 and walk(sub, True)):
          return True
      elif op == _parser.BRANCH:
        if inside or any(walk(b, inside) for b in arg[1]):
          return True
      elif op == _parser.SUBPATTERN:
        if walk(arg[-1], inside):
          return True
      elif op in (_parser.ASSERT, _parser.ASSERT_NOT):
        if walk(arg[1], inside):
          return True
    return False

  return walk(_parser.parse(key), False)


def _pattern(patterns: Mapping[str, Any] | None, name: str, default):
  r"""The ``rank_pattern`` / ``alpha_pattern`` value for module ``name``, as PEFT picks it.

  Mirrors ``peft.utils.other.get_pattern_key`` (PEFT 0.21.2) and its use in
  ``LoraModel._create_and_replace``: the first key, in the mapping's order, with
  ``re.match(rf"(.*\.)?({key})$", name)`` wins (an exact name gets no priority);
  with none, ``patterns.get(name, default)``.
  """
  patterns = patterns or {}
  for key in patterns:
    if re.match(rf"(.*\.)?({key})$", name):
      return patterns[key]
  return patterns.get(name, default)


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
      ``jax.ShapeDtypeStruct``; quantized kernels count at their own path and
      logical shape); gives paths, kernel shapes and layouts.
    module_names: as for ``export_peft`` (a dict is inverted; a callable is
      applied to every kernel's module path).
    layouts: kernel layouts by path for kernels the shape heuristic cannot
      decide (e.g. from ``sdslora_jax.linen.module_layouts``). A layout whose
      shape is a trailing part of its kernel's shape marks a stacked kernel:
      its layers' PEFT modules (named as for ``export_peft``) are read into
      one stacked adapter; layers absent from the file get a zero update.
    dtype: dtype of the factors.

  Returns:
    The adapter tree mirroring ``params``. A module whose rank exceeds
    ``min(d_in, d_out)`` (an exported SDS-LoRA on a small kernel) is
    re-factored exactly to rank ``min(d_in, d_out)``.

  Raises:
    FileNotFoundError, ValueError: missing, corrupt or mismatching files, or a
      non-finite or non-positive ``r``, ``lora_alpha`` or pattern value, with
      the offending file, field, key or module named.
    NotImplementedError: ``layouts`` marks a targeted kernel as a grouped,
      transposed or local convolution.
  """
  directory = os.fspath(directory)
  config, tensors = _read(directory)
  layouts = dict(layouts or {})
  flat, _ = jax.tree_util.tree_flatten_with_path(quantized.logical(params))
  kernels = {path_str(kp): (kp, leaf) for kp, leaf in flat if is_kernel(path_str(kp), leaf)}
  # Stacked kernels: a given layout whose shape is a trailing part of the kernel's.
  for kpath, (_, leaf) in kernels.items():
    lay = layouts.get(kpath)
    shape = tuple(leaf.shape)
    if lay is not None and lay.shape != shape:
      n = len(shape) - len(lay.shape)
      if n <= 0 or shape[n:] != lay.shape:
        raise ValueError(f"layouts[{kpath!r}] has shape {lay.shape}, the kernel {shape}")
      layouts[kpath] = stacked_layout(lay, shape[:n])
  by_name: dict[str, tuple[str, Any]] = {}
  for kpath in kernels:
    lay = layouts.get(kpath)
    for layer in ([None] if lay is None else _layers(lay)):
      try:
        name = _name_for(module_names, kpath, layer)
      except KeyError:
        continue
      if name is None:
        continue
      if name in by_name:
        raise ValueError(
            f"module name {name!r} is given to both {by_name[name][0]!r} and {kpath!r}")
      by_name[name] = (kpath, layer)
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
  stacked: dict[str, dict[Any, tuple]] = {}
  for name, pair in groups.items():
    if set(pair) != {"A", "B"}:
      missing = {"A", "B"} - set(pair)
      raise ValueError(f"module {name!r}: lora_{'/'.join(sorted(missing))} is missing")
    if name not in by_name:
      raise ValueError(
          f"module {name!r} in the adapter has no Flax kernel under module_names; known names: "
          f"{sorted(by_name)[:8]}"
      )
    kpath, layer = by_name[name]
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
    full_layout = layouts.get(kpath)
    if layer is not None:  # one layer of a stacked kernel: read it as that layer's kernel
      shape = shape[len(full_layout.layer_axes):]
      layouts_one = KernelLayout(shape, tuple(i - len(full_layout.layer_axes)
                                               for i in full_layout.in_axes), full_layout.kind)
    else:
      layouts_one = full_layout
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
      layout = layouts_one or infer_layout(kpath, shape)
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
    if layer is not None:
      stacked.setdefault(kpath, {})[layer] = (left, right, scale)
      continue
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
  for kpath, per_layer in stacked.items():
    _set(tree, path_keys(kernels[kpath][0]), _stack_layers(kpath, layouts[kpath], per_layer, dtype))
  return tree


def _stack_layers(kpath: str, layout: KernelLayout, per_layer: dict, dtype: Any) -> Adapter:
  """One stacked adapter from the layers' PEFT modules; absent layers get a zero update."""
  ranks = {left.shape[1] for left, _, _ in per_layer.values()}
  scales = {scale for _, _, scale in per_layer.values()}
  if len(ranks) != 1 or len(scales) != 1:
    raise ValueError(
        f"the layers of the stacked kernel {kpath!r} have different ranks {sorted(ranks)} or "
        f"scales {sorted(scales)}; a stacked adapter has one rank and one scale"
    )
  r = ranks.pop()
  d_in, d_out = layout.d_in, layout.d_out
  lefts, rights = [], []
  for layer in _layers(layout):
    left, right, _ = per_layer.get(layer, (np.zeros((d_in, r)), np.zeros((r, d_out)), None))
    lefts.append(left)
    rights.append(right)
  shape = layout.layer_shape
  return Adapter(
      a=jnp.asarray(np.stack(lefts).reshape(shape + (d_in, r)), dtype),
      b=jnp.asarray(np.stack(rights).reshape(shape + (r, d_out)), dtype),
      method="lora",
      scale=scales.pop(),
      kernel_shape=layout.shape,
      in_axes=layout.in_axes,
      kind=layout.kind,
      layer_axes=layout.layer_axes,
  )
