"""Temporary memory of an adapted train step under ``jax.checkpoint`` policies.

A stack of ``layers`` GELU layers ``gelu(h @ K [+ adapter(h)])`` of width ``d`` on
``tokens`` activations, each layer wrapped in ``jax.checkpoint(policy=...)`` (or not).
XLA's ``memory_analysis().temp_size_in_bytes`` of the compiled gradient, for:

* ``plain``: the frozen model, gradient with respect to its input (the backward pass alone);
* ``full``: full fine-tuning (gradient with respect to every kernel);
* ``lora`` / ``sds``: this library's adapters (gradient with respect to the adapters), each
  layer ``sl.adapted_matmul``: with the rank-r op (``sl.merging("never")``) and as one
  merged op (``"always"``; ``"auto"`` merges here: 4,096 tokens >= d).

Compile-only (nothing runs), a few seconds::

  python -m experiments.remat_memory
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags

import sdslora_jax as sl
from experiments import cli

POLICIES = {
    "no remat": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def temp_mib(layers: int, d: int, tokens: int, rank: int) -> dict[str, dict[str, float]]:
  keys = jax.random.split(jax.random.key(0), 2 * layers + 1)
  kernels = [jax.random.normal(keys[i], (d, d)) / d**0.5 for i in range(layers)]
  x = jax.random.normal(keys[-1], (tokens, d))

  def adapters(method):
    extra = {"sds_on": True} if method == "sds" else {}
    return [sl.init_adapter(keys[layers + i], d, d, rank=rank, scale=1.0, method=method, **extra)
            for i in range(layers)]

  def layer(h, kernel, adapter):
    return jax.nn.gelu(h @ kernel if adapter is None else sl.adapted_matmul(h, kernel, adapter))

  def loss(h, ks, ads, policy):
    f = layer if policy is None else jax.checkpoint(layer, policy=policy)
    for kernel, adapter in zip(ks, ads):
      h = f(h, kernel, adapter)
    return jnp.mean(h**2)

  def temp(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20

  out = {}
  for name, policy in POLICIES.items():
    none = [None] * layers
    out[name] = {
        "plain": temp(jax.grad(lambda x, ks: loss(x, ks, none, policy)), x, kernels),
        "full": temp(jax.grad(lambda ks, x: loss(x, ks, none, policy)), kernels, x),
    }
    for m in ("lora", "sds"):
      for mode in ("never", "always"):
        with sl.merging(mode):
          out[name][f"{m}_{mode}"] = temp(jax.grad(lambda a, ks, x: loss(x, ks, a, policy)),
                                          adapters(m), kernels, x)
  return out


FLAGS = flags.FlagValues()
flags.DEFINE_integer("layers", 4, "Layers of the stack.", flag_values=FLAGS)
flags.DEFINE_integer("d", 512, "Width.", flag_values=FLAGS)
flags.DEFINE_integer("tokens", 4096, "Activations (tokens).", flag_values=FLAGS)
flags.DEFINE_integer("rank", 8, "Adapter rank.", flag_values=FLAGS)


def main(argv=None) -> None:
  args = cli.parse(FLAGS, argv)
  rows = temp_mib(args.layers, args.d, args.tokens, args.rank)
  act = args.tokens * args.d * 4 / 2**20
  print(f"temporary MiB, {args.layers} layers, d = {args.d}, {args.tokens} tokens, rank "
        f"{args.rank} (one activation = {act:.1f} MiB)")
  print("| policy | plain (dx only) | full | LoRA: rank-r op / merged | SDS-LoRA: rank-r op / "
        "merged |\n|---|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['plain']:.1f} | {r['full']:.1f} | {r['lora_never']:.1f} / "
          f"{r['lora_always']:.1f} | {r['sds_never']:.1f} / {r['sds_always']:.1f} |")


if __name__ == "__main__":
  cli.run(main, FLAGS)
