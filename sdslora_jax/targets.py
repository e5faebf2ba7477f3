"""Which kernels get adapters, with which settings, and how they are flattened.

A target rule maps a selector to adapter settings. The selector is a regular
expression matched with ``re.fullmatch`` against the "/"-joined parameter path
(e.g. ``"encoder/layer_0/attention/query/kernel"``), or a predicate
``fn(path, leaf) -> bool``. Rules are tried in order; the first that matches a
parameter wins. A rule that claims nothing, or that matches a parameter which is
not a supported kernel, is an error, raised in Python before anything is traced.

A kernel is flattened to the ``(d_in, d_out)`` matrix of the adapter by its
*layout*: which kernel axes are the input side. Defaults:

* 2-D ``kernel`` (Dense): ``(0,)``.
* ``embedding`` tables ``(num_embeddings, features)``: ``(0,)`` (a row is
  selected by the token id, like a one-hot input).
* Conv kernels ``(*spatial, in_features, out_features)``: all axes but the last
  (known from the module type; see the Linen and NNX frontends). Kinds
  ``"conv_grouped"`` (``feature_group_count > 1``), ``"conv_transpose"`` and
  ``"conv_local"`` use the same layout; they are kept apart because their
  kernels do not map to a PEFT ``Conv`` LoRA.
* Other kernels with more than two axes (DenseGeneral, Einsum), by size:
  ``(D, H, K)`` with ``D == H * K`` -> ``(0,)``; ``(H, K, D)`` with
  ``H * K == D`` -> all axes but the last. Anything else needs the module type
  or an explicit ``in_axes`` in the rule.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sdslora_jax import _checks
from sdslora_jax.adapter import METHODS

__all__ = ["rule"]

KERNEL_NAMES = ("kernel", "embedding")
CONV_KINDS = ("conv", "conv_grouped", "conv_transpose", "conv_local")
KINDS = ("dense", *CONV_KINDS, "embed")

Predicate = Callable[[str, Any], bool]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """One target rule: a selector and the adapter settings for what it selects.

  Attributes:
    match: regex (``re.fullmatch`` on the "/"-joined path) or predicate
      ``fn(path, leaf) -> bool``.
    method: ``"sds"`` (SDS-LoRA) or ``"lora"``.
    rank: adapter rank ``r``.
    alpha: LoRA ``alpha``; ``None`` means ``alpha = rank``.
    rslora: scale ``alpha / sqrt(r)`` (rsLoRA) instead of ``alpha / r``.
    dtype: dtype of the factors.
    in_axes: kernel axes forming the input side (overrides the default layout);
      they index the whole stored kernel, layer axes included.
    layer_axes: leading kernel axes that stack layers (``nn.scan`` /
      ``nnx.vmap``); by default they are found by comparing the stored kernel
      with the kernel its module uses per call (the frontends know both).
    fresh_bases: SDS-LoRA: the bases are refreshed after every update, so the
      adapter runs at rank r (``Adapter.fresh_bases``); ``False`` for sparser
      refresh schedules.
    name: label used in error messages (defaults to the regex or function name).
  """

  match: str | Predicate
  method: str = "sds"
  rank: int = 8
  alpha: float | None = None
  rslora: bool = False
  dtype: Any = jnp.float32
  in_axes: tuple[int, ...] | None = None
  layer_axes: tuple[int, ...] | None = None
  fresh_bases: bool = True
  name: str | None = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"rule {self.label}: unknown method {self.method!r}; choose from {METHODS}")
    try:
      object.__setattr__(self, "rank", _checks.check_rank(self.rank))
    except ValueError as e:
      raise ValueError(f"rule {self.label}: {e}") from None
    _checks.check_float(f"rule {self.label}: dtype", self.dtype)
    if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"rule {self.label}: alpha must be finite and positive, got {self.alpha!r}")
    if isinstance(self.match, str):
      try:
        re.compile(self.match)
      except re.error as e:
        raise ValueError(f"rule {self.match!r} is not a valid regular expression: {e}") from e
    elif not callable(self.match):
      raise TypeError(f"rule match must be a regex string or a callable, got {self.match!r}")
    if self.in_axes is not None:
      object.__setattr__(self, "in_axes", tuple(int(i) for i in self.in_axes))
    if self.layer_axes is not None:
      axes = tuple(int(i) for i in self.layer_axes)
      if axes != tuple(range(len(axes))):
        raise ValueError(
            f"rule {self.label}: layer_axes {self.layer_axes} must be the leading kernel axes "
            "(0,), (0, 1), ... (as nn.scan / nnx.vmap with axis 0 stack them)"
        )
      object.__setattr__(self, "layer_axes", axes)

  @property
  def label(self) -> str:
    if self.name is not None:
      return repr(self.name)
    if isinstance(self.match, str):
      return repr(self.match)
    return f"<predicate {getattr(self.match, '__name__', repr(self.match))}>"

  @property
  def scale(self) -> float:
    """The adapter scale: ``alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``."""
    alpha = float(self.rank if self.alpha is None else self.alpha)
    return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def matches(self, path: str, leaf: Any) -> bool:
    if isinstance(self.match, str):
      return re.fullmatch(self.match, path) is not None
    return bool(self.match(path, leaf))


def rule(match: str | Predicate, **settings: Any) -> Rule:
  """Shorthand for ``Rule(match=match, **settings)``."""
  return Rule(match=match, **settings)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """How a kernel is seen as a ``(d_in, d_out)`` matrix.

  Attributes:
    shape: the kernel's shape (as stored, layer axes included).
    in_axes: the input-side axes, sorted; the others, except layer axes, are the
      output side.
    kind: ``"dense"``, ``"embed"`` or one of ``CONV_KINDS``.
    layer_axes: leading axes that stack layers (``()``: one layer); ``d_in``
      and ``d_out`` are one layer's.
  """

  shape: tuple[int, ...]
  in_axes: tuple[int, ...]
  kind: str = "dense"
  layer_axes: tuple[int, ...] = ()

  @property
  def out_axes(self) -> tuple[int, ...]:
    skip = set(self.in_axes) | set(self.layer_axes)
    return tuple(i for i in range(len(self.shape)) if i not in skip)

  @property
  def layer_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.layer_axes)

  @property
  def d_in(self) -> int:
    return math.prod(self.shape[i] for i in self.in_axes)

  @property
  def d_out(self) -> int:
    return math.prod(self.shape[i] for i in self.out_axes)


def path_str(key_path: Sequence[Any]) -> str:
  """"/"-joins a JAX key path (or a tuple of plain keys)."""
  return "/".join(str(k) for k in path_keys(key_path))


def path_keys(key_path: Sequence[Any]) -> tuple[Any, ...]:
  """The plain keys (dict keys, attribute names, indices) of a JAX key path."""
  out = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr) and not isinstance(k, (str, int)):
        k = getattr(k, attr)
        break
    out.append(k)
  return tuple(out)


def _normalize_axes(path: str, shape: tuple[int, ...], in_axes: Sequence[int]) -> tuple[int, ...]:
  ndim = len(shape)
  axes = []
  for i in in_axes:
    if not -ndim <= i < ndim:
      raise ValueError(f"{path}: in_axes {tuple(in_axes)} out of range for kernel shape {shape}")
    axes.append(i % ndim)
  axes = tuple(sorted(set(axes)))
  if len(axes) != len(tuple(in_axes)) or not axes or len(axes) == ndim:
    raise ValueError(
        f"{path}: in_axes {tuple(in_axes)} must name distinct axes of kernel shape {shape}, "
        "at least one and not all of them"
    )
  return axes


def stacked_layout(layout: KernelLayout, layer_shape: tuple[int, ...]) -> KernelLayout:
  """A per-layer layout under leading layer axes of sizes ``layer_shape``."""
  n = len(layer_shape)
  return KernelLayout(
      tuple(layer_shape) + tuple(layout.shape),
      tuple(i + n for i in layout.in_axes),
      layout.kind,
      tuple(range(n)),
  )


def infer_layout(
    path: str,
    shape: Sequence[int],
    *,
    kind: str | None = None,
    in_axes: Sequence[int] | None = None,
    layer_axes: Sequence[int] | None = None,
) -> KernelLayout:
  """The layout of a kernel: explicit ``in_axes``, else the defaults above.

  Args:
    path: "/"-joined path (for messages; a last component ``embedding`` means
      an embedding table).
    shape: the kernel shape.
    kind: one of ``KINDS`` when the module type is known.
    in_axes: explicit input-side axes.

  Raises:
    ValueError: for a kernel with fewer than two axes, or a >2-D kernel whose
      input side the size heuristic cannot decide.
  """
  shape = tuple(int(d) for d in shape)
  if layer_axes:
    n = len(tuple(layer_axes))
    if tuple(layer_axes) != tuple(range(n)) or len(shape) - n < 2:
      raise ValueError(
          f"{path}: layer_axes {tuple(layer_axes)} must be leading axes of kernel shape {shape} "
          "that leave at least 2 axes per layer"
      )
    inner = None
    if in_axes is not None:
      if any(i < n for i in in_axes):
        raise ValueError(
            f"{path}: in_axes {tuple(in_axes)} include a layer axis {tuple(layer_axes)}")
      inner = [i - n for i in in_axes]
    return stacked_layout(infer_layout(path, shape[n:], kind=kind, in_axes=inner), shape[:n])
  if len(shape) < 2:
    raise ValueError(f"{path}: a kernel needs at least 2 axes, got shape {shape}")
  if kind is None:
    kind = "embed" if path.rsplit("/", 1)[-1] == "embedding" else "dense"
  if kind not in KINDS:
    raise ValueError(f"{path}: unknown kernel kind {kind!r}; choose from {KINDS}")
  if in_axes is not None:
    return KernelLayout(shape, _normalize_axes(path, shape, in_axes), kind)
  ndim = len(shape)
  if ndim == 2 or kind == "embed":
    axes = (0,)
  elif kind in CONV_KINDS:
    axes = tuple(range(ndim - 1))
  elif shape[0] == math.prod(shape[1:]):
    axes = (0,)
  elif math.prod(shape[:-1]) == shape[-1]:
    axes = tuple(range(ndim - 1))
  else:
    raise ValueError(
        f"{path}: cannot tell the input axes of kernel shape {shape} (neither "
        f"(D, H, K) with D == H*K nor (H, K, D) with H*K == D); give in_axes in the "
        "rule, or initialise through the Linen/NNX frontend so the module type decides"
    )
  return KernelLayout(shape, axes, kind)


def is_kernel(path: str, leaf: Any) -> bool:
  """Whether a parameter is a supported kernel: named kernel/embedding, float, >= 2-D."""
  shape = getattr(leaf, "shape", None)
  dtype = getattr(leaf, "dtype", None)
  return (
      path.rsplit("/", 1)[-1] in KERNEL_NAMES
      and shape is not None
      and len(shape) >= 2
      and dtype is not None
      and jnp.issubdtype(dtype, jnp.floating)
  )


def _as_rule(r: Rule | tuple) -> Rule:
  if isinstance(r, Rule):
    return r
  if isinstance(r, tuple) and len(r) == 2:
    match, settings = r
    if isinstance(settings, Rule):
      return dataclasses.replace(settings, match=match)
    if isinstance(settings, Mapping):
      return Rule(match=match, **settings)
  raise TypeError(f"a target rule must be a Rule or a (match, settings dict) pair, got {r!r}")


def _nearby(rule_: Rule, paths: Sequence[str], n: int = 5) -> str:
  if isinstance(rule_.match, str):
    close = difflib.get_close_matches(rule_.match, paths, n=n, cutoff=0.0)
  else:
    close = list(paths[:n])
  return ", ".join(repr(p) for p in close) if close else "(the tree is empty)"


@dataclasses.dataclass(frozen=True)
class Target:
  """A selected kernel: its key path, plain keys, layout and winning rule."""

  path: str
  keys: tuple[Any, ...]
  layout: KernelLayout
  rule: Rule
  dtype: Any


def select_targets(
    params: Any,
    rules: Sequence[Rule | tuple],
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> list[Target]:
  """Applies the rules to a parameter tree.

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. Linen
      ``params``, or an NNX ``State``'s pure dict).
    rules: ordered target rules; the first that matches a parameter wins.
    layouts: known layouts by "/"-joined kernel path (from the module types);
      a rule's ``in_axes`` must agree with them. A parameter whose shape is
      the module's per-call kernel shape behind leading axes is a stacked
      kernel (``nn.scan`` / ``nnx.vmap``): it gets one adapter per layer.

  Returns:
    The targets, in the tree's flattening order.

  Raises:
    ValueError: a rule claims no parameter, matches a parameter that is not a
      supported kernel, asks for a rank above ``min(d_in, d_out)``, selects a
      kernel whose shape does not end with its module's per-call kernel shape,
      or a layout cannot be decided.
  """
  rules = [_as_rule(r) for r in rules]
  if not rules:
    raise ValueError("no target rules given")
  layouts = dict(layouts or {})
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(kp) for kp, _ in flat]
  kernel_paths = [p for p, (_, leaf) in zip(paths, flat) if is_kernel(p, leaf)]
  claimed = [0] * len(rules)
  matched = [0] * len(rules)
  targets = []
  for (kp, leaf), path in zip(flat, paths):
    winner = None
    for i, r in enumerate(rules):
      if r.matches(path, leaf):
        matched[i] += 1
        if winner is None:
          winner = i
    if winner is None:
      continue
    r = rules[winner]
    claimed[winner] += 1
    if not is_kernel(path, leaf):
      raise ValueError(
          f"rule {r.label} matches {path!r} (shape {tuple(getattr(leaf, 'shape', ()))}, "
          f"dtype {getattr(leaf, 'dtype', None)}), which is not a supported kernel (a float "
          f"array of >= 2 axes named {' or '.join(KERNEL_NAMES)}); nearby kernels: "
          f"{_nearby(r, kernel_paths)}"
      )
    known = layouts.get(path)
    shape = tuple(leaf.shape)
    if known is not None:
      if shape != known.shape:
        n = len(shape) - len(known.shape)
        if n <= 0 or shape[n:] != known.shape:
          raise ValueError(
              f"rule {r.label} selects {path!r}, a parameter of shape {shape}, but its module "
              f"uses a kernel of shape {known.shape} per call, which is not a trailing part of it "
              "(stacked layers must have their layer axes first: nn.scan / nnx.vmap with axis 0)"
          )
        known = stacked_layout(known, shape[:n])  # a stacked kernel: one adapter per layer
      if r.layer_axes is not None and r.layer_axes != known.layer_axes:
        raise ValueError(
            f"rule {r.label}: layer_axes {r.layer_axes} for {path!r} disagree with the module, "
            f"which uses a kernel of shape {shape[len(known.layer_axes):]} per call (layer axes "
            f"{known.layer_axes} of {shape})"
        )
      if r.in_axes is not None:
        given = infer_layout(path, shape, in_axes=r.in_axes, layer_axes=known.layer_axes).in_axes
        if given != known.in_axes:
          raise ValueError(
              f"rule {r.label}: in_axes {r.in_axes} for {path!r} disagree with the module, "
              f"which contracts kernel axes {known.in_axes} of shape {known.shape}"
          )
      layout = known
    else:
      layout = infer_layout(path, shape, in_axes=r.in_axes, layer_axes=r.layer_axes)
    if r.rank > min(layout.d_in, layout.d_out):
      raise ValueError(
          f"rule {r.label}: rank {r.rank} exceeds min(d_in, d_out) = "
          f"{min(layout.d_in, layout.d_out)} for {path!r} (kernel shape {layout.shape}, "
          f"input axes {layout.in_axes} -> d_in={layout.d_in}, d_out={layout.d_out})"
      )
    targets.append(Target(path, path_keys(kp), layout, r, r.dtype))
  for i, r in enumerate(rules):
    if matched[i] == 0:
      raise ValueError(
          f"rule {r.label} matches no parameter; nearby paths: {_nearby(r, kernel_paths or paths)}"
      )
    if claimed[i] == 0:
      raise ValueError(
          f"rule {r.label} only matches parameters that earlier rules already claimed "
          f"(first match wins); reorder or remove it"
      )
  return targets


def parse_einsum(eq: str, kernel_ndim: int) -> tuple[str, str, str]:
  """Splits ``"x_spec,kernel_spec->out_spec"``; checks the kernel spec's length."""
  eq = eq.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1 or "." in eq:
    raise ValueError(f"einsum equation {eq!r} must be explicit 'x,kernel->out' without ellipsis")
  lhs, out = eq.split("->")
  x_spec, k_spec = lhs.split(",")
  if len(k_spec) != kernel_ndim:
    raise ValueError(f"einsum equation {eq!r}: kernel spec {k_spec!r} is not {kernel_ndim}-D")
  return x_spec, k_spec, out


def einsum_in_axes(eq: str, kernel_ndim: int) -> tuple[int, ...] | None:
  """Kernel axes an einsum contracts with the input, or ``None`` if not a plain matmul.

  A plain matmul has every kernel letter either in the input and not the output
  (input side) or in the output and not the input (output side), and each
  letter once.
  """
  x_spec, k_spec, out = parse_einsum(eq, kernel_ndim)
  if len(set(k_spec)) != len(k_spec) or len(set(x_spec)) != len(x_spec):
    return None
  in_axes, n_out = [], 0
  for i, c in enumerate(k_spec):
    if c in x_spec and c not in out:
      in_axes.append(i)
    elif c in out and c not in x_spec:
      n_out += 1
    else:
      return None
  if not in_axes or not n_out:
    return None
  return tuple(in_axes)
