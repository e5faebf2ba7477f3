"""Adapter checkpoints with Orbax that keep what the arrays alone do not say.

An ``Adapter``'s ``method``, ``scale``, ``kernel_shape``, ``in_axes`` and
``kind`` are static pytree metadata, so Orbax stores only its arrays: a plain
restore into a target built with other rules (``alpha`` 8 vs 16, rsLoRA on or
off, ``"sds"`` vs ``"lora"``) would succeed and silently change the model, and a
restore without a target would give dicts, not adapters. This module stores a
JSON description of every ``Adapter`` node next to the arrays and uses it:

* with a target, the stored description is checked against the target's
  adapters *before* any array is read; a difference (method, scale, rank,
  kernel shape, input axes, kind, which fields are set, shapes, a missing or
  extra adapter or leaf) is a ``ValueError`` naming the path and the field.
  Arrays come back with the target's dtypes and shardings (concrete arrays or
  ``jax.ShapeDtypeStruct`` with ``sharding``);
* without a target, the whole tree is rebuilt from the description, with real
  ``Adapter`` nodes (``None`` fields kept), ready for ``tree.merge``,
  ``linen.apply`` or ``nnx.attach``; arrays land on the default device.

Any pytree holding ``Adapter`` nodes can be saved: an adapter tree, an optimizer
state (``sds_lora``'s inner states hold ``Adapter`` nodes too), a dict of both,
an NNX ``State``. Without a target, dicts, lists and tuples are rebuilt as such;
named tuples as their own class when it comes from ``optax``, ``flax``, ``chex``
or ``sdslora_jax`` (so an ``sds_lora(optax.adamw(...))`` state comes back with
the structure ``tx.init`` gives), else as a named tuple of the same name and
fields; NNX ``State`` and ``Variable`` nodes as such (Flax and sdslora_jax
variable types only); other pytree nodes as dicts keyed by their children's
names (pass a target for those). Python numbers are kept exactly in the metadata
(a target's array leaf gets the number as an array). Every array's SHA-256 is
stored and checked on restore (when the array is fully addressable and keeps its
dtype), so damaged array files are an error, not silently wrong values.

Layout: a checkpoint is an Orbax composite checkpoint with the items
``adapter_arrays`` (``StandardSave`` of the arrays as nested dicts),
``adapter_metadata`` (JSON) and, optionally, ``adapter_extra`` (the caller's
JSON, e.g. the rules). ``save_adapters`` writes one to a directory;
``save_args`` gives the same items for an ``ocp.CheckpointManager`` step, so
``restore_adapters`` also reads a manager's step directory.

Flax NNX. Save ``nnx.state(model, AdapterVariable)`` and restore with the
adapted model's state as target; the result is an ``nnx.State`` for
``nnx.update``::

  save_adapters(path, nnx.state(model, AdapterVariable))
  model = sdslora_jax.nnx.adapt(make_model(), rules, key=key)  # same rules
  nnx.update(model, restore_adapters(path, nnx.state(model, AdapterVariable)))

Or save ``sdslora_jax.nnx.adapters(model)`` (keyed by kernel paths) and attach
the restored tree to a fresh, unadapted model: ``attach(make_model(),
restore_adapters(path))``; no rules are needed to rebuild the adapters.

Training loops with a ``CheckpointManager``::

  mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  mngr.save(step, args=save_args({"adapters": adapters, "opt_state": opt_state}))
  ...
  target = {"adapters": abstract_adapters, "opt_state": jax.eval_shape(tx.init, abstract_adapters)}
  state = restore_from_manager(mngr, target)  # latest step

Other items can share the step: ``ocp.args.Composite(**save_args(tree),
data=...)``; a manager made with ``item_names`` must include ``ITEM_NAMES``.
The extra JSON of a step is
``mngr.restore(step, args=ocp.args.Composite(adapter_extra=ocp.args.JsonRestore()))``.

``save_adapters`` and ``restore_adapters`` work on local paths in a single
process; for multi-process training or remote storage, use a
``CheckpointManager`` with ``save_args`` / ``restore_from_manager``.

``orbax-checkpoint`` is an optional dependency (the ``checkpoint`` extra);
``adapter_metadata`` does not need it.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import importlib
import json
import pathlib
import shutil
import sys
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sdslora_jax.adapter import Adapter
from sdslora_jax.targets import path_keys, path_str

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ITEM_NAMES",
    "adapter_metadata",
    "read_extra",
    "read_metadata",
    "restore_adapters",
    "restore_from_manager",
    "save_adapters",
    "save_args",
]

FORMAT = "sdslora_jax.adapters"
FORMAT_VERSION = 1
ARRAYS = "adapter_arrays"
METADATA = "adapter_metadata"
EXTRA = "adapter_extra"
ITEM_NAMES = (ARRAYS, METADATA, EXTRA)
_JSON_FILE = "metadata"  # the file name Orbax's JsonCheckpointHandler writes
_META = ("method", "scale", "kernel_shape", "in_axes", "kind")  # compared with their defaults
_TRUSTED = ("optax", "flax", "chex", "sdslora_jax")  # packages classes are rebuilt from


def _ocp():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sdslora_jax.checkpoint needs orbax-checkpoint: pip install 'sdslora-jax[checkpoint]'"
    ) from e
  return ocp


def _nnx():
  """``flax.nnx`` if it has been imported (NNX nodes can only exist then), else ``None``."""
  return sys.modules.get("flax.nnx")


# ------------------------------------------------------------------------------------------------
# Walking a tree.


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_scalar(x: Any) -> bool:
  """A Python number leaf (stored in the metadata, not as an array)."""
  return isinstance(x, (bool, int, float)) and not _is_array(x)


def _dtype_name(x: Any) -> str:
  return np.dtype(x.dtype).name


def _class_name(cls: type) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _children(node: Any) -> list[tuple[Any, Any]]:
  """``[(plain key, child)]`` one level down (``None`` children kept)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
  return [(path_keys(kp)[0], child) for kp, child in flat]


def _field_entry(v: Any) -> dict | None:
  if v is None:
    return None
  if _is_array(v):
    return {"shape": [int(d) for d in v.shape], "dtype": _dtype_name(v)}
  return {"node": type(v).__name__}  # e.g. optax.MaskedNode in a masked optimizer state


def _data_fields(ad: Adapter) -> list[tuple[str, Any]]:
  """``[(name, value)]`` of an adapter's data fields, in flattening order (``None`` kept)."""
  return _children(ad)


def _meta_value(v: Any) -> Any:
  if isinstance(v, (tuple, list)):
    return [_meta_value(x) for x in v]
  if isinstance(v, (bool, int, float, str)) or v is None:
    return v
  raise TypeError(f"static adapter field value {v!r} is not JSON-serialisable")


def _adapter_entry(ad: Adapter) -> dict:
  data = _data_fields(ad)
  fields = {f: _field_entry(v) for f, v in data}
  if _is_array(ad.a):
    rank = int(ad.a.shape[-1])
  elif _is_array(ad.b):
    rank = int(ad.b.shape[0])
  else:
    rank = None
  names = {f for f, _ in data}
  entry = {"method": ad.method, "scale": float(ad.scale), "rank": rank}
  for f in dataclasses.fields(ad):  # the static fields: kernel_shape, in_axes, kind, ...
    if f.name not in names and f.name not in entry:
      entry[f.name] = _meta_value(getattr(ad, f.name))
  entry["fields"] = fields
  return entry


@dataclasses.dataclass
class _Walk:
  """What one pass over a tree finds: the structure, the adapters and the leaves."""

  adapters: dict = dataclasses.field(default_factory=dict)  # path string -> entry
  leaves: list = dataclasses.field(default_factory=list)  # (keys, leaf) in flattening order
  hashes: bool = False

  def node(self, x: Any, keys: tuple) -> dict:
    if x is None:
      return {"t": "none"}
    if isinstance(x, Adapter):
      path = path_str(keys)
      if path in self.adapters:
        raise ValueError(f"two adapters have the same path {path!r}; use distinct keys")
      self.adapters[path] = _adapter_entry(x)
      data = _data_fields(x)
      return {
          "t": "adapter",
          "fields": [f for f, _ in data],
          "children": [self.node(v, keys + (f,)) for f, v in data],
      }
    nnx = _nnx()
    if nnx is not None and isinstance(x, nnx.Variable):
      return {
          "t": "variable",
          "class": _class_name(type(x)),
          "children": [self.node(x.get_value(), keys + ("value",))],
      }
    if nnx is not None and isinstance(x, nnx.State):
      return self._mapping("state", x, keys)
    if isinstance(x, dict):
      return self._mapping("dict", x, keys)
    if isinstance(x, tuple) and hasattr(type(x), "_fields"):
      return {
          "t": "namedtuple",
          "class": _class_name(type(x)),
          "fields": list(type(x)._fields),
          "children": [self.node(c, keys + (f,)) for f, c in zip(type(x)._fields, x)],
      }
    if isinstance(x, (list, tuple)):
      t = "list" if isinstance(x, list) else "tuple"
      return {"t": t, "children": [self.node(c, keys + (i,)) for i, c in enumerate(x)]}
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x)):
      return self._leaf(x, keys)
    kids = _children(x)
    return {
        "t": "node",
        "class": _class_name(type(x)),
        "keys": [self._key(k, keys) for k, _ in kids],
        "children": [self.node(c, keys + (k,)) for k, c in kids],
    }

  def _key(self, k: Any, keys: tuple) -> Any:
    if isinstance(k, bool) or not isinstance(k, (str, int)):
      raise TypeError(
          f"key {k!r} under {path_str(keys) or '<root>'!r} is neither a str nor an int; "
          "adapter checkpoints need str or int keys"
      )
    return k

  def _mapping(self, t: str, x: Any, keys: tuple) -> dict:
    kids = _children(x)
    return {
        "t": t,
        "keys": [self._key(k, keys) for k, _ in kids],
        "children": [self.node(c, keys + (k,)) for k, c in kids],
    }

  def _leaf(self, x: Any, keys: tuple) -> dict:
    where = path_str(keys) or "<root>"
    self.leaves.append((keys, x))
    if _is_scalar(x):
      return {"t": "scalar", "value": x}  # kept exactly, in the JSON
    if not _is_array(x):
      raise TypeError(
          f"leaf at {where!r} is a {type(x).__name__}, not an array or a Python number; "
          "adapter checkpoints hold arrays only"
      )
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      raise TypeError(
          f"leaf at {where!r} is a PRNG key array; store jax.random.key_data(key) instead"
      )
    entry = {"t": "array", "shape": [int(d) for d in x.shape], "dtype": _dtype_name(x)}
    if self.hashes:
      entry["sha256"] = _sha256(x)
    return entry


def _sha256(x: Any) -> str | None:
  if isinstance(x, jax.ShapeDtypeStruct):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _walk(tree: Any, hashes: bool = False) -> tuple[_Walk, dict]:
  w = _Walk(hashes=hashes)
  spec = w.node(tree, ())
  return w, spec


def _array_keys(keys: tuple) -> tuple[str, ...]:
  return tuple(str(k) for k in keys)


def _nest(leaves: list[tuple[tuple, Any]]) -> dict:
  """Nested dicts of string keys, the layout the arrays are stored in."""
  out: dict = {}
  for keys, value in leaves:
    ks = _array_keys(keys)
    if not ks:
      ks = ("value",)
    node = out
    for i, k in enumerate(ks[:-1]):
      node = node.setdefault(k, {})
      if not isinstance(node, dict):
        raise ValueError(f"leaves at {'/'.join(ks[: i + 1])!r} and {'/'.join(ks)!r} collide")
    if ks[-1] in node:
      raise ValueError(
          f"two leaves are stored under the same key {'/'.join(ks)!r} (keys that differ only "
          "as str vs int); use distinct keys"
      )
    node[ks[-1]] = value
  return out


def _get(nested: Mapping, keys: tuple) -> Any:
  ks = _array_keys(keys) or ("value",)
  for k in ks:
    nested = nested[k]
  return nested


# ------------------------------------------------------------------------------------------------
# Metadata.


def adapter_metadata(tree: Any) -> dict:
  """A JSON-serialisable description of every ``Adapter`` node in a pytree.

  Args:
    tree: any pytree (adapter trees, optimizer states, NNX ``State``; leaves may
      be arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    ``{"format", "version", "adapters"}``; ``adapters`` maps each adapter's
    "/"-joined key path (e.g. ``"opt_state/inner_state/0/mu/dense/kernel"``)
    to its ``method``, ``scale``, ``rank``, ``kernel_shape``, ``in_axes``,
    ``kind`` (as set: ``None`` stays ``None``) and ``fields`` (for each data
    field, ``a``, ``b``, ``qa``, ``qb``, ``sds_on``, ...: ``None``, or
    ``{"shape", "dtype"}`` for an array).
  """
  w, _ = _walk(tree)
  return {"format": FORMAT, "version": FORMAT_VERSION, "adapters": w.adapters}


def _describe(tree: Any) -> tuple[dict, dict]:
  """``(arrays as nested dicts, stored metadata)``; validates the tree."""
  w, spec = _walk(tree, hashes=True)
  meta = {"format": FORMAT, "version": FORMAT_VERSION, "adapters": w.adapters, "tree": spec}
  json.dumps(meta)
  return _nest([(k, v) for k, v in w.leaves if not _is_scalar(v)]), meta


def _check_extra(extra: Any) -> None:
  if not isinstance(extra, Mapping):
    raise TypeError(f"extra must be a JSON-serialisable dict, got {type(extra).__name__}")
  try:
    json.dumps(extra)
  except (TypeError, ValueError) as e:
    raise TypeError(f"extra is not JSON-serialisable: {e}") from e


def _validate_metadata(meta: Any, where: str) -> dict:
  if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
    raise ValueError(f"{where}: the adapter metadata is not in the {FORMAT!r} format")
  if meta.get("version") != FORMAT_VERSION:
    raise ValueError(
        f"{where}: adapter metadata version {meta.get('version')!r} is not supported "
        f"(this sdslora_jax reads version {FORMAT_VERSION})"
    )
  if not isinstance(meta.get("adapters"), Mapping) or not isinstance(meta.get("tree"), Mapping):
    raise ValueError(f"{where}: the adapter metadata lacks its 'adapters' or 'tree' section")
  return dict(meta)


def _read_json(directory: pathlib.Path, item: str, what: str) -> Any:
  if not directory.is_dir():
    raise FileNotFoundError(errno.ENOENT, "no adapter checkpoint (not a directory)", str(directory))
  path = directory / item / _JSON_FILE
  if not path.is_file():
    raise FileNotFoundError(
        errno.ENOENT,
        f"adapter checkpoint {str(directory)!r} has no {what} ({item}/{_JSON_FILE} is missing: "
        "not written by save_adapters / save_args, or incomplete)",
        str(path),
    )
  try:
    return json.loads(path.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(
        f"adapter checkpoint {str(directory)!r}: {item}/{_JSON_FILE} is not valid JSON "
        f"(damaged or truncated): {e}"
    ) from e


def read_metadata(directory: str | pathlib.Path) -> dict:
  """The metadata stored in a checkpoint (``adapter_metadata`` plus the tree structure).

  Raises:
    FileNotFoundError: no checkpoint, or no metadata in it.
    ValueError: the metadata is damaged or of an unknown format version.
  """
  directory = pathlib.Path(directory)
  return _validate_metadata(_read_json(directory, METADATA, "adapter metadata"), str(directory))


def read_extra(directory: str | pathlib.Path) -> dict | None:
  """The ``extra`` JSON stored by ``save_adapters``, or ``None`` if none was given."""
  directory = pathlib.Path(directory)
  read_metadata(directory)
  if not (directory / EXTRA).exists():
    return None
  return _read_json(directory, EXTRA, "extra JSON")


# ------------------------------------------------------------------------------------------------
# Comparing with a target.


def _norm(entry: Mapping) -> dict:
  """An adapter entry with the defaults made explicit (``None`` kernel shape, axes, kind)."""
  fields = entry["fields"]
  shapes = {f: None if e is None else e.get("shape") for f, e in fields.items()}
  kshape = entry["kernel_shape"]
  if kshape is None and shapes.get("a") is not None and shapes.get("b") is not None:
    kshape = [shapes["a"][0], shapes["b"][-1]]
  out = {k: v for k, v in entry.items() if k != "fields"}
  out.update(
      scale=float(entry["scale"]),
      kernel_shape=None if kshape is None else [int(d) for d in kshape],
      in_axes=[0] if entry["in_axes"] is None else [int(i) for i in entry["in_axes"]],
      kind=entry["kind"] or "dense",
      fields={f: _field_kind(e) for f, e in fields.items()},
      shapes={f: None if v is None else list(v) for f, v in shapes.items()},
  )
  return out


def _field_kind(entry: Mapping | None) -> str | None:
  if entry is None:
    return None
  return "array" if "shape" in entry else entry["node"]


def _set_str(fields: Mapping) -> str:
  return "{" + ", ".join(f if k == "array" else f"{f}: {k}" for f, k in fields.items() if k) + "}"


def _compare(stored: dict, stored_leaves: dict, target_walk: _Walk, where: str) -> None:
  """Raises a ``ValueError`` listing every difference between stored and target adapters."""
  problems = []
  have, want = stored["adapters"], target_walk.adapters
  for p in have:
    if p not in want:
      problems.append(f"the checkpoint has an adapter at {p!r} that the target lacks")
  for p in want:
    if p not in have:
      problems.append(f"the target has an adapter at {p!r} that is missing from the checkpoint")
  for p in have:
    if p not in want:
      continue
    try:
      s = _norm(have[p])
    except (KeyError, TypeError, IndexError) as e:
      raise ValueError(f"{where}: the adapter metadata at {p!r} is malformed ({e!r})") from e
    t = _norm(want[p])
    static = list(_META[:2]) + ["rank"] + list(_META[2:])
    static += sorted((set(s) | set(t)) - set(static) - {"fields", "shapes"})
    for f in static:
      if s.get(f) != t.get(f):
        problems.append(
            f"adapter at {p!r}: {f} differs (checkpoint {s.get(f)!r}, target {t.get(f)!r})"
        )
    names = list(t["fields"]) + [f for f in s["fields"] if f not in t["fields"]]
    s_fields = {f: s["fields"].get(f) for f in names}
    t_fields = {f: t["fields"].get(f) for f in names}
    if s_fields != t_fields:
      problems.append(
          f"adapter at {p!r}: fields differ (checkpoint sets {_set_str(s_fields)}, target "
          f"{_set_str(t_fields)})"
      )
    elif s["rank"] == t["rank"] and s["kernel_shape"] == t["kernel_shape"]:
      for f in names:
        if s["shapes"].get(f) != t["shapes"].get(f):
          problems.append(
              f"adapter at {p!r}: {f} shape differs (checkpoint {s['shapes'].get(f)}, "
              f"target {t['shapes'].get(f)})"
          )
  target_leaves = {_array_keys(k): v for k, v in target_walk.leaves}
  shape = lambda v: [] if _is_scalar(v) else list(v.shape)  # noqa: E731
  adapter_paths = set(have) | set(want)

  def in_adapter(ks):
    return any("/".join(ks[:i]) in adapter_paths for i in range(len(ks)))

  for ks, entry in stored_leaves.items():
    if in_adapter(ks):
      continue  # reported above
    if ks not in target_leaves:
      problems.append(f"the checkpoint has a leaf at {'/'.join(ks)!r} that the target lacks")
    elif shape(target_leaves[ks]) != list(entry.get("shape", [])):
      problems.append(
          f"leaf at {'/'.join(ks)!r}: shape differs (checkpoint {list(entry.get('shape', []))}, "
          f"target {shape(target_leaves[ks])})"
      )
  for ks in target_leaves:
    if ks not in stored_leaves and not in_adapter(ks):
      problems.append(f"the target has a leaf at {'/'.join(ks)!r} that the checkpoint lacks")
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise ValueError(
        f"adapter checkpoint {where} does not match the target:\n  " + "\n  ".join(shown)
    )


def _spec_leaves(spec: Mapping, keys: tuple, out: dict, where: str) -> None:
  """Collects ``{array keys: leaf entry}`` (arrays and scalars) from a stored tree structure."""
  t = spec["t"]
  if t in ("array", "scalar"):
    out[_array_keys(keys)] = spec
    return
  if t == "none":
    return
  kids = spec["children"]
  if t in ("dict", "state", "node"):
    names = spec["keys"]
  elif t == "adapter":
    names = spec["fields"]
  elif t == "namedtuple":
    names = spec["fields"]
  elif t == "variable":
    names = ("value",)
  elif t in ("list", "tuple"):
    names = range(len(kids))
  else:
    raise ValueError(f"{where}: unknown node type {t!r} in the adapter metadata")
  if len(names) != len(kids):
    raise ValueError(f"{where}: the adapter metadata at {path_str(keys)!r} is malformed")
  for k, c in zip(names, kids):
    _spec_leaves(c, keys + (k,), out, where)


# ------------------------------------------------------------------------------------------------
# Rebuilding a tree.


def _tuples(v: Any) -> Any:
  return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _trusted_class(name: str) -> Any:
  module, _, qualname = name.partition(":")
  if module.split(".")[0] not in _TRUSTED:
    return None
  try:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError):
    return None
  return obj if isinstance(obj, type) else None


def _rebuild(spec: Mapping, keys: tuple, meta: Mapping, arrays: Mapping, where: str) -> Any:
  """The tree described by ``spec``, its leaves taken from the restored ``arrays``."""
  t = spec["t"]
  kids = spec.get("children", [])
  if t == "none":
    return None
  if t == "array":
    return _get(arrays, keys)
  if t == "scalar":
    return spec["value"]
  if t == "adapter":
    path = path_str(keys)
    entry = meta["adapters"][path]
    known = {f.name for f in dataclasses.fields(Adapter)}
    static = {k: _tuples(v) for k, v in entry.items() if k not in ("rank", "fields")}
    unknown = sorted((set(spec["fields"]) | set(static)) - known)
    if unknown:
      raise ValueError(
          f"{where}: the adapter at {path!r} has fields {unknown} that this version of "
          "sdslora_jax's Adapter does not have"
      )
    data = {f: _rebuild(c, keys + (f,), meta, arrays, where) for f, c in zip(spec["fields"], kids)}
    static["scale"] = float(static["scale"])
    return Adapter(**data, **static)
  if t in ("list", "tuple"):
    out = [_rebuild(c, keys + (i,), meta, arrays, where) for i, c in enumerate(kids)]
    return out if t == "list" else tuple(out)
  if t == "namedtuple":
    fields = list(spec["fields"])
    values = [_rebuild(c, keys + (f,), meta, arrays, where) for f, c in zip(fields, kids)]
    cls = _trusted_class(spec["class"])
    if cls is None or list(getattr(cls, "_fields", ())) != fields:
      cls = collections.namedtuple(spec["class"].partition(":")[2].rpartition(".")[2], fields)
    return cls(*values)
  if t in ("dict", "state", "node"):
    out = {k: _rebuild(c, keys + (k,), meta, arrays, where) for k, c in zip(spec["keys"], kids)}
    if t == "state":
      from flax import nnx  # pylint: disable=g-import-not-at-top

      return nnx.State(out)
    return out
  if t == "variable":
    from flax import nnx  # pylint: disable=g-import-not-at-top

    cls = _trusted_class(spec["class"])
    if cls is None or not issubclass(cls, nnx.Variable):
      raise ValueError(
          f"{where}: cannot rebuild the NNX variable of type {spec['class']} at "
          f"{path_str(keys)!r} without a target; pass one (e.g. nnx.state(model, ...))"
      )
    return cls(_rebuild(kids[0], keys + ("value",), meta, arrays, where))
  raise ValueError(f"{where}: unknown node type {t!r} in the adapter metadata")


# ------------------------------------------------------------------------------------------------
# Save.


def save_args(tree: Any, *, extra: Mapping[str, Any] | None = None) -> Any:
  """The checkpoint items for ``ocp.CheckpointManager.save`` (an ``ocp.args.Composite``).

  ``mngr.save(step, args=save_args(tree))``; restore with ``restore_from_manager``.
  Items: ``adapter_arrays`` (``StandardSave``), ``adapter_metadata`` and, with
  ``extra``, ``adapter_extra`` (``JsonSave``).

  Args:
    tree: any pytree holding ``Adapter`` nodes (arrays as leaves).
    extra: an optional JSON-serialisable dict stored alongside (e.g. the rules).

  Raises:
    TypeError: a leaf that is not an array or Python number, a key that is
      neither str nor int, or ``extra`` that is not a JSON-serialisable dict.
    ValueError: two leaves or adapters that would be stored under one key.
  """
  ocp = _ocp()
  arrays, meta = _describe(tree)
  items = {}
  if arrays:
    items[ARRAYS] = ocp.args.StandardSave(arrays)
  items[METADATA] = ocp.args.JsonSave(meta)
  if extra is not None:
    _check_extra(extra)
    items[EXTRA] = ocp.args.JsonSave(dict(extra))
  return ocp.args.Composite(**items)


def _checkpointer():
  ocp = _ocp()
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_adapters(
    directory: str | pathlib.Path,
    tree: Any,
    *,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
  """Saves a pytree holding ``Adapter`` nodes, with its adapter metadata, to ``directory``.

  The checkpoint is written to a temporary directory beside ``directory`` and
  moved into place when complete; with ``overwrite`` the previous checkpoint
  is moved aside and deleted only after the new one is in place, so a failed
  save leaves any previous checkpoint as it was.

  Args:
    directory: the checkpoint directory (a local path; created).
    tree: any pytree holding ``Adapter`` nodes (adapter tree, optimizer state,
      a dict of both, NNX ``State``).
    extra: an optional JSON-serialisable dict stored alongside (``read_extra``).
    overwrite: replace an existing checkpoint at ``directory``.

  Returns:
    The absolute path of the checkpoint.

  Raises:
    FileExistsError: ``directory`` exists and ``overwrite`` is false.
    TypeError, ValueError: see ``save_args``.
  """
  path = pathlib.Path(directory).expanduser().absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(
        errno.EEXIST, "checkpoint exists; pass overwrite=True to replace it", str(path)
    )
  if path.exists() and not path.is_dir():
    raise FileExistsError(errno.EEXIST, "exists and is not a checkpoint directory", str(path))
  items = save_args(tree, extra=extra)  # validates before anything is written
  path.parent.mkdir(parents=True, exist_ok=True)
  token = uuid.uuid4().hex[:12]
  tmp = path.parent / f".{path.name}.tmp-{token}"
  old = path.parent / f".{path.name}.old-{token}"
  try:
    ckptr = _checkpointer()
    try:
      ckptr.save(tmp, args=items)
    finally:
      ckptr.close()
    if path.exists():
      path.rename(old)
      try:
        tmp.rename(path)
      except BaseException:
        old.rename(path)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
    for stray in path.parent.glob(f".{path.name}.tmp-{token}*"):  # Orbax's own temporaries
      shutil.rmtree(stray, ignore_errors=True)
  return path


# ------------------------------------------------------------------------------------------------
# Restore.


def _abstract(leaf: Any, default_sharding: Any) -> Any:
  sharding = getattr(leaf, "sharding", None)
  if isinstance(leaf, np.ndarray) or sharding is None:
    sharding = default_sharding
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _default_sharding() -> Any:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _stored_abstract(meta: dict, where: str) -> tuple[list[tuple[tuple, Any]], dict]:
  entries: dict = {}
  try:
    _spec_leaves(meta["tree"], (), entries, where)
    sharding = _default_sharding()
    leaves = [
        (ks, jax.ShapeDtypeStruct(tuple(e["shape"]), np.dtype(e["dtype"]), sharding=sharding))
        for ks, e in entries.items()
        if e["t"] == "array"
    ]
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise ValueError(f"{where}: the adapter metadata is malformed ({e!r})") from e
  return leaves, entries


def _verify(arrays: Mapping, entries: dict, where: str) -> None:
  for ks, e in entries.items():
    if e["t"] != "array":
      continue
    try:
      x = _get(arrays, ks)
    except (KeyError, TypeError) as err:
      raise ValueError(f"{where}: the array at {'/'.join(ks)!r} was not restored") from err
    if list(x.shape) != list(e["shape"]):
      raise ValueError(
          f"{where}: the array at {'/'.join(ks)!r} has shape {list(x.shape)} on disk, but the "
          f"metadata says {e['shape']} (damaged checkpoint)"
      )
    want = e.get("sha256")
    if want is None or _dtype_name(x) != e["dtype"]:
      continue
    got = _sha256(x)
    if got is not None and got != want:
      raise ValueError(
          f"{where}: the array at {'/'.join(ks)!r} does not match its stored checksum "
          "(damaged or truncated array files)"
      )


def _restore(read_meta, read_arrays, where: str, target: Any) -> Any:
  """Shared by ``restore_adapters`` and ``restore_from_manager``."""
  meta = _validate_metadata(read_meta(), where)
  abstract, entries = _stored_abstract(meta, where)
  if target is not None:
    tw, _ = _walk(target)
    _compare(meta, entries, tw, where)
    sharding = _default_sharding()
    wanted = {_array_keys(k): v for k, v in tw.leaves}
    abstract = [(k, v if _is_scalar(wanted[k]) else _abstract(wanted[k], sharding))
                for k, v in abstract]
  arrays: dict = {}
  if abstract:
    try:
      arrays = read_arrays(_nest(abstract))
    except Exception as e:  # Orbax / TensorStore report damage with many exception types
      detail = str(e) if len(str(e)) <= 400 else str(e)[:400] + " ..."
      raise ValueError(
          f"{where}: the arrays could not be read (damaged, truncated or missing array files): "
          f"{type(e).__name__}: {detail}"
      ) from e
    _verify(arrays, entries, where)
  if target is None:
    try:
      return _rebuild(meta["tree"], (), meta, arrays, where)
    except (KeyError, TypeError, IndexError) as e:
      raise ValueError(f"{where}: the adapter metadata is malformed ({e!r})") from e
  flat, treedef = jax.tree_util.tree_flatten_with_path(target)
  out = []
  for kp, leaf in flat:
    keys = path_keys(kp)
    entry = entries[_array_keys(keys)]
    value = _get(arrays, keys) if entry["t"] == "array" else entry["value"]
    if _is_scalar(leaf):
      value = type(leaf)(value if _is_scalar(value) else np.asarray(value).item())
    elif isinstance(leaf, np.ndarray):
      value = np.asarray(value, leaf.dtype)
    elif _is_scalar(value):
      value = jax.device_put(np.asarray(value, leaf.dtype), _abstract(leaf, sharding).sharding)
    out.append(value)
  return jax.tree_util.tree_unflatten(treedef, out)


def restore_adapters(directory: str | pathlib.Path, target: Any = None) -> Any:
  """Restores a checkpoint written by ``save_adapters`` (or a manager step of ``save_args``).

  Args:
    directory: the checkpoint directory.
    target: optional pytree like the saved one (concrete arrays or
      ``jax.ShapeDtypeStruct``, possibly with ``sharding``), e.g. freshly
      initialised adapters, ``jax.eval_shape(tx.init, adapters)``, or
      ``nnx.state(model, AdapterVariable)``. Its adapters must match the stored
      ones; arrays come back with its structure, dtypes and shardings.

  Returns:
    The restored tree: the target's structure, or, without a target, the
    saved tree rebuilt from the metadata (see the module docstring).

  Raises:
    FileNotFoundError: no checkpoint at ``directory``, or its metadata is missing.
    ValueError: the target's adapters or arrays differ from the stored ones
      (checked before any array is read), or the checkpoint is damaged.
  """
  directory = pathlib.Path(directory).expanduser().absolute()
  where = repr(str(directory))
  ocp = _ocp()

  def read_meta():
    return _read_json(directory, METADATA, "adapter metadata")

  def read_arrays(abstract):
    if not (directory / ARRAYS).is_dir():
      raise FileNotFoundError(f"the {ARRAYS} directory is missing")
    ckptr = _checkpointer()
    try:
      return ckptr.restore(directory, args=ocp.args.Composite(
          **{ARRAYS: ocp.args.StandardRestore(abstract)}))[ARRAYS]
    finally:
      ckptr.close()

  return _restore(read_meta, read_arrays, where, target)


def restore_from_manager(manager: Any, target: Any = None, *, step: int | None = None) -> Any:
  """Restores a step saved with ``manager.save(step, args=save_args(tree))``.

  Args:
    manager: an ``ocp.CheckpointManager``.
    target: as for ``restore_adapters``.
    step: the step; ``None`` means ``manager.latest_step()``.

  Raises:
    FileNotFoundError: the manager has no steps, or the step has no adapter metadata.
    ValueError: as for ``restore_adapters``.
  """
  ocp = _ocp()
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(
          errno.ENOENT, "the checkpoint manager has no steps", str(manager.directory)
      )
  where = f"step {step} in {str(manager.directory)!r}"

  def read_meta():
    try:
      out = manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{where} has no adapter metadata: {e}") from e
    except (KeyError, ValueError) as e:  # missing item, or JSON that does not parse
      raise ValueError(
          f"{where}: the adapter metadata cannot be read (not saved with save_args?): {e}"
      ) from e
    return out[METADATA]

  def read_arrays(abstract):
    args = ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(abstract)})
    return manager.restore(step, args=args)[ARRAYS]

  return _restore(read_meta, read_arrays, where, target)
