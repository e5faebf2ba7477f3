"""What SDS-LoRA with implicit bases would cost: a measured design proposal, not library code.

The library stores the bases ``qa = orth(a)``, ``qb = orth(b.T)`` as tall ``(d, r)`` arrays and
``sds_lora`` recomputes them after every update (a Cholesky-QR of every factor: four tall
matmuls each). At fresh bases they need not be tall. With ``Ra`` the Cholesky factor of
``a.T a`` (the R of ``a``'s thin QR) and ``Rb`` that of ``b b.T``, ``qa = a Ra^-1`` and
``qb = b.T Rb^-1``, so the SDS update and its gradients are LoRA's with ``r x r`` matrices in
between::

  dK    = s (qa b + a qb.T)  = s a (Ra^-1 + Rb^-T) b
  dL/db = s qa.T G           = s Ra^-T (x a).T dy
  dL/da = s G qb             = s x.T (dy b.T) Rb^-1

An adapter would then store ``Ra^-1`` and ``Rb^-1`` (``r x r``), and the refresh would be one
Gram matrix per factor and an ``r x r`` Cholesky. The price is exactness: a basis from one
Cholesky of a float32 Gram matrix is orthonormal to about ``u cond(a)^2``, where the Gram QR's
two sweeps reach ``u`` for ``cond(a)`` up to ~1e3.

This script measures both sides, side by side in one process:

* the train step of a stack of ``layers`` ReLU layers ``relu(x K + adapter(x))`` (float32, AdamW,
  ``tokens`` rows of width ``d``): LoRA and implicit-basis SDS-LoRA written with the same
  ``jax.custom_vjp`` structure, the SDS step refreshing ``Ra^-1``, ``Rb^-1`` after every update;
  interleaved steps, medians, compile times;
* the orthonormality ``max |Q^T Q - I|`` of the implicit basis against the library's
  ``orthonormal_basis`` (Gram QR) for factors of given condition numbers.

The warm-up switch, the stamps and the sign alignment of ``sds_lora`` are left out of the
prototype step (they cost little at run time; see the README's "Performance").

Run::

  python -m experiments.implicit_bases                      # d = 1024, ranks 8, 16, 64
  python -m experiments.implicit_bases --tokens 2048 --ranks 64
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax import lax

import sdslora_jax as sl
from experiments import cli
from sdslora_jax import gram_basis

_HI = lax.Precision.HIGHEST


def r_inverse(m: jax.Array) -> jax.Array:
  """``R^-1`` (upper triangular, ``r x r``) with ``R^T R = m.T m``: one Gram matrix, one Cholesky.

  The Cholesky is the library's ``jax.numpy`` loop (no LAPACK, whose OpenBLAS threads slow the
  step's other matmuls on CPU; see ``sdslora_jax.gram_basis``).
  """
  g = lax.dot_general(m, m, (((0,), (0,)), ((), ())), precision=_HI)
  _, l_inv, _ = gram_basis._cholesky_and_inverse(g, jnp.zeros((g.shape[0],), jnp.float32))
  return l_inv.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def implicit_sds_matmul(x, a, b, ra_inv, rb_inv, scale):
  """``x @ (s (qa b + a qb.T))`` with ``qa = a ra_inv``, ``qb = b.T rb_inv``; SDS gradients."""
  return scale * ((x @ a) @ (ra_inv + rb_inv.T)) @ b


def _implicit_fwd(x, a, b, ra_inv, rb_inv, scale):
  return implicit_sds_matmul(x, a, b, ra_inv, rb_inv, scale), (x, a, b, ra_inv, rb_inv)


def _implicit_bwd(scale, res, dy):
  x, a, b, ra_inv, rb_inv = res
  h, u = x @ a, dy @ b.T
  da = scale * (x.T @ (u @ rb_inv))  # s G qb
  db = scale * (ra_inv.T @ (h.T @ dy))  # s qa.T G
  dx = scale * ((u @ (ra_inv + rb_inv.T).T) @ a.T)
  return dx, da, db, jnp.zeros_like(ra_inv), jnp.zeros_like(rb_inv)


implicit_sds_matmul.defvjp(_implicit_fwd, _implicit_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_matmul(x, a, b, scale):
  """``s (x a) b`` with its backward written out the same way (the baseline)."""
  return scale * (x @ a) @ b


def _lora_fwd(x, a, b, scale):
  return lora_matmul(x, a, b, scale), (x, a, b)


def _lora_bwd(scale, res, dy):
  x, a, b = res
  u = dy @ b.T
  return scale * (u @ a.T), scale * (x.T @ u), scale * ((x @ a).T @ dy)


lora_matmul.defvjp(_lora_fwd, _lora_bwd)


def step_times(d: int, rank: int, tokens: int, layers: int, repeats: int) -> dict[str, float]:
  """Median step times and compile times (s), first and last losses, of both variants."""
  scale = 2.0
  keys = jax.random.split(jax.random.key(0), 3 * layers + 1)
  kernels = jnp.stack([jax.random.normal(keys[i], (d, d)) / d**0.5 for i in range(layers)])
  factors = {
      "a": jnp.stack([jax.random.normal(keys[layers + i], (d, rank)) / d**0.5
                      for i in range(layers)]),
      "b": jnp.stack([jax.random.normal(keys[2 * layers + i], (rank, d)) * 0.01
                      for i in range(layers)]),
  }
  x = jax.random.normal(keys[-1], (tokens, d))
  target = jnp.zeros((tokens, d))
  tx = optax.adamw(1e-4)

  def forward(p, layer_op):
    h = x
    for i in range(layers):
      h = jax.nn.relu(h @ kernels[i] + layer_op(h, i, p))
    return jnp.mean((h - target) ** 2)

  def lora_loss(p):
    return forward(p, lambda h, i, p: lora_matmul(h, p["a"][i], p["b"][i], scale))

  def sds_loss(p, inv):
    return forward(p, lambda h, i, p: implicit_sds_matmul(
        h, p["a"][i], p["b"][i], inv[0][i], inv[1][i], scale))

  def refreshed(p):
    return (jax.vmap(r_inverse)(p["a"]), jax.vmap(r_inverse)(jnp.swapaxes(p["b"], 1, 2)))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def lora_step(p, state):
    loss, g = jax.value_and_grad(lora_loss)(p)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state, loss

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def sds_step(p, inv, state):
    loss, g = jax.value_and_grad(sds_loss)(p, inv)
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    return p, refreshed(p), state, loss  # the refresh: Ra^-1, Rb^-1 of the updated factors

  copy = lambda t: jax.tree.map(jnp.copy, t)
  states = {"lora": [copy(factors), tx.init(factors)],
            "sds": [copy(factors), refreshed(factors), tx.init(factors)]}
  out, compiled = {}, {}
  for name, fn in (("lora", lora_step), ("sds", sds_step)):
    t0 = time.perf_counter()
    compiled[name] = fn.lower(*states[name]).compile()
    out[f"{name}_compile_s"] = time.perf_counter() - t0
  times = {"lora": [], "sds": []}
  for k in range(repeats + 2):
    for name, args in states.items():
      t0 = time.perf_counter()
      *state, loss = compiled[name](*args)
      jax.block_until_ready((state, loss))
      if k >= 2:  # two warm-up steps
        times[name].append(time.perf_counter() - t0)
      args[:] = state
      out.setdefault(f"{name}_first_loss", float(loss))
      out[f"{name}_loss"] = float(loss)
  for name, t in times.items():
    out[f"{name}_step_s"] = float(np.median(t))
  return out


def orthonormality(cond: float, n: int = 1024, rank: int = 16, seed: int = 0) -> dict[str, float]:
  """``max |Q^T Q - I|`` of the implicit basis ``a Ra^-1`` and of ``sl.orthonormal_basis(a)``."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (n, rank)))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (rank, rank)))
  a = (u * jnp.logspace(0.0, -np.log10(cond), rank)) @ v.T
  eye = jnp.eye(rank)
  q_implicit = a @ r_inverse(a)
  q_gram = sl.orthonormal_basis(a)
  err = lambda q: float(jnp.max(jnp.abs(q.T @ q - eye)))
  return {"implicit": err(q_implicit), "gram_qr": err(q_gram)}


FLAGS = flags.FlagValues()
flags.DEFINE_integer("d", 1024, "Width of the stack.", flag_values=FLAGS)
flags.DEFINE_multi_integer("ranks", [8, 16, 64], "Ranks (repeat the flag).", flag_values=FLAGS)
flags.DEFINE_integer("tokens", 512, "Rows of activations.", flag_values=FLAGS)
flags.DEFINE_integer("layers", 4, "Layers of the stack.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 30, "Interleaved timed steps per variant.", flag_values=FLAGS)


def main(argv=None) -> None:
  args = cli.parse(FLAGS, argv)
  print(f"train step, {args.layers} layers, d = {args.d}, {args.tokens} tokens, float32, "
        f"{jax.devices()[0].platform}")
  print("| rank | LoRA step (ms) | implicit SDS / LoRA | compile (s): LoRA / implicit SDS |")
  print("|---|---|---|---|")
  for rank in args.ranks:
    t = step_times(args.d, rank, args.tokens, args.layers, args.repeats)
    print(f"| {rank} | {t['lora_step_s'] * 1e3:.1f} | {t['sds_step_s'] / t['lora_step_s']:.3f} | "
          f"{t['lora_compile_s']:.2f} / {t['sds_compile_s']:.2f} |", flush=True)
  print("\nmax |Q^T Q - I|, (1024, 16) factors")
  print("| cond(a) | implicit basis | Gram QR (library) |\n|---|---|---|")
  for cond in (1e1, 1e2, 1e3, 1e4):
    e = orthonormality(cond)
    print(f"| {cond:.0e} | {e['implicit']:.1e} | {e['gram_qr']:.1e} |")


if __name__ == "__main__":
  cli.run(main, FLAGS)
