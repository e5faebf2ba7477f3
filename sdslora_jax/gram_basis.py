"""Orthonormal bases from r x r Gram matrices: a thin QR that never gathers the factor.

``basis.orthonormal_basis`` runs a Householder QR. When a factor ``a: (d, r)`` is
sharded along ``d`` (FSDP), XLA's SPMD partitioner cannot split a Householder QR
and all-gathers the whole ``(d, r)`` factor onto every device first. The
functions here touch the tall matrix only through

* Gram matrices ``Y.T @ Y`` (``r x r``: a local matmul plus an all-reduce of
  ``r * r`` floats) and column sums (``r`` floats), and
* right-multiplications ``Y @ W`` by a replicated ``r x r`` matrix (local),

so a sharded factor stays sharded and the only collectives are all-reduces of
``r x r``, ``2 x r`` and ``r`` floats. Under ``jit`` XLA inserts them itself;
inside ``shard_map`` pass ``axis_name`` and they are ``psum`` / ``pmax`` over
that axis. (``R^-1`` is formed explicitly, ``r x r``, and applied by a matmul:
XLA all-gathers the tall operand of a ``triangular_solve`` applied to it.) The
``r x r`` Cholesky factor and its inverse come from one ``jax.numpy`` column loop
(``_cholesky_and_inverse``), not from LAPACK: batched under ``vmap`` on every
platform, and no OpenBLAS threads left spinning beside the train step on CPU.

Algorithm (float32, matmuls at ``Precision.HIGHEST`` so that TPUs and GPUs do
not drop to bfloat16 / TF32 passes):

1. *Prepare*: columns are scaled by exact powers of two to a max-abs in
   ``[0.5, 1)`` (no overflow or underflow in the Gram matrix; a column scaling
   does not change the Q factor, and a power of two changes no rounding).
   Exactly-zero columns are replaced by the identity column ``e_j``, so an
   all-zero ``m`` gives ``I[:, :r]`` exactly, as Householder does.
2. *Fast path*: Cholesky-QR sweeps ``Y <- Y R^-1``, ``R^T R = Y^T Y + s I``.
   Every sweep factors the column-equilibrated Gram matrix (unit diagonal), its
   diagonal summed spike-safely (``_accurate_gram``) in the last sweep of each
   attempt and on the safe path. First attempt: two plain
   sweeps (CholeskyQR2, ``s = 0``; four ``n r^2`` matmuls), enough for
   condition numbers up to ~1e3, as trained factors usually have. Only when it
   is not accepted (step 3) for some matrix of the batch, a second attempt from
   the input: ``passes`` sweeps, the first ``passes - 2`` shifted, ``s =
   SHIFT_FACTOR * u * ||Y||_F^2`` with ``u = 2^-24`` (shifted CholeskyQR3:
   Fukaya, Kannan, Nakatsukasa, Yamamoto & Yanagisawa, SIAM J. Sci. Comput.
   2020), the last two plain. (The first attempt made the QR of eight ``(1024,
   64)`` factors 8.2 -> 5.8 ms on a 2-core CPU, against three sweeps every time.)
3. *Acceptance*: the fast path's result is kept when every ``R^-1`` is finite,
   the Gram matrix of the last sweep's input is within ``ACCEPT_TOL`` of ``I``
   in Frobenius norm (so the last sweep is a CholeskyQR of a matrix with
   condition number ``<= sqrt(3)``: orthonormal to float32 rounding), and every
   column's part independent of the previous columns, the diagonal of the
   accumulated ``R`` of the equilibrated ``m``, exceeds ``RANK_TOL`` (relative
   to the column norm). Otherwise the next attempt runs, and after the second
   the safe path (a decision on the whole batch, a replicated scalar: the same
   on every device).
4. *Safe path* (rank-deficient or too ill-conditioned ``m``): Cholesky-QR
   sweeps with a Cholesky that *deflates* a column instead of failing (no
   later column is orthogonalised against it, its output is zero). Two shifted
   sweeps spread the spectrum (a direction of relative size ``rho`` grows to
   ``~ rho / s``), then the pivots of a plain sweep decide which columns are
   dependent (independent part below ``RANK_TOL``). Those columns of the
   *input* are replaced by fixed pseudo-random columns (entries in [-1, 1)
   from a murmur3 hash of the global row and column index: the same on every
   device and for every sharding), and the modified matrix gets two shifted
   and two plain deflating sweeps.
5. *One loop*: every sweep of the three attempts runs in one ``lax.while_loop``
   whose one body (``_sweep``) serves both paths, its flags read from a static
   schedule. XLA:CPU compiles every loop body on its own, at about 10 ms per
   fusion: one loop per attempt made the QR 139 fusions, one loop makes it 68
   (72 with ``_accurate_gram``'s ``lax.cond``), and its compile 1.5-1.9 s ->
   0.9-1.25 s for eight ``(1024, 64)`` factors on a 2-core CPU (bit for bit the
   same bases as the loop per attempt, and the same run time).

Result convention, as ``orthonormal_basis``: ``m = Q R`` with ``R = Q^T m``
upper-triangular with non-negative diagonal. For full-rank ``m`` this is the
unique thin-QR factor: both paths give it, equal to the Householder result up
to rounding (and closer than Householder to the float64 QR, thanks to the
column equilibration). A column that is zero or numerically dependent on the
previous ones (``R_jj ~ 0``) gets the QR column of its stand-in (``e_j``,
resp. the pseudo-random column): orthonormal to the previous columns, later
columns orthogonalised against it. These completed columns need not match
what a Householder QR would pick.

Measured (``tests/test_gram_basis.py``, float32 inputs ``U diag(s) V^T``):
``max|Q^T Q - I|`` 1e-7 to 5e-7 for condition numbers 1 to 1e6 and also for
rank-deficient, zero and spiky inputs; the fast path covers condition numbers
up to ~1e6-1e7, the safe path the rest.

No Flax import here: this is part of the functional core.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sdslora_jax import _checks

__all__: list[str] = []  # internal: used by the library, not part of its API

_F32 = jnp.float32
_HI = lax.Precision.HIGHEST
_U = 2.0**-24  # float32 unit roundoff

SHIFT_FACTOR = 4.0
"""``c`` in the shift ``s = c * u * ||Y||_F^2`` of a shifted Cholesky sweep.

The first sweep sees the equilibrated Gram matrix, ``||Y||_F^2 = r``, so
``s = 4 r 2^-24``. One shifted sweep maps a condition number ``k`` to about
``sqrt(s) k``: 2e3 to 4e3 at ``k = 1e6`` for ``r = 16..64``, which CholeskyQR2
still handles in float32. Measured on singular Gram matrices (``n = 65536``):
``c = 0.25`` lets the shifted Cholesky fail (NaN; the safe path then takes
over), ``c >= 1`` did not; ``c = 16`` narrows the fast path's range to
``k ~ 1e6``. The worst-case shift of the paper, ``11 (d r + r (r + 1)) u``,
would be of order 1 in float32 and is not used."""

ACCEPT_TOL = 0.5
"""Fast path accepted when ``||G_last - I||_F <= ACCEPT_TOL`` (see module doc)."""

PIVOT_TOL = 1e-6
"""Safe path: a plain sweep deflates column j when its pivot in the equilibrated
Gram matrix (``sin^2`` of its angle to the previous kept columns) is below this."""

RANK_TOL = 2.0**-20
"""A column whose part independent of the previous columns is below ``RANK_TOL``
times its norm (16 float32 roundings) counts as dependent: the fast path hands
such an ``m`` to the safe path, which replaces the column by its stand-in."""

AxisName = Hashable | Sequence[Hashable]


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def _replicated_spec(y):
  """Out-sharding for a contraction over ``y``'s rows under explicit sharding, else None."""
  sharding = getattr(jax.typeof(y), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or getattr(mesh, "empty", True):
    return None
  explicit = getattr(mesh, "explicit_axes", ())
  if not explicit:
    return None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _cross(y, z, axis_name):
  """``y.T @ z`` (``r x r``), summed over all shards of the rows."""
  g = lax.dot_general(
      y,
      z,
      (((0,), (0,)), ((), ())),
      precision=_HI,
      preferred_element_type=_F32,
      out_sharding=_replicated_spec(y),
  )
  return _psum(g, axis_name)


_SPIKE = 2.0**-4


def _accurate_gram(y, axis_name, exact_diagonal=True):
  """Gram matrix of a near-orthonormal ``y`` whose diagonal is right for spiky columns too.

  A float32 dot adds many tiny squares to an accumulator that holds a column's
  one large entry and loses them (``|G_jj - 1|`` reaches 1.5e-6 at ``n ~ 1e4``
  for a column close to ``e_j``). The diagonal is therefore recomputed with the
  entries ``>= 2^-4`` (at most 256 in a unit column) summed apart from the rest:
  an elementwise pass and an all-reduce of ``2 x r`` floats, no second matmul.
  Off-diagonal entries of a near-orthonormal ``y`` are small sums and need no
  care. The last sweep's Gram error is the final orthogonality error; an
  earlier fast sweep only needs a Gram matrix that the next sweep corrects, so
  ``exact_diagonal`` false (traced: a ``lax.cond``) takes the dot's own diagonal
  there. The masked sums cost 0.68 ms for eight ``(1024, 64)`` factors on a
  2-core CPU; skipping them in CholeskyQR2's first sweep made that QR 7.28 ->
  7.03 ms, and 1.64 -> 1.51 ms at r = 16 (one program beside the other), for
  four more fusions (72).
  """
  g = _cross(y, y, axis_name)

  def spike_safe_diagonal():
    sq = y * y
    big = jnp.abs(y) >= _SPIKE
    # Two reductions, stacked after summing: a stack of the (n, r) parts would be
    # materialised (two temporaries of the factor's size).
    parts = jnp.stack([jnp.sum(jnp.where(big, sq, 0.0), axis=0),
                       jnp.sum(jnp.where(big, 0.0, sq), axis=0)])
    parts = _psum(parts, axis_name)
    return parts[0] + parts[1]

  diag = lax.cond(exact_diagonal, spike_safe_diagonal, lambda: jnp.diagonal(g))
  eye = jnp.eye(g.shape[0], dtype=bool)
  g = 0.5 * (g + g.T)
  return jnp.where(eye, diag[None, :], g)


def _times(y, w):
  """``y @ w`` with a replicated ``r x r`` matrix ``w``: local on a row-sharded ``y``."""
  return jnp.matmul(y, w, precision=_HI, preferred_element_type=_F32)


def _shift(g):
  return SHIFT_FACTOR * _U * jnp.trace(g)


def _cholesky_and_inverse(g, thresholds):
  """Cholesky ``g = L L^T`` and ``L^-1`` in one column loop, skipping columns instead of failing.

  Column j is *deflated* when its pivot (the Schur complement ``g_jj`` minus the
  kept previous columns' contribution) is not above ``thresholds[j]`` (or is
  NaN): then ``L[j, j] = 1`` and ``L[k, j] = 0`` for ``k > j``, so no later
  column is orthogonalised against it. Returns ``(L, L^-1, deflated)``; the
  sweep's ``R^-1`` is ``(L^-1).T``, upper triangular.

  Written with ``jax.numpy`` ops on ``r x r`` values (left-looking Cholesky;
  row j of ``L^-1`` by forward substitution as soon as row j of ``L`` is final),
  not LAPACK: jaxlib's CPU ``potrf`` / ``trsm`` run on OpenBLAS, whose worker
  threads keep spinning after a call and, on a 2-core machine, slowed the
  train step's next matmuls by a third (d = 1024, r = 64: 100 against 76 ms
  with ``OPENBLAS_NUM_THREADS=1``). Without LAPACK the loop also batches under
  ``vmap`` on every platform (``_linalg`` explains why LAPACK calls may not).
  """
  r = g.shape[0]
  idx = jnp.arange(r)

  def body(j, carry):
    l, x, bad = carry
    gj = lax.dynamic_index_in_dim(g, j, axis=1, keepdims=False)
    lj = lax.dynamic_index_in_dim(l, j, axis=0, keepdims=False)  # zero at >= j
    v = gj - jnp.matmul(l, lj, precision=_HI)
    d = v[j]
    is_bad = jnp.logical_not(d > thresholds[j])
    root = jnp.sqrt(jnp.where(is_bad, 1.0, d))
    col = jnp.where((idx > j) & ~is_bad, v / root, 0.0)
    col = jnp.where(idx == j, root, col)
    # Columns and rows written by a select, not ``dynamic_update_slice``: under jit
    # with an input sharded over an Explicit mesh axis, ``g`` (hence ``col``) is
    # replicated *on that mesh* (``_cross``'s out_sharding), while ``l`` starts as a
    # constant on the empty mesh (JAX 0.12 takes a new array's mesh from its
    # operands, here a scalar, ignoring the out_sharding ``zeros_like`` passes
    # outside a mesh context). Both are replicated r x r / r values, nothing is
    # sharded over r, but ``dynamic_update_slice`` demands equal shardings (mesh
    # included) and raised; elementwise ops accept an empty-mesh operand next to a
    # meshed one (and loop carries allow it).
    l = jnp.where(idx[None, :] == j, col[:, None], l)
    # Row j of L is final now: L[j, :j] from the earlier columns, L[j, j] = root.
    lrow = jnp.where(idx < j, lax.dynamic_index_in_dim(l, j, axis=0, keepdims=False), 0.0)
    xrow = (jnp.where(idx == j, 1.0, 0.0) - jnp.matmul(lrow, x, precision=_HI)) / root
    x = jnp.where(idx[:, None] == j, xrow[None, :], x)
    bad = jnp.where(idx == j, is_bad, bad)
    return l, x, bad

  init = (jnp.zeros_like(g), jnp.zeros_like(g), jnp.zeros((r,), bool))
  return lax.fori_loop(0, r, body, init)


def _row_ids(n_local, r, axis_name):
  rows = lax.broadcasted_iota(jnp.uint32, (n_local, r), 0)
  cols = lax.broadcasted_iota(jnp.uint32, (n_local, r), 1)
  if axis_name is not None:
    offset = lax.axis_index(axis_name).astype(jnp.uint32) * jnp.uint32(n_local)
    rows = rows + offset
  return rows, cols


def _completion_columns(n_local, r, axis_name):
  """Fixed pseudo-random entries in [-1, 1): murmur3 finaliser of (row, column)."""
  rows, cols = _row_ids(n_local, r, axis_name)
  h = rows * jnp.uint32(0x9E3779B1) + cols * jnp.uint32(0x85EBCA77) + jnp.uint32(0x5D5D5D5D)
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  return (h >> 8).astype(_F32) * jnp.float32(2.0**-23) - 1.0


def _prepare(m, axis_name):
  """float32, columns scaled by powers of two, zero columns replaced by ``e_j``.

  Returns ``(xs, finite)``, ``finite`` telling whether every entry of ``m`` is.
  """
  x = jnp.asarray(m, _F32)
  n_local, r = x.shape
  colmax = jnp.max(jnp.abs(x), axis=0)
  if axis_name is not None:
    colmax = lax.pmax(colmax, axis_name)
  zero = colmax == 0
  _, exponent = jnp.frexp(jnp.where(zero, 1.0, colmax))
  scale = jnp.ldexp(jnp.ones((r,), _F32), -jnp.clip(exponent, -125, 125))
  rows, cols = _row_ids(n_local, r, axis_name)
  eye = (rows == cols).astype(_F32)
  return jnp.where(zero[None, :], eye, x * scale[None, :]), jnp.all(jnp.isfinite(colmax))


class _Flags(NamedTuple):
  """What one Cholesky-QR sweep does (bools: static in a schedule, traced in the loop)."""

  shifted: object  # shift the Gram matrix (``_shift``)
  safe: object  # deflate failing columns (safe path); else any failure rejects the attempt
  first: object  # first sweep of an attempt: reset its bookkeeping
  restart: object  # start from the input (dependent columns replaced by their stand-ins)
  decide: object  # safe path: this sweep's pivots decide which columns are dependent
  last: object  # last sweep of an attempt: accept its result, or go on to the next attempt


def _fast_attempt(shifted, *, restart=True):
  """The flags of one fast attempt's sweeps (``shifted``: one bool per sweep)."""
  n = len(shifted)
  return [_Flags(sh, False, k == 0, restart and k == 0, False, k == n - 1)
          for k, sh in enumerate(shifted)]


_CHOLESKY_QR2 = (False, False)  # the fast path's first attempt: two plain sweeps
_DECIDE = (True, True, False)  # shifted?, per sweep, before the rank decision
_FINISH = (True, True, False, False)  # on the input with dependent columns replaced
# The safe path: sweeps 1-3 decide the rank, sweeps 4-7 orthonormalise the repaired input.
_SAFE = [_Flags(shifted, True, k in (0, len(_DECIDE)), k in (0, len(_DECIDE)),
                k == len(_DECIDE) - 1, k == len(_DECIDE + _FINISH) - 1)
         for k, shifted in enumerate(_DECIDE + _FINISH)]


def _schedule(passes):
  """Every sweep ``_basis`` may run, in order: CholeskyQR2, the second attempt, the safe path."""
  rows = _fast_attempt(_CHOLESKY_QR2, restart=False)  # the loop starts from the input
  if passes > 2:  # the second attempt: ``passes`` sweeps, the first ``passes - 2`` shifted
    rows += _fast_attempt((True,) * (passes - 2) + _CHOLESKY_QR2)
  return rows + _SAFE


def _sweep(y, keep, t_diag, rho, finite, flags, axis_name):
  """One Cholesky-QR sweep ``Y <- Y R^-1`` of one matrix, for either path.

  Every sweep factors the column-equilibrated Gram matrix (unit diagonal; the
  spike-safe diagonal of ``_accurate_gram`` in an attempt's last sweep and on
  the safe path), shifted where ``flags.shifted``.
  Fast path (``safe`` false): any column whose pivot is not positive, or a
  non-finite ``R^-1``, makes the attempt fail (``finite``); ``rho`` tracks the
  diagonal of the R factor of the equilibrated input (sweep 1's, then the later
  sweeps' own R, un-equilibrated). Safe path: such columns are deflated (output
  zero, ``keep`` false), and on the ``decide`` sweep a column whose independent
  part, ``t_diag * nu * l_jj`` (``xs / |xs| = y T``, ``nu_j = |y[:, j]|``), is
  below ``RANK_TOL`` counts as dependent. With every column kept the safe
  formulas reduce to the fast ones. Returns the new ``(y, keep, t_diag, rho,
  finite)`` and the sweep's Gram matrix (the acceptance test reads the last).
  """
  r = y.shape[1]
  g = _accurate_gram(y, axis_name, flags.last | flags.safe)
  norm2 = jnp.diagonal(g)
  live = keep & (norm2 > 0)
  dinv = jnp.where(live, lax.rsqrt(jnp.where(live, norm2, 1.0)), 0.0)
  nu = jnp.where(live, jnp.sqrt(norm2), 1.0)
  t_diag = jnp.where(flags.first, 1.0 / nu, t_diag)
  ge = g * dinv[:, None] * dinv[None, :] + jnp.diag(jnp.where(live, 0.0, 1.0))
  s = jnp.where(flags.shifted, _shift(ge), 0.0)
  ge = ge + s * jnp.eye(r, dtype=_F32)
  rank_floor = jnp.where(flags.decide, (RANK_TOL / (t_diag * nu)) ** 2, 0.0)
  # A shifted pivot is >= s in exact arithmetic; a plain one is relative to 1.
  safe_thresholds = jnp.where(flags.shifted, 0.5 * s, jnp.maximum(PIVOT_TOL, rank_floor))
  thresholds = jnp.where(live, jnp.where(flags.safe, safe_thresholds, 0.0), jnp.inf)
  l, linv, bad = _cholesky_and_inverse(ge, thresholds)
  ldiag = jnp.diagonal(l)
  keep = jnp.where(flags.safe, live & ~bad, keep)
  rinv = dinv[:, None] * linv.T
  ok = ~jnp.any(bad) & jnp.all(jnp.isfinite(rinv))
  finite = jnp.where(flags.first, True, finite) & ok
  rho = (jnp.where(flags.first, 1.0, rho) * ldiag
         * jnp.where(flags.first, 1.0, 1.0 / jnp.where(live, dinv, 1.0)))
  t_diag = t_diag * nu * ldiag
  # Deflated columns are zeroed through R^-1 (r x r), not by a pass over the tall output.
  y = _times(y, rinv * keep[None, :].astype(_F32))
  return (y, keep, t_diag, rho, finite), g


def _accepted(g_last, rho, finite):
  """The fast path's acceptance test (module docstring, step 3)."""
  eye = jnp.eye(g_last.shape[-1], dtype=_F32)
  near_identity = jnp.sqrt(jnp.sum((g_last - eye) ** 2, axis=(-2, -1))) <= ACCEPT_TOL
  return finite & near_identity & jnp.all(rho > RANK_TOL, axis=-1)


def _restart_and_sweep(sweep, y, state, flags, xs, axis_name):
  """``sweep`` after a restart where ``flags.restart``: ``y`` becomes the input, its columns
  not kept replaced by their stand-ins (computed only then), and every column is kept.

  ``sweep`` is ``_sweep`` or its batched form (``y``, ``xs``: ``(..., n, r)``); returns
  ``(y, state, g)``.
  """
  def restarted():
    stand_ins = _completion_columns(*xs.shape[-2:], axis_name)
    return jnp.where(state[0][..., None, :], xs, stand_ins)

  y = lax.cond(flags.restart, restarted, lambda: y)
  (y, *state), g = sweep(y, state[0] | flags.restart, *state[1:], flags)
  return y, tuple(state), g


def _init_state(xs):
  r = xs.shape[-1]
  lead = xs.shape[:-2]
  return (jnp.ones((*lead, r), bool), jnp.ones((*lead, r), _F32),
          jnp.ones((*lead, r), _F32), jnp.ones(lead, bool))


def _run_attempt(xs, rows, axis_name):
  """The sweeps of ``rows`` on one matrix, in one ``lax.scan`` (one compiled body).

  Returns ``(y, accepted)``. ``_basis`` runs every attempt in one loop instead; this
  runs one attempt alone (the independent paths the tests compare it with).
  """
  params = _Flags(*(jnp.asarray(column, bool) for column in zip(*rows)))
  sweep = functools.partial(_sweep, axis_name=axis_name)

  def step(carry, flags):
    y, state, g = _restart_and_sweep(sweep, *carry, flags, xs, axis_name)
    return (y, state), g

  (y, (_, _, rho, finite)), grams = lax.scan(step, (xs, _init_state(xs)), params)
  return y, _accepted(grams[-1], rho, finite)


def _fast_path(xs, shifted, axis_name):
  """One fast attempt alone (``shifted``: a flag per sweep); returns ``(q, accepted)``."""
  return _run_attempt(xs, _fast_attempt(shifted, restart=False), axis_name)


def _safe_path(xs, axis_name):
  """The safe path alone: dependent columns replaced by fixed pseudo-random ones, then a
  guarded CholeskyQR4.

  Seven Cholesky-QR sweeps, all with the deflating Cholesky, an equilibrated Gram
  matrix and the spike-safe diagonal. Sweeps 1-3 (shifted, shifted, plain) only
  decide which columns are dependent: after the two shifts a direction of relative
  size ``rho`` has grown to ``~ rho / s``, and the plain sweep deflates column j
  when its independent part is below ``RANK_TOL`` (``_sweep``). Sweep 4 restarts
  from the input with those columns replaced (so no kept column has been
  orthogonalised against a dropped one) and sweeps 4-7 (shifted, shifted, plain,
  plain) orthonormalise it.
  """
  return _run_attempt(xs, _SAFE, axis_name)[0]


@functools.partial(jax.jit, static_argnames=("passes", "axis_name"))
def _basis(m, passes, axis_name):
  """Returns ``(q, fast)``: the basis and whether the fast path's result was kept.

  ``m`` may have leading batch axes: the matrices are then orthonormalised
  together (one batched program, whatever their number). Every sweep of every
  attempt runs in one ``lax.while_loop`` with one compiled body (``_sweep``,
  batched), its flags read from the schedule (``_schedule``; module docstring,
  step 5). After the last sweep of a fast attempt the loop stops when every
  matrix of the batch has been accepted (by this attempt or an earlier one,
  whose result it keeps); otherwise the next attempt runs, for all of them. A
  batch-wide decision, not a per-matrix select, which would run every attempt
  every time.
  """
  shape = m.shape
  ms = m.reshape((-1, *shape[-2:]))
  xs, finite_input = jax.vmap(lambda x: _prepare(x, axis_name))(ms)
  rows = _schedule(passes)
  table = _Flags(*(jnp.asarray(column, bool) for column in zip(*rows)))
  sweep = jax.vmap(functools.partial(_sweep, axis_name=axis_name),
                   in_axes=(0, 0, 0, 0, 0, None))
  none = jnp.zeros(xs.shape[:1], bool)

  def body(carry):
    k, y, state, kept_q, stored, accepted = carry
    flags = _Flags(*(column[k] for column in table))
    y, state, g = _restart_and_sweep(sweep, y, state, flags, xs, axis_name)
    fast_end = flags.last & ~flags.safe
    newly = fast_end & _accepted(g, state[2], state[3]) & ~accepted
    accepted = accepted | newly
    done = flags.last & (flags.safe | jnp.all(accepted))
    # Keep the matrices accepted now apart while the others try again.
    kept_q, stored = lax.cond(
        jnp.any(newly) & ~done,
        lambda: (jnp.where(newly[:, None, None], y, kept_q), stored | newly),
        lambda: (kept_q, stored))
    k = jnp.where(done, len(rows), k + 1)
    return k, y, state, kept_q, stored, accepted

  init = (jnp.int32(0), xs, _init_state(xs), jnp.zeros_like(xs), none, none)
  _, y, _, kept_q, stored, fast = lax.while_loop(lambda c: c[0] < len(rows), body, init)
  # The safe path would turn NaN columns into stand-ins: keep garbage visible.
  q = jnp.where(stored[:, None, None], kept_q, y)
  q = jnp.where(finite_input[:, None, None], q, jnp.nan)
  return q.reshape(shape), fast.reshape(shape[:-2])


def _check(m, passes, axis_name):
  """Validates arguments (before tracing); returns ``axis_name`` made hashable."""
  if isinstance(axis_name, list):
    axis_name = tuple(axis_name)
  shape = tuple(jnp.shape(m))
  if len(shape) > 2:  # a batch of matrices
    shape = shape[-2:]
  if axis_name is not None and len(shape) == 2:
    # Inside shard_map ``m`` is a block of rows: the global matrix must be tall.
    shape = (shape[0] * lax.axis_size(axis_name), shape[1])
  _checks.check_tall_matrix("m", shape)
  dtype = m.dtype if hasattr(m, "dtype") else jnp.result_type(m)
  if not jnp.issubdtype(dtype, jnp.floating):
    # Same refusal as basis.orthonormal_basis (integers would be cast silently).
    raise ValueError(f"m must have a real floating dtype, got {jnp.dtype(dtype).name}")
  if isinstance(passes, bool) or not isinstance(passes, int) or passes < 2:
    raise ValueError(f"passes must be an integer >= 2, got {passes!r}")
  return axis_name


def gram_orthonormal_basis(
    m: jax.Array, *, passes: int = 3, axis_name: AxisName | None = None
) -> jax.Array:
  """Orthonormal columns spanning the columns of ``m``, from ``r x r`` Gram matrices only.

  Same result as ``basis.orthonormal_basis`` (the thin-QR factor with a
  non-negative diagonal of ``R``, up to rounding for full-rank ``m``), but a
  row-sharded ``m`` is never gathered: see the module docstring.

  Args:
    m: a ``(n, r)`` matrix with ``n >= r``, any float dtype, or a batch
      ``(..., n, r)`` of such matrices (orthonormalised in one batched
      program: the way to handle many adapters of one shape). Inside
      ``shard_map`` with ``axis_name``: this device's block of rows of such a
      matrix (a block may have fewer than ``r`` rows).
    passes: Cholesky-QR sweeps of the fast path's second attempt (each: one
      ``r x r`` all-reduce and two ``n r^2`` matmuls), run when its first,
      CholeskyQR2 (condition numbers up to ~1e3 in float32), is not accepted.
      ``2``: no second attempt; ``3`` (default): shifted CholeskyQR3 (~1e6);
      ``4`` shifts twice. Whatever the value, inputs the fast path cannot
      handle go to the safe path, so the result is orthonormal anyway;
      ``passes`` only trades fast-path cost against how often the safe path
      runs (such a call costs about 3-4x a fast one). Under ``vmap`` with a
      batched decision the loop runs as long as its slowest matrix needs, for
      all of them: pass a batch instead.
    axis_name: mesh axis name(s) over which the rows of ``m`` are split, for use
      inside ``shard_map``; Gram matrices are ``psum``-ed over it. ``None``
      (default) under ``jit`` with sharded inputs, where XLA inserts the
      all-reduces itself.

  Returns:
    ``q`` of shape ``m.shape`` (the local block under ``shard_map``), float32,
    with ``q.T @ q = I``. Non-finite input gives non-finite output.

  Raises:
    ValueError: if ``m`` has fewer than 2 axes, has more columns than rows, has a
      non-floating dtype, or ``passes`` is not an integer >= 2.
  """
  axis_name = _check(m, passes, axis_name)
  return _basis(m, passes, axis_name)[0]


def gram_qr(
    m: jax.Array, *, passes: int = 3, axis_name: AxisName | None = None
) -> tuple[jax.Array, jax.Array]:
  """``(q, r)`` with ``q = gram_orthonormal_basis(m)`` and ``r = triu(q.T @ m)``.

  ``r`` is ``r x r``, replicated (``psum``-ed over ``axis_name``), upper
  triangular with non-negative diagonal, and ``m = q @ r`` up to rounding. Costs
  one more ``n r^2`` matmul and ``r x r`` all-reduce than the basis alone.
  """
  axis_name = _check(m, passes, axis_name)
  q = _basis(m, passes, axis_name)[0]
  m32 = jnp.asarray(m, _F32)
  if m.ndim == 2:
    return q, jnp.triu(_cross(q, m32, axis_name))
  batch = m.shape[:-2]
  q3, m3 = q.reshape((-1, *m.shape[-2:])), m32.reshape((-1, *m.shape[-2:]))
  r = jax.vmap(lambda y, z: _cross(y, z, axis_name))(q3, m3)
  return q, jnp.triu(r).reshape((*batch, m.shape[-1], m.shape[-1]))
