"""Adapter checkpoints: Orbax stores the arrays, this module what they do not say.

An ``Adapter``'s ``method``, ``scale``, ``kernel_shape``, ``in_axes`` and ``kind``
are static pytree metadata: a plain Orbax restore into adapters built with other
rules (``alpha``, rsLoRA, ``"sds"`` vs ``"lora"``) would succeed and silently
change the model. Beside the arrays (item ``adapter_arrays``), the JSON item
``adapter_metadata`` describes every adapter, every leaf (shape, dtype, SHA-256)
and the tree's structure; ``adapter_extra`` holds the caller's optional JSON.

With a target (arrays or ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape(tx.init,
adapters)``) the description is compared with the target's before any array is
read (``CheckpointMismatchError`` lists every difference), and arrays come back
with the target's structure, dtypes and shardings. Without one the tree is rebuilt:
dicts, lists, tuples, ``None``, Python numbers, ``Adapter`` nodes, NNX ``State``
and Flax / sdslora_jax variables; no class is imported from a checkpoint, so named
tuples (optimizer states) come back as named tuples of the same name and fields.
A checkpoint that cannot be read raises ``CheckpointDamagedError``.

  save_adapters(path, tree) / restore_adapters(path, target)     # a directory
  mngr.save(step, args=save_args({"adapters": ads, "opt_state": opt_state}))
  restore_from_manager(mngr, target)                             # a manager's step

NNX: save ``nnx.state(model, AdapterVariable)`` and ``nnx.update`` a model adapted
with the same rules from ``restore_adapters(path, nnx.state(model, AdapterVariable))``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
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
    "CheckpointDamagedError",
    "CheckpointMismatchError",
    "read_extra",
    "restore_adapters",
    "restore_from_manager",
    "save_adapters",
    "save_args",
]

FORMAT = "sdslora_jax.adapters"
FORMAT_VERSION = 2
ARRAYS, METADATA, EXTRA = "adapter_arrays", "adapter_metadata", "adapter_extra"
ITEM_NAMES = (ARRAYS, METADATA, EXTRA)


class CheckpointDamagedError(ValueError):
  """The checkpoint exists but cannot be read: invalid or malformed metadata, missing or
  truncated array files, an array that does not match its stored checksum."""


class CheckpointMismatchError(ValueError):
  """The checkpoint is intact but its adapters or leaves differ from the target's."""


def _ocp():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sdslora_jax.checkpoint needs orbax-checkpoint: pip install 'sdslora-jax[checkpoint]'"
    ) from e
  return ocp



def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_scalar(x: Any) -> bool:
  return isinstance(x, (bool, int, float)) and not _is_array(x)


def _children(node: Any) -> list[tuple[Any, Any]]:
  """``[(plain key, child)]`` one level down, ``None`` children kept."""
  flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
  return [(path_keys(kp)[0], child) for kp, child in flat]


def _json(v: Any) -> Any:
  return [_json(x) for x in v] if isinstance(v, (tuple, list)) else v


def _adapter_entry(ad: Adapter) -> dict:
  data = dict(_children(ad))
  rank = ad.a.shape[-1] if _is_array(ad.a) else ad.b.shape[0] if _is_array(ad.b) else None
  entry = {"method": ad.method, "scale": float(ad.scale),
           "rank": None if rank is None else int(rank)}
  for f in dataclasses.fields(ad):  # static fields: kernel_shape, in_axes, kind, layer_axes
    if f.name not in data and f.name not in entry:
      entry[f.name] = _json(getattr(ad, f.name))
  entry["fields"] = {
      f: None if v is None else {"shape": [int(d) for d in v.shape],
                                 "dtype": np.dtype(v.dtype).name} if _is_array(v)
      else {"node": type(v).__name__}  # e.g. optax.MaskedNode in a masked optimizer state
      for f, v in data.items()}
  return entry


def _sha256(x: Any) -> str | None:
  if isinstance(x, jax.ShapeDtypeStruct) or (isinstance(x, jax.Array)
                                             and not x.is_fully_addressable):
    return None
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


class _Walk:
  """One pass over a tree: its structure (``spec``), its adapters and its leaves."""

  def __init__(self, tree: Any, hashes: bool = False):
    self.adapters: dict[str, dict] = {}
    self.leaves: dict[str, tuple[tuple, Any, dict]] = {}  # "/"-joined keys -> (keys, leaf, entry)
    self.hashes = hashes
    self.spec = self.node(tree, ())

  def node(self, x: Any, keys: tuple) -> dict:
    nnx = sys.modules.get("flax.nnx")  # NNX nodes exist only once it is imported
    if x is None:
      return {"t": "none"}
    if isinstance(x, Adapter):
      path = path_str(keys)
      if path in self.adapters:
        raise ValueError(f"two adapters have the same path {path!r}; use distinct keys")
      self.adapters[path] = _adapter_entry(x)
      kids = _children(x)
      return {"t": "adapter", "fields": [f for f, _ in kids],
              "children": [self.node(v, keys + (f,)) for f, v in kids]}
    if nnx is not None and isinstance(x, nnx.Variable):
      return {"t": "variable", "class": type(x).__name__,
              "children": [self.node(x.get_value(), keys + ("value",))]}
    if isinstance(x, tuple) and hasattr(type(x), "_fields"):
      return {"t": "namedtuple", "class": type(x).__name__, "fields": list(type(x)._fields),
              "children": [self.node(c, keys + (f,)) for f, c in zip(type(x)._fields, x)]}
    if isinstance(x, (list, tuple)):
      return {"t": type(x).__name__, "children": [self.node(c, keys + (i,))
                                                  for i, c in enumerate(x)]}
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x)):
      return self.leaf(x, keys)
    t = ("state" if nnx is not None and isinstance(x, nnx.State)
         else "dict" if isinstance(x, dict) else "node")
    kids = _children(x)
    for k, _ in kids:
      if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise TypeError(f"key {k!r} under {path_str(keys) or '<root>'!r} is neither a str nor "
                        "an int; adapter checkpoints need str or int keys")
    return {"t": t, "keys": [k for k, _ in kids],
            "children": [self.node(c, keys + (k,)) for k, c in kids]}

  def leaf(self, x: Any, keys: tuple) -> dict:
    name = path_str(keys) or "<root>"
    if _is_scalar(x):
      entry = {"value": x}  # kept exactly, in the JSON
    elif not _is_array(x):
      raise TypeError(f"leaf at {name!r} is a {type(x).__name__}, not an array or a Python "
                      "number; adapter checkpoints hold arrays only")
    elif jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      raise TypeError(f"leaf at {name!r} is a PRNG key array; store "
                      "jax.random.key_data(key) instead")
    else:
      entry = {"shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name}
      if self.hashes:
        entry["sha256"] = _sha256(x)
    if name in self.leaves:
      raise ValueError(f"two leaves are stored under the same key {name!r}; use distinct keys")
    self.leaves[name] = (keys, x, entry)
    return {"t": "leaf"}


def adapter_metadata(tree: Any) -> dict:
  """``{"format", "version", "adapters"}``: each ``Adapter`` node of a pytree by its
  "/"-joined key path, with ``method``, ``scale``, ``rank``, its static fields
  (``kernel_shape``, ``in_axes``, ``kind``, ``layer_axes``, as set) and ``fields``
  (per data field ``None``, ``{"shape", "dtype"}`` or ``{"node": class name}``)."""
  return {"format": FORMAT, "version": FORMAT_VERSION, "adapters": _Walk(tree).adapters}



def save_args(tree: Any, *, extra: Mapping[str, Any] | None = None) -> Any:
  """The items of one ``ocp.CheckpointManager`` step (an ``ocp.args.Composite``).

  Raises:
    TypeError: a leaf that is neither an array nor a Python number, a key that is
      neither str nor int, or ``extra`` that is not a JSON-serialisable dict.
    ValueError: two leaves or adapters that would be stored under one key.
  """
  ocp = _ocp()
  w = _Walk(tree, hashes=True)
  meta = {"format": FORMAT, "version": FORMAT_VERSION, "adapters": w.adapters,
          "leaves": [{"keys": list(k), **e} for k, _, e in w.leaves.values()], "tree": w.spec}
  json.dumps(meta)
  items = {}  # arrays by their index in meta["leaves"]: no two keys can collide
  arrays = {str(i): x for i, (_, x, e) in enumerate(w.leaves.values()) if "shape" in e}
  if arrays:
    items[ARRAYS] = ocp.args.StandardSave(arrays)
  items[METADATA] = ocp.args.JsonSave(meta)
  if extra is not None:
    try:
      if not isinstance(extra, Mapping):
        raise TypeError(f"got {type(extra).__name__}")
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise TypeError(f"extra is not JSON-serialisable: {e}") from e
    items[EXTRA] = ocp.args.JsonSave(dict(extra))
  return ocp.args.Composite(**items)


def _checkpointer():
  ocp = _ocp()
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_adapters(directory: str | pathlib.Path, tree: Any, *,
                  extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> pathlib.Path:
  """Saves a pytree holding ``Adapter`` nodes (adapters, an optimizer state, a dict of
  both, an NNX ``State``) with its description to ``directory`` (a local path).

  Orbax writes the checkpoint beside ``directory`` and renames it when complete;
  with ``overwrite`` the previous checkpoint is swapped out only then, so a failed
  save leaves it as it was. ``extra``: an optional JSON dict (``read_extra``).
  Returns the absolute path. Raises ``FileExistsError`` if ``directory`` exists
  and ``overwrite`` is false, else as ``save_args``.
  """
  path = pathlib.Path(directory).expanduser().absolute()
  if path.exists() and (not overwrite or not path.is_dir()):
    raise FileExistsError(errno.EEXIST, "checkpoint exists; pass overwrite=True to replace it"
                          if path.is_dir() else "exists and is not a directory", str(path))
  items = save_args(tree, extra=extra)  # validates before anything is written
  path.parent.mkdir(parents=True, exist_ok=True)
  token = uuid.uuid4().hex[:12]
  new, old = (path.parent / f".{path.name}.{what}-{token}" for what in ("new", "old"))
  try:
    with _checkpointer() as ckptr:
      ckptr.save(new, args=items)
    if path.exists():
      path.rename(old)
      new.rename(path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      new.rename(path)
  finally:
    for stray in path.parent.glob(f".{path.name}.new-{token}*"):  # with Orbax's temporaries
      shutil.rmtree(stray, ignore_errors=True)
  return path


def _directory_reader(directory: str | pathlib.Path):
  """``(restore(**items) -> dict, where)`` for a checkpoint directory."""
  directory = pathlib.Path(directory).expanduser().absolute()
  if not directory.is_dir():
    raise FileNotFoundError(errno.ENOENT, "no adapter checkpoint (not a directory)", str(directory))

  def restore(**items):
    with _checkpointer() as ckptr:
      return ckptr.restore(directory, args=_ocp().args.Composite(**items))

  return restore, repr(str(directory))


def _read_json(restore, item: str, where: str) -> Any:
  """A JSON item, or ``None`` if the checkpoint has none."""
  try:
    return restore(**{item: _ocp().args.JsonRestore()})[item]
  except KeyError:
    return None
  except FileNotFoundError as e:  # the item is there, its file is not
    raise CheckpointDamagedError(f"{where}: {item} is incomplete: {e}") from e
  except ValueError as e:  # json.JSONDecodeError
    raise CheckpointDamagedError(f"{where}: {item} is not valid JSON (damaged or truncated): "
                                 f"{e}") from e


def _read_metadata(restore, where: str) -> dict:
  meta = _read_json(restore, METADATA, where)
  if meta is None:
    raise FileNotFoundError(f"{where} has no adapter metadata (not written by save_adapters / "
                            "save_args)")
  if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
    raise CheckpointDamagedError(f"{where}: the adapter metadata is not in the {FORMAT!r} format")
  if meta.get("version") != FORMAT_VERSION:
    raise ValueError(f"{where}: adapter metadata version {meta.get('version')!r} is not "
                     f"supported (this sdslora_jax reads version {FORMAT_VERSION})")
  if not all(isinstance(meta.get(k), t) for k, t in
             (("adapters", Mapping), ("tree", Mapping), ("leaves", list))):
    raise CheckpointDamagedError(f"{where}: the adapter metadata lacks a section")
  return dict(meta)


def read_metadata(directory: str | pathlib.Path) -> dict:
  """The stored description (``adapter_metadata`` plus leaves and structure)."""
  return _read_metadata(*_directory_reader(directory))


def read_extra(directory: str | pathlib.Path) -> dict | None:
  """The ``extra`` JSON stored by ``save_adapters``, or ``None`` if none was given."""
  restore, where = _directory_reader(directory)
  _read_metadata(restore, where)
  return _read_json(restore, EXTRA, where)


def _norm(entry: Mapping) -> dict:
  """An adapter entry with its defaults explicit (kernel shape, input axes, kind, layer axes).

  Checkpoints written before ``Adapter`` filled its defaults in store ``None`` for them.

  ``fresh_bases`` is left out: it chooses how the adapter runs, not what it holds, so the
  target's value applies (and checkpoints written before the field existed restore).
  """
  shapes = {f: None if e is None else e.get("shape") for f, e in entry["fields"].items()}
  kshape = entry["kernel_shape"]
  if kshape is None and shapes.get("a") is not None and shapes.get("b") is not None:
    kshape = [shapes["a"][0], shapes["b"][-1]]
  return {**{k: v for k, v in entry.items() if k not in ("fields", "fresh_bases")},
          "scale": float(entry["scale"]),
          "kernel_shape": None if kshape is None else [int(d) for d in kshape],
          "in_axes": [0] if entry["in_axes"] is None else [int(i) for i in entry["in_axes"]],
          "kind": entry["kind"] or "dense",
          "layer_axes": [int(i) for i in entry.get("layer_axes") or ()],
          "fields": {f: None if e is None else "array" if "shape" in e else e["node"]
                     for f, e in entry["fields"].items()},
          "shapes": shapes}


def _compare(meta: dict, stored: dict, target: _Walk, where: str) -> None:
  """Raises ``CheckpointMismatchError`` listing every difference from the target."""
  have, want = meta["adapters"], target.adapters
  problems = [f"the checkpoint has an adapter at {p!r} that the target lacks"
              for p in have if p not in want]
  problems += [f"the target has an adapter at {p!r} that is missing from the checkpoint"
               for p in want if p not in have]
  for p in (p for p in have if p in want):
    s, t = _norm(have[p]), _norm(want[p])
    diff = [f"adapter at {p!r}: {f} differs (checkpoint {s.get(f)!r}, target {t.get(f)!r})"
            for f in dict.fromkeys([*s, *t]) if f != "shapes" and s.get(f) != t.get(f)]
    diff = diff or [f"adapter at {p!r}: {f} shape differs (checkpoint {s['shapes'].get(f)}, "
                    f"target {t['shapes'].get(f)})" for f in t["shapes"]
                    if s["shapes"].get(f) != t["shapes"].get(f)]
    problems += diff
  inside = lambda name: any(name == p or name.startswith(p + "/")  # noqa: E731
                            for p in (*have, *want))
  for name, entry in stored.items():
    if inside(name):
      continue  # reported with its adapter
    if name not in target.leaves:
      problems.append(f"the checkpoint has a leaf at {name!r} that the target lacks")
      continue
    leaf = target.leaves[name][1]
    got = [] if _is_scalar(leaf) else list(leaf.shape)
    if got != entry.get("shape", []):
      problems.append(f"leaf at {name!r}: shape differs (checkpoint {entry.get('shape', [])}, "
                      f"target {got})")
  problems += [f"the target has a leaf at {name!r} that the checkpoint lacks"
               for name in target.leaves if name not in stored and not inside(name)]
  if problems:
    more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
    raise CheckpointMismatchError(f"adapter checkpoint {where} does not match the target:\n  "
                                  + "\n  ".join(problems[:20] + more))


def _rebuild(spec: Mapping, keys: tuple, meta: Mapping, leaf) -> Any:
  """The tree described by ``spec``; ``leaf(keys)`` gives each leaf's value."""
  t, kids = spec["t"], spec.get("children", [])
  down = lambda names: [_rebuild(c, keys + (k,), meta, leaf)  # noqa: E731
                        for k, c in zip(names, kids, strict=True)]
  if t == "none":
    return None
  if t == "leaf":
    return leaf(keys)
  if t == "adapter":
    tuples = lambda v: tuple(map(tuples, v)) if isinstance(v, list) else v  # noqa: E731
    static = {k: tuples(v) for k, v in meta["adapters"][path_str(keys)].items()
              if k not in ("rank", "fields")}
    return Adapter(**dict(zip(spec["fields"], down(spec["fields"]))),
                   **{**static, "scale": float(static["scale"])})
  if t in ("list", "tuple"):
    out = down(range(len(kids)))
    return out if t == "list" else tuple(out)
  if t == "namedtuple":
    return collections.namedtuple(spec["class"], spec["fields"])(*down(spec["fields"]))
  if t in ("dict", "state", "node"):
    out = dict(zip(spec["keys"], down(spec["keys"])))
    if t == "state":
      from flax import nnx  # pylint: disable=g-import-not-at-top
      return nnx.State(out)
    return out
  if t == "variable":
    from flax import nnx  # pylint: disable=g-import-not-at-top
    # Found among the loaded subclasses of nnx.Variable (flax's own, and the frontend's
    # AdapterVariable once sdslora_jax.nnx is imported: this layer does not import it).
    cls, todo = None, [nnx.Variable]
    while todo and cls is None:
      c = todo.pop()
      cls = c if c.__name__ == spec["class"] else None
      todo.extend(c.__subclasses__())
    if cls is None:
      raise CheckpointMismatchError(
          f"cannot rebuild the NNX variable {spec['class']} at {path_str(keys)!r} without a "
          "target: pass one (for AdapterVariable, importing sdslora_jax.nnx first is enough)")
    return cls(down(["value"])[0])
  raise KeyError(f"node type {t!r}")


@contextlib.contextmanager
def _readable(where: str):
  """Metadata that does not have the stored layout is damage, not a programming error."""
  try:
    yield
  except (CheckpointMismatchError, CheckpointDamagedError):
    raise
  except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
    raise CheckpointDamagedError(f"{where}: the adapter metadata is malformed ({e!r})") from e


def _abstract(entry: Mapping, like: Any = None) -> jax.ShapeDtypeStruct:
  """How to read a stored array: as the target's leaf ``like`` if it is an array."""
  device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
  if like is None or _is_scalar(like):
    return jax.ShapeDtypeStruct(tuple(entry["shape"]), np.dtype(entry["dtype"]), sharding=device)
  sharding = None if isinstance(like, np.ndarray) else getattr(like, "sharding", None)
  return jax.ShapeDtypeStruct(like.shape, like.dtype, sharding=sharding or device)


def _cast(v: Any, like: Any) -> Any:
  """A restored value as the target's leaf ``like`` holds it (Python number, NumPy, jax)."""
  if _is_scalar(like):
    return type(like)(v if _is_scalar(v) else np.asarray(v).item())
  if isinstance(like, np.ndarray):
    return np.asarray(v, like.dtype)
  return jax.device_put(np.asarray(v, like.dtype), _abstract({}, like).sharding) \
      if _is_scalar(v) else v


def _restore(restore, where: str, target: Any) -> Any:
  """Shared by ``restore_adapters`` and ``restore_from_manager``."""
  meta = _read_metadata(restore, where)
  tw = None if target is None else _Walk(target)
  with _readable(where):
    stored = {path_str(e["keys"]) or "<root>": (str(i), e) for i, e in enumerate(meta["leaves"])}
    if tw is not None:
      _compare(meta, {n: e for n, (_, e) in stored.items()}, tw, where)
    wanted = {i: _abstract(e, tw and tw.leaves[n][1]) for n, (i, e) in stored.items()
              if "shape" in e}
  arrays = {}
  if wanted:
    try:
      arrays = restore(**{ARRAYS: _ocp().args.StandardRestore(wanted)})[ARRAYS]
      for n, (i, e) in stored.items():
        if i in wanted and e.get("sha256") and np.dtype(arrays[i].dtype).name == e["dtype"] \
            and _sha256(arrays[i]) not in (None, e["sha256"]):
          raise CheckpointDamagedError(f"the array at {n!r} does not match its stored checksum")
    except PermissionError:
      raise  # the files are there; access must be fixed, nothing is damaged
    except Exception as e:  # Orbax and TensorStore report damage with many exception types
      raise CheckpointDamagedError(f"{where}: the arrays could not be read (damaged, truncated "
                                   f"or missing array files): {type(e).__name__}: "
                                   f"{str(e)[:400]}") from e

  def value(keys):
    i, e = stored[path_str(keys) or "<root>"]
    return arrays[i] if "shape" in e else e["value"]

  if tw is None:
    with _readable(where):
      return _rebuild(meta["tree"], (), meta, value)
  flat, treedef = jax.tree_util.tree_flatten_with_path(target)
  return treedef.unflatten([_cast(value(path_keys(kp)), leaf) for kp, leaf in flat])


def restore_adapters(directory: str | pathlib.Path, target: Any = None) -> Any:
  """Restores a checkpoint of ``save_adapters`` (or a manager step of ``save_args``).

  ``target``: optional pytree like the saved one (arrays or ``jax.ShapeDtypeStruct``,
  possibly with ``sharding``); its adapters and leaves must match the stored ones,
  and the result has its structure, dtypes and shardings. Without it, the saved
  tree is rebuilt from its description (see the module docstring).

  Raises:
    FileNotFoundError: no checkpoint at ``directory``, or no adapter metadata in it.
    CheckpointMismatchError: the target differs (checked before any array is read).
    CheckpointDamagedError: the checkpoint cannot be read.
  """
  return _restore(*_directory_reader(directory), target)


def restore_from_manager(manager: Any, target: Any = None, *, step: int | None = None) -> Any:
  """Restores the step (default: the latest) saved with ``manager.save(step,
  args=save_args(tree))``; ``target`` and errors as for ``restore_adapters``."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(errno.ENOENT, "the checkpoint manager has no steps",
                            str(manager.directory))
  restore = lambda **items: manager.restore(step, args=_ocp().args.Composite(**items))  # noqa
  return _restore(restore, f"step {step} in {str(manager.directory)!r}", target)
