"""Reads legacy ``torch.save`` checkpoints into numpy arrays, without torch.

Only the legacy (pre-1.6, non-zip) format is supported: five consecutive
pickles (magic number, protocol version, system info, the saved object, the
list of storage keys) followed by each storage's raw bytes, in key order, each
prefixed by its element count as a little-endian int64.

The saved object is unpickled with a restricted ``pickle.Unpickler`` whose
``find_class`` admits only ``torch._utils._rebuild_tensor_v2``, the
``torch.*Storage`` classes and ``collections.OrderedDict``, all replaced by
inert stand-ins; any other global raises ``pickle.UnpicklingError``, so a
malicious file cannot run code. Never ``pickle.load`` a downloaded checkpoint.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

__all__ = ["RefusedGlobalError", "load_legacy_torch_file"]

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001


def _bfloat16() -> Any:
  try:
    import ml_dtypes
  except ImportError:
    return None
  return ml_dtypes.bfloat16


_STORAGE_DTYPES: dict[str, Any] = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "BFloat16Storage": None,  # resolved lazily through ml_dtypes
}


class RefusedGlobalError(pickle.UnpicklingError):
  """A pickle referenced a global that the restricted unpickler does not admit."""


class _Inert:
  """Base of the stand-ins: a pickle cannot overwrite their validated fields (BUILD)."""

  def __setstate__(self, state: Any) -> None:
    raise pickle.UnpicklingError(f"Refused to set state on {type(self).__name__[1:]}.")


class _StorageType(_Inert):
  """Stand-in for a ``torch.*Storage`` class: just its name and numpy dtype."""

  def __init__(self, name: str):
    dtype = _STORAGE_DTYPES[name]
    if name == "BFloat16Storage":
      dtype = _bfloat16()
      if dtype is None:
        raise pickle.UnpicklingError("BFloat16Storage needs the 'ml_dtypes' package.")
    self.name = name
    self.dtype = np.dtype(dtype)


class _Storage(_Inert):
  """A storage announced by a persistent id; ``data`` is filled after unpickling."""

  def __init__(self, key: str, storage_type: _StorageType, numel: int):
    self.key = key
    self.dtype = storage_type.dtype
    self.numel = numel
    self.data: np.ndarray | None = None


class _StorageView(_Inert):
  """A legacy view into a root storage: ``numel`` elements from ``offset``."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root = root
    self.offset = offset
    self.numel = numel
    self.dtype = root.dtype


class _TensorRef(_Inert):
  """The arguments of ``_rebuild_tensor_v2``, materialised once storages are read."""

  def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
    if not isinstance(storage, (_Storage, _StorageView)):
      raise pickle.UnpicklingError(f"Tensor storage must be a storage, got {type(storage)}.")
    if not _is_int(offset) or not _is_int_tuple(size) or not _is_int_tuple(stride):
      raise pickle.UnpicklingError("Malformed tensor offset, size or stride.")
    if len(size) != len(stride):
      raise pickle.UnpicklingError(f"Tensor size {size} and stride {stride} differ in rank.")
    self.storage = storage
    self.offset = offset
    self.size = tuple(size)
    self.stride = tuple(stride)

  def to_numpy(self) -> np.ndarray:
    storage, base = self.storage, 0
    if isinstance(storage, _StorageView):
      base, storage = storage.offset, storage.root
    if storage.data is None:
      raise ValueError(f"Storage {storage.key!r} was never read.")
    flat = storage.data
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, flat.dtype)
    start = base + self.offset
    last = start + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if start < 0 or last >= flat.size or any(s < 0 for s in self.stride):
      raise ValueError(
        f"Tensor (offset {start}, size {self.size}, stride {self.stride}) does not fit its "
        f"storage of {flat.size} elements."
      )
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      flat[start:], shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False
    )
    return np.array(view, order="C")


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_int_tuple(x: Any) -> bool:
  return isinstance(x, tuple) and all(_is_int(v) for v in x)


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
  """Inert stand-in for ``torch._utils._rebuild_tensor_v2``; extra arguments are ignored."""
  del requires_grad, hooks, metadata
  return _TensorRef(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
  """Admits only tensor-rebuild stand-ins, storage types and ``OrderedDict``."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage] | None = None):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise RefusedGlobalError(f"Refused to load global {module}.{name} from a torch checkpoint.")

  def persistent_load(self, pid: Any) -> Any:
    if self._storages is None:
      raise pickle.UnpicklingError("Unexpected persistent id outside the saved object.")
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) != 6:
      kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
      raise pickle.UnpicklingError(f"Unsupported persistent id {kind!r} (only storages).")
    _, storage_type, key, _location, numel, view = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_int(numel):
      raise pickle.UnpicklingError(f"Malformed storage persistent id for key {key!r}.")
    storage = self._storages.get(key)
    if storage is None:
      storage = self._storages[key] = _Storage(key, storage_type, numel)
    elif storage.dtype != storage_type.dtype or storage.numel != numel:
      raise pickle.UnpicklingError(f"Storage {key!r} is announced twice, differently.")
    if view is None:
      return storage
    if not isinstance(view, tuple) or len(view) != 3 or not all(_is_int(v) for v in view[1:]):
      raise pickle.UnpicklingError(f"Malformed storage view for key {key!r}.")
    _view_key, offset, view_numel = view
    if offset < 0 or offset + view_numel > numel:
      raise pickle.UnpicklingError(f"Storage view out of range for key {key!r}.")
    return _StorageView(storage, offset, view_numel)


def _materialise(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
  if isinstance(obj, _TensorRef):
    out[prefix] = obj.to_numpy()
  elif isinstance(obj, Mapping):
    for k, v in obj.items():
      if not isinstance(k, str):
        raise ValueError(f"Non-string checkpoint key {k!r}.")
      _materialise(v, f"{prefix}.{k}" if prefix else k, out)
  else:
    raise ValueError(f"Checkpoint entry {prefix!r} is a {type(obj).__name__}, not a tensor.")


def _read_storages(f: BinaryIO, keys: list[str], storages: dict[str, _Storage]) -> None:
  file_size = os.fstat(f.fileno()).st_size
  for key in keys:
    storage = storages.get(key)
    if storage is None:
      raise ValueError(f"Storage key {key!r} was not announced by the saved object.")
    header = f.read(8)
    if len(header) != 8:
      raise ValueError(f"Truncated before storage {key!r}.")
    (numel,) = struct.unpack("<q", header)
    if numel != storage.numel:
      raise ValueError(f"Storage {key!r} holds {numel} elements, expected {storage.numel}.")
    nbytes = numel * storage.dtype.itemsize
    if nbytes > file_size - f.tell():
      raise ValueError(f"Truncated inside storage {key!r} (needs {nbytes} bytes).")
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise ValueError(f"Truncated inside storage {key!r} ({len(raw)} of {nbytes} bytes).")
    storage.data = np.frombuffer(raw, storage.dtype.newbyteorder("<")).astype(storage.dtype)
  missing = sorted(set(storages) - set(keys))
  if missing:
    raise ValueError(f"Storages {missing[:5]} are used but not stored.")


def _load(f: BinaryIO) -> dict[str, np.ndarray]:
  if _RestrictedUnpickler(f).load() != _MAGIC_NUMBER:
    raise ValueError("Bad magic number.")
  protocol = _RestrictedUnpickler(f).load()
  if protocol != _PROTOCOL_VERSION:
    raise ValueError(f"Unsupported protocol version {protocol!r}.")
  sys_info = _RestrictedUnpickler(f).load()
  if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
    raise ValueError("Only little-endian checkpoints are supported.")
  storages: dict[str, _Storage] = {}
  obj = _RestrictedUnpickler(f, storages).load()
  keys = _RestrictedUnpickler(f).load()
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise ValueError("Malformed storage key list.")
  _read_storages(f, keys, storages)
  out: dict[str, np.ndarray] = {}
  _materialise(obj, "", out)
  return out


def load_legacy_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a legacy ``torch.save`` state dict as ``{name: numpy array}``, without torch.

  Nested mappings are flattened with '.'-joined keys. Arrays keep the saved
  dtypes and are C-contiguous copies (strided tensors are gathered).

  Raises:
    pickle.UnpicklingError: (``RefusedGlobalError``) if the file references any
      global other than the tensor-rebuild, storage and ``OrderedDict`` ones.
    ValueError: naming the file, if it is not a readable legacy checkpoint
      (zip format, truncated, garbage, or malformed).
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    raise ValueError(
      f"{path}: zip-format torch checkpoint (torch >= 1.6); only the legacy format is supported."
    )
  with open(path, "rb") as f:
    try:
      return _load(f)
    except RefusedGlobalError:
      raise
    except (
      pickle.UnpicklingError,
      EOFError,
      ValueError,
      TypeError,
      KeyError,
      IndexError,
      AttributeError,
      OverflowError,
      MemoryError,
      struct.error,
    ) as e:
      raise ValueError(f"{path}: not a readable legacy torch checkpoint: {e}") from e
