"""Adapters at the op level: wherever a targeted weight meets activations.

``apply(fn, params, adapters, *args)`` runs ``fn(params, *args)`` with every
targeted weight adapted where it is *used*: in a ``dot_general`` (what
``jnp.einsum``, ``jnp.matmul`` / ``@``, ``jnp.dot`` and ``lax.dot_general``
lower to), a convolution, or an embedding lookup (a row ``gather``). The model
code is not edited and the weight's module class and name do not matter: the
function is traced to a jaxpr and evaluated again, with the adapter's rank-r op
added to the output of each op that consumes a targeted weight. The layout
(which weight axes are contracted, which are output, which stack layers) is
read from the op's dimension numbers at call time:

* contracted weight axes form the adapter's input side, the weight's other
  axes its output side (a later use contracting the output side instead, e.g.
  a tied embedding's logits, applies the same adapter transposed);
* axes that a ``lax.scan`` slices (``nn.scan``, ``nnx.scan``, at any axis: a
  layer axis is moved to the front by a transpose first) and batch axes of the
  ``dot_general`` on the weight's side stack one adapter per index.

Structural ops between the parameter and its use (dtype casts, transposes,
reshapes that merge axes, sharding constraints, nested ``jit``, ``remat``,
``scan``) are followed. Any other use of a targeted weight (an elementwise
op, a slice, a ``cond``) raises an error naming the weight, the op and the
fix; nothing is ever shared or skipped silently.

The forward and backward passes of a dense weight's adapter go through the
rank-r ops of ``sdslora_jax.ops`` (``lora_matmul``, ``warmup_sds_matmul``): no
array of the weight's size is formed. Where the op has enough rows of activations
(``T (d_in + d_out) >= d_in d_out``), in float32 at full precision, it runs
instead as one op on the merged weight (``sdslora_jax.fused``: one matmul each way,
the adapter's gradients from its rank-r backward, no kernel gradient);
``merging("never")`` keeps the rank-r ops. Convolutions merge the update per call,
as the Flax frontends do.

Internals this relies on: ``jax.make_jaxpr`` and the jaxpr of the installed
JAX (primitive names and parameters of ``dot_general``, ``gather``, ``scan``,
``jit``, ``remat``); tested with jax 0.12.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from sdslora_jax import fused, quantized
from sdslora_jax.adapter import Adapter, adapter_matmul, guard_tree, kernel_delta
from sdslora_jax.targets import KernelLayout, Rule, path_keys, path_str
from sdslora_jax.tree import adapters_from_targets, adapter_items

__all__ = ["OpLevelError", "apply", "init_adapters"]

# Ops that only move, cast or annotate a weight: followed, never adapted.
_CASTS = ("convert_element_type", "copy", "copy_p", "sharding_constraint", "reshard",
          "mesh_cast", "pvary", "reduce_precision")
_CALLS = ("jit", "pjit", "closed_call", "core_call")
_REMATS = ("remat2", "checkpoint", "remat")
# Ops that turn a quantized weight's codes into its float value (see ``_Dequant``).
_DEQUANT_MOVES = ("convert_element_type", "reshape", "squeeze", "broadcast_in_dim", "copy",
                  "copy_p", "sharding_constraint", "reshard", "mesh_cast", "pvary")
_DEQUANT_ARITH = ("mul", "div", "sub", "add")


class OpLevelError(ValueError):
  """A targeted weight is used in a way the op-level path cannot adapt."""


@dataclasses.dataclass(frozen=True)
class OpLayout:
  """How one weight is used: found by tracing, turned into an ``Adapter`` layout.

  Attributes:
    path: "/"-joined parameter path.
    shape: the weight's stored shape.
    in_axes: weight axes contracted by the op (the adapter's input side).
    layer_axes: weight axes with one adapter per index (scanned or batched).
    kind: ``"dense"``, ``"embed"`` or ``"conv"``.
    op: the primitive of the first use, for messages.
  """

  path: str
  shape: tuple[int, ...]
  in_axes: tuple[int, ...]
  layer_axes: tuple[int, ...]
  kind: str
  op: str

  @property
  def out_axes(self) -> tuple[int, ...]:
    skip = set(self.in_axes) | set(self.layer_axes)
    return tuple(i for i in range(len(self.shape)) if i not in skip)

  def kernel_layout(self) -> KernelLayout:
    return KernelLayout(self.shape, self.in_axes, self.kind, self.layer_axes)


@dataclasses.dataclass(frozen=True)
class _View:
  """A value derived from weight ``w`` by structural ops only.

  ``axes[i]`` lists the weight axes that axis ``i`` of the value is made of (in
  the value's flattening order; ``()`` for an inserted size-1 axis). ``sliced``
  holds weight axes already indexed away by an enclosing scan.
  """

  w: int
  axes: tuple[tuple[int, ...], ...]
  sliced: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class _Dequant:
  """A value on the way from a quantized weight's stored parts to its float value.

  ``part`` names a stored part (``qvalue``, ``scale``, ``zero_point``) as it
  enters the scope, or is ``None`` for a value computed from ``roots``. Casts,
  reshapes (tiling), arithmetic between the parts (recorded in ``steps``) and a
  code-table lookup (``table``) keep this state; the first other op must receive
  the dequantized kernel in the weight's (local) shape, which becomes a ``_View``.
  """

  w: int
  part: str | None = None
  roots: frozenset = frozenset()
  steps: tuple = ()
  table: Any = None
  sliced: tuple[int, ...] = ()


class _Lazy:
  """A step of a quantized weight's dequantization, bound only if something needs it:
  when the consuming matmul dequantizes block by block, the full float kernel is
  never formed (not even as dead code in the jaxpr)."""

  __slots__ = ("eqn", "invals", "aval")

  def __init__(self, eqn, invals):
    self.eqn, self.invals, self.aval = eqn, invals, eqn.outvars[0].aval

  shape = property(lambda self: tuple(self.aval.shape))
  dtype = property(lambda self: self.aval.dtype)
  ndim = property(lambda self: len(self.aval.shape))


def _force(x):
  # Not memoized: a value bound inside a nested trace must not leak out of it (XLA
  # merges the repeated ops).
  return _bind(x.eqn, x.invals) if isinstance(x, _Lazy) else x


@dataclasses.dataclass
class _Weight:
  path: str
  shape: tuple[int, ...]
  layout: OpLayout | None = None  # known layout (apply), or the first recorded one (init)
  quantized: str | None = None  # the quantized type's name, for a quantized frozen weight
  parts: dict[str, int] | None = None  # flat indices of a quantized weight's stored parts
  adapted: bool = True  # False: a quantized weight followed only to dequantize it in blocks


class _Tracer:
  """Evaluates a jaxpr, adding adapters at the ops that consume targeted weights.

  ``adapters[w]`` is the adapter of weight ``w`` as seen at the current scope
  (its scanned layer axes already sliced), or ``None`` when recording layouts.
  """

  def __init__(self, weights: list[_Weight], record: bool):
    self.weights = weights
    self.record = record
    self.scopes: list[dict[int, dict[str, Any]]] = []  # stored quantized parts per scope

  # --- errors -------------------------------------------------------------

  def _fail(self, view: _View, op: str, why: str, fix: str | None = None) -> None:
    w = self.weights[view.w]
    fix = fix or (
        "the op-level path adapts a weight only where it meets activations in dot_general "
        "(jnp.einsum, jnp.matmul, @, jnp.dot), a convolution or an embedding lookup; leave "
        "this weight out of the rules (tighten the regex or predicate)")
    raise OpLevelError(f"weight {w.path!r} (shape {w.shape}) is used by `{op}`: {why}. {fix}")

  # --- evaluation ---------------------------------------------------------

  def eval(self, jaxpr, consts, args, views, adapters, inherit=None):
    """Evaluates ``jaxpr``; ``views`` / ``adapters`` parallel its invars. Returns outs, views.

    ``inherit``: stored parts of quantized weights from the enclosing scope."""
    env: dict[Any, Any] = {}
    vmap_: dict[Any, _View] = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    scope: dict[int, dict[str, Any]] = {w: dict(p) for w, p in (inherit or {}).items()}
    for v, x, vw in zip(jaxpr.invars, args, views):
      env[v] = x
      if vw is not None:
        vmap_[v] = vw
        if isinstance(vw, _Dequant) and vw.part is not None:
          scope.setdefault(vw.w, {})[vw.part] = x
    self.scopes.append(scope)
    try:
      return self._eval_eqns(jaxpr, env, vmap_, adapters)
    finally:
      self.scopes.pop()

  def _eval_eqns(self, jaxpr, env, vmap_, adapters):
    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      inviews = [None if isinstance(v, jcore.Literal) else vmap_.get(v) for v in eqn.invars]
      if any(vw is not None for vw in inviews):
        outs, outviews = self._eqn(eqn, invals, inviews, adapters)
      else:
        outs, outviews = _bind(eqn, invals), None
      if not eqn.primitive.multiple_results:
        outs = [outs]
      for i, (v, x) in enumerate(zip(eqn.outvars, outs)):
        env[v] = x
        if outviews is not None and outviews[i] is not None:
          vmap_[v] = outviews[i]
    outs = [_force(read(v)) for v in jaxpr.outvars]
    outviews = [None if isinstance(v, jcore.Literal) else vmap_.get(v) for v in jaxpr.outvars]
    return outs, outviews

  def _eqn(self, eqn, invals, inviews, adapters):
    name = eqn.primitive.name
    (view, pos), = [(vw, i) for i, vw in enumerate(inviews) if vw is not None][:1]
    nviews = sum(vw is not None for vw in inviews)
    if any(isinstance(vw, _Dequant) for vw in inviews):
      if name in _CALLS or name in _REMATS or name == "scan":
        return self._sub(eqn, invals, inviews, adapters)
      if isinstance(view, _Dequant):
        return self._dequant_eqn(eqn, invals, inviews, adapters)
    if name in _CASTS:
      return _bind(eqn, invals), [view]
    if name == "transpose":
      perm = eqn.params["permutation"]
      return _bind(eqn, invals), [dataclasses.replace(view, axes=tuple(view.axes[p] for p in perm))]
    if name == "squeeze":
      dims = set(d % len(view.axes) for d in eqn.params["dimensions"])
      axes = tuple(a for i, a in enumerate(view.axes) if i not in dims)
      return _bind(eqn, invals), [dataclasses.replace(view, axes=axes)]
    if name == "reshape" and pos == 0:
      return _bind(eqn, invals), [self._reshape(view, invals[0].shape, eqn.params["new_sizes"])]
    if name == "broadcast_in_dim" and pos == 0:
      shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
      in_shape = invals[0].shape
      if all(shape[d] == in_shape[i] for i, d in enumerate(dims)) and all(
          shape[d] == 1 for d in range(len(shape)) if d not in dims):
        axes = [()] * len(shape)
        for i, d in enumerate(dims):
          axes[d] = view.axes[i]
        return _bind(eqn, invals), [dataclasses.replace(view, axes=tuple(axes))]
    if name in _CALLS:
      return self._call(eqn, invals, inviews, adapters)
    if name in _REMATS:
      return self._remat(eqn, invals, inviews, adapters)
    if name == "scan":
      return self._scan(eqn, invals, inviews, adapters)
    if name == "dot_general" and nviews == 1:
      return self._dot_general(eqn, invals, inviews, adapters), None
    if name == "gather" and pos == 0 and nviews == 1:
      return self._gather(eqn, invals, view, adapters), None
    if name == "conv_general_dilated" and pos == 1 and nviews == 1:
      return self._conv(eqn, invals, view, adapters), None
    if name == "dot_general":
      self._fail(view, name, "both operands are targeted weights (or views of one)")
    if name in ("cond", "while", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
      self._fail(view, name, "it reaches the weight through control flow or a custom "
                 "derivative, which the op-level path does not follow")
    self._fail(view, name, "this is not a matmul, convolution or embedding lookup")

  # --- quantized weights ----------------------------------------------------

  def _dequant_eqn(self, eqn, invals, inviews, adapters):
    """An op on the way from a quantized weight's parts to its float value, or its consumer."""
    name = eqn.primitive.name
    views = [vw for vw in inviews if vw is not None]
    w_idx = views[0].w
    w = self.weights[w_idx]
    if all(isinstance(vw, _Dequant) and vw.w == w_idx for vw in views):
      out = self._dequant_step(eqn, invals, inviews)
      if out is not None:
        return _Lazy(eqn, invals), [out]
    if len(views) == 1:
      view, pos = next((vw, i) for i, vw in enumerate(inviews) if vw is not None)
      local = tuple(w.shape[a] for a in _local_axes(w, view.sliced))
      if view.part is None and tuple(np.shape(invals[pos])) == local:
        base = (self._blocked_base(eqn, invals, pos, view) if name == "dot_general" else None)
        if base is None and w.adapted and not self.record:
          warnings.warn(f"weight {w.path!r} (quantized, {w.quantized}) is dequantized in full "
                        f"for `{name}`: its dequantization is not qwix's (codes - zero point) "
                        "* scale in the op's scope, or the op is not a dot_general",
                        stacklevel=2)
        if not w.adapted:
          return (_bind(eqn, invals) if base is None else base), None
        as_view = _View(view.w, tuple((a,) for a in _local_axes(w, view.sliced)), view.sliced)
        inviews = [as_view if vw is view else vw for vw in inviews]
        if name == "dot_general":
          return self._dot_general(eqn, invals, inviews, adapters, base=base), None
        return self._eqn(eqn, invals, inviews, adapters)
    if not w.adapted:  # not adapted: the model's own computation, whatever it is
      return _bind(eqn, invals), None
    shapes = [tuple(np.shape(x)) for x, vw in zip(invals, inviews) if vw is not None]
    raise OpLevelError(
        f"weight {w.path!r} (quantized, {w.quantized}) reaches `{name}` as value(s) of shape "
        f"{', '.join(map(str, shapes))}, not as its dequantized kernel: the op-level path "
        "follows a quantized weight through casts, reshapes, its scale, zero point and code "
        "table up to a dot_general, convolution or embedding lookup only; leave it out of "
        "the rules")

  def _dequant_step(self, eqn, invals, inviews) -> _Dequant | None:
    """The state after one dequantization op, or ``None`` if ``eqn`` is not one."""
    name = eqn.primitive.name
    if name in _DEQUANT_MOVES and inviews[0] is not None and all(
        vw is None for vw in inviews[1:]):
      return dataclasses.replace(inviews[0], part=None, roots=_roots(inviews[0]))
    if name == "gather" and inviews[0] is None and inviews[1] is not None:  # a code table
      v = inviews[1]
      return dataclasses.replace(v, part=None, roots=_roots(v), steps=v.steps + (("table",),),
                                 table=invals[0])
    if name in _DEQUANT_ARITH:
      a, b = inviews[0], inviews[1]
      if a is None or b is None:  # arithmetic with something else: not a known formula
        v = a or b
        return dataclasses.replace(v, part=None, roots=_roots(v), steps=v.steps + ((name, ()),))
      main, other = (a, b) if "qvalue" in _roots(a) else (b, a)
      step = (name, tuple(sorted(_roots(other))))
      if "qvalue" in _roots(other) or other.steps or main is b and name in ("sub", "div"):
        step = (name, ("?",))
      return dataclasses.replace(main, part=None, roots=_roots(main) | _roots(other),
                                 steps=main.steps + (step,),
                                 table=main.table if main.table is not None else other.table)
    return None

  def _blocked_base(self, eqn, invals, pos, view):
    """The base ``dot_general`` dequantizing the kernel block by block, or ``None`` when
    the chain is not the known formula or the stored parts are not in this scope."""
    steps = list(view.steps)
    if steps[:1] == [("table",)]:
      steps = steps[1:]
    zp = steps[:1] == [("sub", ("zero_point",))]
    if zp:
      steps = steps[1:]
    parts = self.scopes[-1].get(view.w, {})
    need = {"qvalue", "scale"} | ({"zero_point"} if zp else set())
    if steps != [("mul", ("scale",))] or view.roots != need or not need <= set(parts):
      return None
    if tuple(np.shape(parts["qvalue"])) != tuple(np.shape(invals[pos])):
      return None
    p = eqn.params
    y = quantized.blocked_dot_general(
        invals[1 - pos], {k: _force(parts[k]) for k in need}, w_side=pos,
        dimension_numbers=p["dimension_numbers"], table=view.table, dtype=invals[pos].dtype,
        precision=p.get("precision"), preferred_element_type=p.get("preferred_element_type"))
    return y.astype(eqn.outvars[0].aval.dtype)

  def _sub(self, eqn, invals, inviews, adapters):
    """A nested computation receiving quantized parts: stored parts keep their state;
    a partly dequantized value enters as a plain value (dequantized in full)."""
    name = eqn.primitive.name
    if name == "scan":
      for vw in inviews:
        w = self.weights[vw.w] if isinstance(vw, _Dequant) and vw.part is None else None
        if w is not None and w.adapted:
          raise OpLevelError(
              f"weight {w.path!r} (quantized, {w.quantized}) enters a `scan` part-way through "
              "its dequantization; the op-level path needs the stored parts sliced by the scan "
              "(dequantize inside the scanned body)")
      inviews = [None if isinstance(vw, _Dequant) and vw.part is None else vw for vw in inviews]
      return self._scan(eqn, invals, inviews, adapters)
    if name in _CALLS:
      return self._call(eqn, invals, inviews, adapters)
    return self._remat(eqn, invals, inviews, adapters)

  def _reshape(self, view, old_shape, new_shape):
    """Reshapes that only merge consecutive axes or add/drop size-1 axes."""
    old = [(n, ax) for n, ax in zip(old_shape, view.axes) if n != 1]
    axes, i = [], 0
    for n in new_shape:
      if n == 1:
        axes.append(())
        continue
      group, size = (), 1
      while size < n and i < len(old):
        size *= old[i][0]
        group += old[i][1]
        i += 1
      if size != n:
        self._fail(view, "reshape", f"it splits a weight axis ({tuple(old_shape)} -> "
                   f"{tuple(new_shape)}), which the op-level path does not follow")
      axes.append(group)
    return dataclasses.replace(view, axes=tuple(axes))

  # --- structured sub-computations -----------------------------------------

  def _call(self, eqn, invals, inviews, adapters):
    """A nested ``jit`` stays a ``jit`` (same program boundaries, so XLA compiles the
    base computation as it would without adapters)."""
    closed = eqn.params["jaxpr"]
    passed, lazy, inherit = self._enter(invals, inviews)
    box = {}

    def inner(args, ads):
      args = [lazy.get(i, x) for i, x in enumerate(args)]
      outs, box["views"] = self.eval(closed.jaxpr, closed.consts, args, inviews, ads, inherit)
      return outs

    inner.__name__ = str(eqn.params.get("name", "call"))
    outs = jax.jit(inner)(passed, adapters) if _is_jit(eqn) else inner(passed, adapters)
    return outs if eqn.primitive.multiple_results else outs[0], box["views"]

  def _enter(self, invals, inviews):
    """Arguments of a nested call: a partly dequantized kernel (lazy) is not passed but
    closed over, with its stored parts, so its matmul inside can still go by blocks."""
    lazy = {i: x for i, x in enumerate(invals) if isinstance(x, _Lazy)}
    passed = [None if i in lazy else x for i, x in enumerate(invals)]
    scope = self.scopes[-1] if self.scopes else {}
    inherit = {vw.w: scope[vw.w] for vw in inviews
               if isinstance(vw, _Dequant) and vw.part is None and vw.w in scope}
    return passed, lazy, inherit

  def _remat(self, eqn, invals, inviews, adapters):
    params = eqn.params
    passed, lazy, inherit = self._enter(invals, inviews)
    box = {}

    def body(args, ads):
      args = [lazy.get(i, x) for i, x in enumerate(args)]
      outs, outviews = self.eval(params["jaxpr"], (), args, inviews, ads, inherit)
      box["views"] = outviews
      return outs

    fn = jax.checkpoint(body, prevent_cse=params.get("prevent_cse", True),
                        policy=params.get("policy"))
    outs = fn(passed, adapters)
    return outs, box["views"]

  def _scan(self, eqn, invals, inviews, adapters):
    p = eqn.params
    invals = [_force(x) for x in invals]
    if "ft_in" in p:  # jax >= 0.12: a FlatTree of (consts, carry, xs)
      groups = [list(g) for g in p["ft_in"].update(list(range(len(invals)))).unpack()]
      n_consts, n_carry = len(groups[0]), len(groups[1])
    else:
      n_consts, n_carry = p["num_consts"], p["num_carry"]
    body_jaxpr = p["jaxpr"]
    consts_jaxpr = getattr(body_jaxpr, "consts", ())
    body_jaxpr = getattr(body_jaxpr, "jaxpr", body_jaxpr)
    consts, carry, xs = (invals[:n_consts], invals[n_consts:n_consts + n_carry],
                         invals[n_consts + n_carry:])
    cviews, rviews, xviews = (inviews[:n_consts], inviews[n_consts:n_consts + n_carry],
                              inviews[n_consts + n_carry:])
    for vw in rviews:
      if vw is not None:
        self._fail(vw, "scan", "it is a scan carry")
    # A weight sliced by the scan: its first axis is a layer axis.
    body_views = list(cviews) + [None] * n_carry
    sliced = {}  # weight index -> weight axis sliced by this scan
    for vw in xviews:
      if vw is None:
        body_views.append(None)
        continue
      if isinstance(vw, _Dequant):  # a stored part of a quantized weight: sliced on axis 0
        axis = _local_axes(self.weights[vw.w], vw.sliced)[0]
        if sliced.get(vw.w, axis) != axis:
          self._fail(vw, "scan", "one scan slices the weight along two different axes")
        sliced[vw.w] = axis
        body_views.append(dataclasses.replace(vw, sliced=vw.sliced + (axis,)))
        continue
      if len(vw.axes[0]) != 1:
        self._fail(vw, "scan", f"the scan slices merged weight axes {vw.axes[0]}")
      axis = vw.axes[0][0]
      if sliced.get(vw.w, axis) != axis:
        self._fail(vw, "scan", "one scan slices the weight along two different axes")
      sliced[vw.w] = axis
      body_views.append(dataclasses.replace(vw, axes=vw.axes[1:], sliced=vw.sliced + (axis,)))
    # Adapter slices travel with the scan: those of sliced weights as xs.
    const_ads = {w: ad for w, ad in adapters.items() if w not in sliced}
    xs_ads = {}
    for w in sliced:
      ad = adapters.get(w)
      if ad is not None:
        vw = next(v for v in xviews if v is not None and v.w == w)
        lead = _remaining_layer_axes(self.weights[w], vw.sliced)
        k = lead.index(sliced[w])
        xs_ads[w] = jax.tree.map(lambda x, k=k: jnp.moveaxis(x, k, 0), ad)
    def step(c, x):
      xs_vals, xads = x
      ads = dict(const_ads)
      ads.update(xads)  # one layer's arrays; the metadata still describes the stack
      outs, outviews = self.eval(body_jaxpr, consts_jaxpr, list(consts) + list(c) + list(xs_vals),
                                 body_views, ads)
      for vw in outviews:
        if vw is not None:
          self._fail(vw, "scan", "the scan returns the weight (or a view of it)")
      return list(outs[:n_carry]), list(outs[n_carry:])

    c_out, ys = lax.scan(step, list(carry), (list(xs), xs_ads), length=p["length"],
                         reverse=p["reverse"], unroll=p.get("unroll", 1))
    return list(c_out) + list(ys), None

  # --- the adapted ops ------------------------------------------------------

  def _layout_of_use(self, view, op, contracted, batch, kind):
    """Records or checks the layout implied by one use. Returns ``transposed``."""
    w = self.weights[view.w]
    c_axes = tuple(sorted(a for d in contracted for a in view.axes[d]))
    b_axes = tuple(a for d in batch for a in view.axes[d])
    for d in batch:
      if len(view.axes[d]) != 1:
        self._fail(view, op, f"a batch axis merges weight axes {view.axes[d]}")
    layer = tuple(sorted(view.sliced + b_axes))
    if not c_axes:
      self._fail(view, op, "it contracts no axis of the weight")
    use = OpLayout(w.path, w.shape, c_axes, layer, kind, op)
    if len(use.out_axes) == 0 and kind != "conv":
      self._fail(view, op, "every non-layer weight axis is contracted (no output side)")
    known = w.layout
    if known is None:
      w.layout = use
      return False
    if known.layer_axes != layer:
      self._fail(view, op, f"here its layer axes are {layer}, elsewhere {known.layer_axes} "
                 f"(first use: `{known.op}`)", "adapt it in one of the two places only")
    if known.in_axes == c_axes:
      if known.kind != kind:
        self._fail(view, op, f"it is also used as {known.kind!r} (`{known.op}`)",
                   "adapt it in one of the two places only")
      return False
    if set(known.out_axes) == set(c_axes) and kind == "dense" and known.kind in ("dense", "embed"):
      return True  # e.g. a tied embedding: lookup (rows) and logits (x @ table.T)
    self._fail(view, op, f"it contracts weight axes {c_axes} here but {known.in_axes} in "
               f"`{known.op}` (the first use)",
               "adapt it in one of the two places only, or give each use its own weight")

  def _dot_general(self, eqn, invals, inviews, adapters, base=None):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_side = 0 if inviews[0] is not None else 1
    view = inviews[w_side]
    wc, wb = (lc, lb) if w_side == 0 else (rc, rb)
    xc, xb = (rc, rb) if w_side == 0 else (lc, lb)
    transposed = self._layout_of_use(view, "dot_general", wc, wb, "dense")
    ad = adapters.get(view.w)
    if self.record or ad is None:
      return _bind(eqn, invals) if base is None else base
    x = invals[1 - w_side]
    w = self.weights[view.w]
    wf = tuple(d for d in range(len(view.axes)) if d not in wc and d not in wb)
    xf = tuple(d for d in range(x.ndim) if d not in xc and d not in xb)
    # Batch axes of x in the adapter's layer order (kernel order of the weight axes).
    lead = _remaining_layer_axes(w, view.sliced)
    b_order = sorted(range(len(xb)), key=lambda i: lead.index(view.axes[wb[i]][0]))
    if tuple(view.axes[wb[i]][0] for i in b_order) != lead:
      self._fail(view, "dot_general", f"layer axes {lead} are neither scanned nor batched here",
                 "scan over the stacked layers, as nn.scan / nnx.scan do")
    xbt = tuple(xb[i] for i in b_order)

    def adapter_output(x, ad):
      return self._adapter_output(x, ad, view, w, w_side, transposed, wc, wf, xbt, xf, xc,
                                  b_order)

    if base is None and not xbt and not isinstance(invals[w_side], _Lazy):
      delta = _merged_delta(eqn, view, w, invals[w_side], x)
      if delta is not None:
        return _fused_dot(eqn, w_side, delta, adapter_output, x, invals[w_side], ad)
    base = _bind(eqn, invals) if base is None else base
    return base + adapter_output(x, ad).astype(base.dtype)

  def _adapter_output(self, x, ad, view, w, w_side, transposed, wc, wf, xbt, xf, xc, b_order):
    """The adapter's term of the op's output, through the rank-r ops."""
    lay = w.layout
    in_side, out_side = (lay.out_axes, lay.in_axes) if transposed else (lay.in_axes, lay.out_axes)
    # x's contracted axes, split into the weight axes they pair with, in kernel order.
    xt = jnp.transpose(x, xbt + xf + tuple(xc))
    nb, nf = len(xbt), len(xf)
    split = []
    for d_w in wc:
      split += [(a, w.shape[a]) for a in view.axes[d_w]]
    xt = xt.reshape(xt.shape[:nb + nf] + tuple(n for _, n in split))
    order = sorted(range(len(split)), key=lambda i: split[i][0])
    if tuple(split[i][0] for i in order) != tuple(in_side):
      self._fail(view, "dot_general", "its contracted axes do not match the adapter's side")
    xt = jnp.transpose(xt, tuple(range(nb + nf)) + tuple(nb + nf + i for i in order))
    xt = xt.reshape(xt.shape[:nb + nf] + (-1,))

    def one(x2, a2):
      a2 = _transposed(a2) if transposed else a2
      return adapter_matmul(x2, a2)

    fn = one
    for _ in range(nb):
      fn = jax.vmap(fn)
    y = fn(xt, _per_layer(ad))  # (*B, *xF, d_out) with d_out in kernel order of out_side
    y = y.reshape(y.shape[:nb + nf] + tuple(w.shape[a] for a in out_side))
    # To the order the op presents the weight's free axes in, merging groups.
    groups = [view.axes[d] for d in wf]
    flat = [a for g in groups for a in g]
    present = [a for a in out_side if a in flat]
    if sorted(present) != sorted(out_side) and any(w.shape[a] != 1 for a in out_side
                                                    if a not in flat):
      self._fail(view, "dot_general", "an output axis of the weight is missing from the op")
    y = y.reshape(y.shape[:nb + nf] + tuple(w.shape[a] for a in present))
    y = jnp.transpose(y, tuple(range(nb + nf)) + tuple(nb + nf + present.index(a) for a in flat))
    y = y.reshape(y.shape[:nb + nf] + tuple(math.prod(w.shape[a] for a in g) for g in groups))
    inv = tuple(b_order.index(i) for i in range(nb))  # batch axes back in the op's order
    y = jnp.transpose(y, inv + tuple(range(nb, y.ndim)))
    if w_side == 0:  # dot_general's output: (batch, lhs free, rhs free)
      y = jnp.moveaxis(y, tuple(range(nb + nf, y.ndim)), tuple(range(nb, nb + len(wf))))
    return y

  def _gather(self, eqn, invals, view, adapters):
    base = _bind(eqn, invals)
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    table, idx = invals
    ok = (table.ndim == 2 and len(dn.collapsed_slice_dims) == 1
          and tuple(dn.start_index_map) == tuple(dn.collapsed_slice_dims)
          and not getattr(dn, "operand_batching_dims", ()) and len(dn.offset_dims) == 1
          and idx.shape[-1] == 1 and not view.sliced)
    k = dn.collapsed_slice_dims[0] if ok else None
    if not ok or sizes[k] != 1 or sizes[1 - k] != table.shape[1 - k]:
      self._fail(view, "gather", "it is not a row lookup of a 2-D table (an embedding)")
    if len(view.axes[k]) != 1:
      self._fail(view, "gather", "the looked-up axis merges weight axes")
    transposed = self._layout_of_use(view, "gather", (k,), (), "embed")
    ad = adapters.get(view.w)
    if self.record or ad is None:
      return base
    if transposed:
      self._fail(view, "gather", "the table is looked up along its output side")
    from sdslora_jax.tree import lookup_embedding  # local: tree imports this module's peers
    rows = lookup_embedding(jnp.clip(idx[..., 0], 0, table.shape[k] - 1), ad)
    rows = rows.reshape(rows.shape[:-1] + (table.shape[1 - k],))
    return base + jnp.moveaxis(rows, -1, dn.offset_dims[0]).astype(base.dtype)

  def _conv(self, eqn, invals, view, adapters):
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature, in feature, *spatial) axis indices of the kernel
    if any(len(view.axes[d]) != 1 for d in range(len(view.axes))):
      self._fail(view, "conv_general_dilated", "the kernel's axes were merged or inserted")
    contracted = (rhs_spec[1], *rhs_spec[2:])
    self._layout_of_use(view, "conv_general_dilated", contracted, (), "conv")
    ad = adapters.get(view.w)
    if self.record or ad is None:
      return _bind(eqn, invals)
    w = self.weights[view.w]
    if _remaining_layer_axes(w, view.sliced):
      self._fail(view, "conv_general_dilated", "a stacked kernel is convolved unsliced")
    # Merged per call: the update in the kernel's own layout, then in the op's axis order.
    delta = kernel_delta(ad)
    perm = tuple(_local_axes(w, view.sliced).index(view.axes[d][0]) for d in range(len(view.axes)))
    kernel = _force(invals[1]) + jnp.transpose(delta, perm).astype(invals[1].dtype)
    return _bind(eqn, [invals[0], kernel] + list(invals[2:]))


# --- helpers ----------------------------------------------------------------


def _roots(v: _Dequant) -> frozenset:
  return v.roots or frozenset({v.part})


def _bind(eqn, invals):
  invals = [_force(x) for x in invals]
  params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(params, tuple):  # older JAX: (subfuns, params)
    subfuns, params = params
    return eqn.primitive.bind(*subfuns, *invals, **params)
  with eqn.ctx.manager:
    return eqn.primitive.bind(*invals, **params)


def _is_jit(eqn) -> bool:
  return eqn.primitive.name in ("jit", "pjit")


def _local_axes(w: _Weight, sliced: Sequence[int]) -> list[int]:
  """The weight axes left after slicing, in kernel order."""
  return [a for a in range(len(w.shape)) if a not in sliced]


def _remaining_layer_axes(w: _Weight, sliced: Sequence[int]) -> tuple[int, ...]:
  """Layer axes not yet sliced by an enclosing scan: the adapter arrays' leading axes."""
  return tuple(a for a in w.layout.layer_axes if a not in sliced)


def _merged_delta(eqn, view: _View, w: _Weight, w_val, x):
  """``ad -> the update in the op's weight-operand layout`` where the op should run merged
  (``fused.use_merged``), else ``None``."""
  local = _local_axes(w, view.sliced)
  flat = [a for g in view.axes for a in g]
  if sorted(flat) != local:
    return None
  d_in = math.prod(w.shape[a] for a in w.layout.in_axes)
  d_out = math.prod(w.shape[a] for a in w.layout.out_axes)
  if not fused.use_merged(x, w_val, d_in, d_out, eqn.params.get("precision")):
    return None
  perm = tuple(local.index(a) for a in flat)
  return lambda ad: jnp.transpose(kernel_delta(ad, as_applied=True), perm).reshape(w_val.shape)


def _fused_dot(eqn, w_side, delta, adapter_output, x, w_val, ad):
  """The op on the merged operand, with the adapter's own gradients (``fused.fused_call``)."""

  def op(x, wv, rest):
    return _bind(eqn, [wv, x] if w_side == 0 else [x, wv])

  return fused.fused_call(op, delta, adapter_output, x, w_val, ad)


def _per_layer(ad: Adapter) -> Adapter:
  """The adapter's metadata for one ``(d_in, d_out)`` matrix; the arrays may still carry
  leading layer axes, which the caller vmaps over."""
  return dataclasses.replace(ad, kernel_shape=None, in_axes=None, layer_axes=None, kind=None)


def _transposed(ad: Adapter) -> Adapter:
  """The adapter of ``K.T``: ``s (qa b + a qb.T)).T = s (qb a.T + b.T qa.T)``."""
  return dataclasses.replace(ad, a=ad.b.T, b=ad.a.T, qa=ad.qb, qb=ad.qa, stamp=None)


# --- selection, tracing, public entry points ---------------------------------


def select_weights(params: Any, rules: Sequence[Rule | tuple]) -> dict[str, tuple[int, Rule]]:
  """``{path: (flat index, rule)}`` of the parameters the rules select.

  Any floating array with at least two axes can be selected, whatever its
  name; the first matching rule wins.

  Raises:
    ValueError: a rule matches nothing, or matches a non-float or 1-D leaf.
  """
  rules = [r if isinstance(r, Rule) else Rule(**r) for r in rules]
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  chosen: dict[str, tuple[int, Rule]] = {}
  used = [False] * len(rules)
  paths = []
  groups = quantized_weights(params)
  parts = {i for g in groups.values() for i in g["parts"].values()}
  for path, g in groups.items():  # a quantized weight is selected by its own path
    paths.append(path)
    for j, r in enumerate(rules):
      if r.matches(path, None):
        used[j] = True
        chosen[path] = (g["qvalue"], r)
        break
  for i, (kp, leaf) in enumerate(flat):
    path = path_str(kp)
    if i in parts:
      continue
    paths.append(path)
    for j, r in enumerate(rules):
      if r.matches(path, leaf):
        used[j] = True
        shape = tuple(np.shape(leaf))
        dtype = getattr(leaf, "dtype", None)
        if len(shape) < 2 or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
          raise ValueError(f"rule {r.label} matches {path!r} (shape {shape}, dtype {dtype}), "
                           "which is not a floating weight with at least 2 axes")
        chosen[path] = (i, r)
        break
  for j, r in enumerate(rules):
    if not used[j]:
      near = difflib.get_close_matches(r.match if isinstance(r.match, str) else "", paths, 5, 0.3)
      raise ValueError(f"rule {r.label} matches no parameter; nearby paths: "
                       f"{', '.join(map(repr, near)) or ', '.join(map(repr, paths[:5]))}")
  return chosen


def quantized_weights(params: Any) -> dict[str, dict]:
  """Quantized frozen weights in a parameter tree, by the path of the weight itself.

  A quantized weight is a node with ``qvalue`` and ``scale`` fields (qwix's
  ``QArray``, also wrapped as ``WithAux(array=QArray(...))``): its path is the
  node's, without a trailing ``array``; its logical shape is ``qvalue``'s.
  Returns ``{path: {"qvalue": flat index, "parts": {part: flat index}, "keys":
  path keys, "qtype": type name}}``.
  """
  is_q = lambda z: quantized.stored(z) is z  # the QArray itself, not a wrapper around it
  nodes = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)[0]
  flat = [path_keys(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  out: dict[str, dict] = {}
  for kp, node in nodes:
    if not is_q(node):
      continue
    keys = path_keys(kp)
    group = keys[:-1] if keys and keys[-1] == "array" else keys
    parts = {k[len(keys)]: j for j, k in enumerate(flat)
             if k[:len(keys)] == keys and len(k) == len(keys) + 1}
    if "qvalue" not in parts:
      continue
    qtype = getattr(node, "qtype", None)
    qtype = getattr(qtype, "name", None) or str(qtype if qtype is not None else
                                                getattr(node.qvalue, "dtype", "?"))
    out[path_str(group)] = {"qvalue": parts["qvalue"], "parts": parts, "keys": group,
                            "qtype": qtype}
  return out


def _split_args(args, kwargs):
  """Array leaves are traced; everything else (flags, strings, None) stays static."""
  leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
  dyn = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray, np.generic))]
  return leaves, treedef, dyn


def _trace(fn, params, args, kwargs):
  p_leaves, p_def = jax.tree_util.tree_flatten(params)
  a_leaves, a_def, dyn = _split_args(args, kwargs)

  def flat_fn(p_flat, dyn_vals):
    leaves = list(a_leaves)
    for i, v in zip(dyn, dyn_vals):
      leaves[i] = v
    a, kw = jax.tree_util.tree_unflatten(a_def, leaves)
    return fn(jax.tree_util.tree_unflatten(p_def, p_flat), *a, **kw)

  dyn_vals = [a_leaves[i] for i in dyn]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(p_leaves, dyn_vals)
  return closed, out_shape, p_leaves, dyn_vals


def _run(fn, params, args, kwargs, weights_by_index, record, adapters_by_w):
  closed, out_shape, p_leaves, dyn_vals = _trace(fn, params, args, kwargs)
  weights = [w for _, w in sorted(weights_by_index.items())]
  index_of = {i: n for n, i in enumerate(sorted(weights_by_index))}
  views: list[Any] = [None] * (len(p_leaves) + len(dyn_vals))
  for i, n in index_of.items():
    if weights[n].quantized:
      for part, j in weights[n].parts.items():
        views[j] = _Dequant(n, part=part)
    else:
      views[i] = _View(n, tuple((a,) for a in range(np.ndim(p_leaves[i]))))
  tracer = _Tracer(weights, record)
  outs, outviews = tracer.eval(closed.jaxpr, closed.consts, list(p_leaves) + list(dyn_vals),
                               views, adapters_by_w)
  for vw in outviews:
    if vw is not None and weights[vw.w].adapted:
      tracer._fail(vw, "return", "the function returns the weight (or a view of it)",
                   "return only what is computed from it, or leave it out of the rules")
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs), weights


def layouts(fn: Callable, params: Any, rules: Sequence[Rule | tuple], *args,
            **kwargs) -> dict[str, OpLayout]:
  """The layout of every selected weight, read from the ops of ``fn(params, *args)``.

  Traced abstractly (``jax.eval_shape``): nothing is computed. Raises an
  ``OpLevelError`` for a selected weight that no supported op uses, or that is
  used in a way the op-level path cannot adapt.
  """
  return _layouts(fn, params, select_weights(params, rules), args, kwargs)


def _layouts(fn, params, chosen, args, kwargs) -> dict[str, OpLayout]:
  groups = quantized_weights(params)
  leaves, treedef, dyn = _split_args(args, kwargs)
  p_leaves = jax.tree_util.tree_leaves(params)
  box = {}

  def run(params, dyn_vals):
    full = list(leaves)
    for i, v in zip(dyn, dyn_vals):
      full[i] = v
    a, kw = jax.tree_util.tree_unflatten(treedef, full)
    ws = {i: _Weight(path, tuple(np.shape(p_leaves[i])),
                     quantized=_readable_qtype(groups[path], path) if path in groups else None,
                     parts=groups[path]["parts"] if path in groups else None)
          for path, (i, _) in chosen.items()}
    _, box["weights"] = _run(fn, params, a, kw, ws, True, {})
    return 0

  jax.eval_shape(run, params, [leaves[i] for i in dyn])
  out = {}
  for w in box["weights"]:
    if w.layout is None:
      raise OpLevelError(
          f"weight {w.path!r} (shape {w.shape}) is selected but no dot_general, convolution "
          "or embedding lookup uses it in this function (is it used at all with these inputs?)")
    out[w.path] = w.layout
  return out


def init_adapters(key: jax.Array, fn: Callable, params: Any, rules: Sequence[Rule | tuple],
                  *args, sds_on: bool = False, **kwargs) -> dict:
  """Adapters for the weights the rules select, laid out as ``fn`` uses them.

  Args:
    key: PRNG key; adapter ``i`` (in parameter tree order) uses ``fold_in(key, i)``.
    fn: ``fn(params, *args, **kwargs)``, e.g. ``lambda p, x: model.apply({"params": p}, x)``.
    params: the frozen base parameters (arrays or ``jax.ShapeDtypeStruct``).
    rules: target rules (``sdslora_jax.targets.rule``): regex or predicate on the
      "/"-joined parameter path, whatever the weight is called.
    *args, **kwargs: example inputs (arrays are traced abstractly; other values
      are passed as they are).
    sds_on: start SDS-LoRA adapters in the SDS phase instead of the warm-up.

  Returns:
    The adapter tree (nested dicts mirroring ``params``), every update exactly zero.
  """
  chosen = select_weights(params, rules)
  lays = _layouts(fn, params, chosen, args, kwargs)
  from sdslora_jax.targets import Target
  targets = []
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  groups = quantized_weights(params)
  for path, (i, r) in sorted(chosen.items(), key=lambda kv: kv[1][0]):
    lay = lays[path]
    if path in groups:  # a quantized weight: the adapter sits at the weight's own path
      targets.append(Target(path=path, keys=groups[path]["keys"], rule=_check_rank(r, path, lay),
                            layout=lay.kernel_layout(), dtype=None))
      continue
    if r.in_axes is not None and tuple(sorted(r.in_axes)) != lay.in_axes:
      raise ValueError(f"rule {r.label}: in_axes {r.in_axes} for {path!r} disagree with its use "
                       f"in `{lay.op}`, which contracts axes {lay.in_axes}")
    r = _check_rank(r, path, lay)
    targets.append(Target(path=path, keys=path_keys(flat[i][0]), rule=r,
                          layout=lay.kernel_layout(), dtype=getattr(flat[i][1], "dtype", None)))
  return adapters_from_targets(key, targets, sds_on=sds_on)


def _readable_qtype(group: dict, path: str) -> str:
  if not quantized.readable(group["qtype"]):
    raise OpLevelError(
        f"weight {path!r} is quantized as {group['qtype']!r}, which the op-level path cannot "
        "dequantize (it reads qwix QArrays of integer, float8 and nf4 types); leave it out "
        "of the rules or quantize it to one of those types")
  return group["qtype"]


def _check_rank(r: Rule, path: str, lay: OpLayout) -> Rule:
  kl = lay.kernel_layout()
  if r.rank > min(kl.d_in, kl.d_out):
    raise ValueError(f"rule {r.label}: rank {r.rank} exceeds the {kl.d_in} x {kl.d_out} matrix "
                     f"of {path!r} (as `{lay.op}` uses it)")
  return r


def apply(fn: Callable, params: Any, adapters: Any, *args, **kwargs) -> Any:
  """``fn(params, *args, **kwargs)`` with the adapters applied where their weights are used.

  Works under ``jax.jit``, ``jax.grad``, ``vmap``, ``remat`` and sharding; the
  gradients with respect to ``adapters`` are LoRA's or SDS-LoRA's (rank-r, no
  weight-sized array). ``params`` is the frozen base: pass it as an argument
  of your jitted step rather than closing over it.

  Raises:
    ValueError: an adapter has no parameter at its path or its kernel shape
      differs; an ``OpLevelError`` for a use the path cannot adapt.
  """
  items = adapter_items(adapters)
  if not items:
    return fn(params, *args, **kwargs)
  leaves, treedef, dyn = _split_args(args, kwargs)
  if not any(isinstance(x, jax.core.Tracer)
             for x in jax.tree.leaves((params, adapters, [leaves[i] for i in dyn]))):
    # Called outside any transformation: one compiled program instead of op-by-op
    # dispatch (and one compile per nested jit the interpreter keeps).
    def run(params, adapters, dyn_vals):
      full = list(leaves)
      for i, v in zip(dyn, dyn_vals):
        full[i] = v
      a, kw = jax.tree_util.tree_unflatten(treedef, full)
      return apply(fn, params, adapters, *a, **kw)

    return jax.jit(run)(params, adapters, [leaves[i] for i in dyn])
  adapters = guard_tree(adapters)
  items = adapter_items(adapters)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  index = {path_keys(kp): i for i, (kp, _) in enumerate(flat)}
  groups = {g["keys"]: g for g in quantized_weights(params).values()}
  index.update({keys: g["qvalue"] for keys, g in groups.items()})
  ws, ads = {}, {}
  for keys, ad in items:
    i = index.get(keys)
    if i is None:
      raise ValueError(f"adapter at {path_str(keys)!r} has no parameter at its path")
    shape = tuple(np.shape(flat[i][1]))
    if shape != ad.kernel_shape:
      raise ValueError(f"adapter at {path_str(keys)!r} is for a weight of shape "
                       f"{ad.kernel_shape}, but the parameter there has shape {shape}")
    g = groups.get(keys)
    ws[i] = _Weight(path_str(keys), shape, OpLayout(
        path_str(keys), shape, ad.in_axes, ad.layer_axes, ad.kind, "init"),
        quantized=_readable_qtype(g, path_str(keys)) if g else None,
        parts=g["parts"] if g else None)
    ads[i] = ad
  for keys, g in groups.items():  # frozen quantized weights: dequantized block by block too
    if g["qvalue"] not in ws and quantized.readable(g["qtype"]):
      ws[g["qvalue"]] = _Weight(path_str(keys), tuple(np.shape(flat[g["qvalue"]][1])),
                                quantized=g["qtype"], parts=g["parts"], adapted=False)
  order = {i: n for n, i in enumerate(sorted(ws))}
  out, weights = _run(fn, params, args, kwargs, ws, False, {order[i]: ad for i, ad in ads.items()})
  return out

