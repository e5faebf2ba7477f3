"""QLoRA: adapted train steps on a quantized frozen base against the same step on a float base.

``python -m experiments.qlora_bench [--quick] [--json] [--steps 50]``

Two models, each with LoRA and SDS-LoRA adapters on the op-level path
(``sdslora_jax.intercept``), the frozen base stored as float32, int8 (per output
channel) and nf4 / int4 (per output channel and per 64 input rows):

* a stack of four ``d x d`` dense layers (d = 1024), regression on a teacher that is
  the float stack plus a rank-8 update;
* a small Gemma 4 decoder from the installed ``gemma`` package (unedited), next-token
  prediction of a perturbed float teacher;
* with ``--models maxtext``, MaxText's decoder from the installed ``maxtext`` (unedited,
  layers scanned on axis 1), float and int8 bases, the same task.

Each model also runs ``full``: full fine-tuning of the float model (the "x full" columns).

Printed per model and variant: the quantized kernels' device bytes against bfloat16 and
float32 (scales included, 4-bit codes packed two per byte), the step time, XLA's
temporary memory and the step's peak (arguments, outputs and temporaries) against the
float-base step with the same adapters (same process, interleaved repeats), and the
loss after ``--steps`` updates against the float run with the same seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from experiments import cli
from experiments import quantize
from experiments.step_overhead import Variant, measure, train_step
from sdslora_jax import intercept, quantized, tree
from sdslora_jax.adapter import is_adapter
from sdslora_jax.optim import sds_lora
from sdslora_jax.targets import path_str, rule


LR = 1e-3
TYPES = ("none", "int8", "nf4", "int4")


def _dense_model(d: int, layers: int, tokens: int):
  keys = jax.random.split(jax.random.key(0), layers)
  params = {f"layer_{i}": {"kernel": jax.random.normal(k, (d, d)) / np.sqrt(d),
                           "bias": jnp.zeros((d,))} for i, k in enumerate(keys)}

  def fn(p, x):
    p = quantize.dequantized(p)
    for i in range(layers):
      x = jax.nn.gelu(x @ p[f"layer_{i}"]["kernel"] + p[f"layer_{i}"]["bias"])
    return x

  x = jax.random.normal(jax.random.key(1), (tokens // 128, 128, d))
  rules = lambda method: [rule(r"layer_\d+/kernel", method=method, rank=8, alpha=16.0)]
  select = lambda path, v: path.endswith("kernel")
  teacher = tree.merge(params, _random_update(fn, params, rules("lora"), x))
  y = fn(teacher, x)
  loss = lambda out, y: jnp.mean((out - y) ** 2)
  return fn, params, rules, select, x, y, loss


def _gemma_model(tokens: int):
  from gemma import gm
  cfg = gm.nn.config.TransformerConfig(
      num_embed=512, embed_dim=256, hidden_dim=1024, num_heads=4, head_dim=64,
      num_kv_heads=2, final_logit_softcap=None, use_post_attn_norm=False,
      use_post_ffw_norm=False, attention_types=(gm.nn.AttentionType.GLOBAL,) * 2)
  model = gm.nn.Transformer(config=cfg, dtype=jnp.float32)
  t = jax.random.randint(jax.random.key(1), (tokens // 128, 128), 1, 512, dtype=jnp.int32)
  params = model.init(jax.random.key(0), t)["params"]

  def fn(p, t):
    return model.apply({"params": quantize.dequantized(p)}, t).logits

  pattern = r"layer_\d+/(attn/(q_einsum|kv_einsum|attn_vec_einsum)/w|mlp/(gating_einsum|linear))"
  rules = lambda method: [rule(pattern, method=method, rank=8, alpha=16.0)]
  select = lambda path, v: re.fullmatch(pattern, path) is not None
  teacher = tree.merge(params, _random_update(fn, params, rules("lora"), t))
  y = jnp.argmax(fn(teacher, t), -1)
  loss = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return fn, params, rules, select, t, y, loss


def _maxtext_model(tokens: int):
  """MaxText's decoder (installed ``maxtext``, unedited), 2 scanned layers on axis 1."""
  import flax.linen as nn
  from maxtext.configs import pyconfig
  from maxtext.utils import maxtext_utils, model_creation_utils
  seq = 128
  config = pyconfig.initialize(
      [""], run_name="bench", base_output_directory="/tmp/sdslora_maxtext", hardware="cpu",
      skip_jax_distributed_system=True, enable_checkpointing=False, log_config=False,
      scan_layers=True, param_scan_axis=1, base_num_decoder_layers=2, base_emb_dim=256,
      base_mlp_dim=1024, base_num_query_heads=4, base_num_kv_heads=2, head_dim=64,
      vocab_size=512, max_target_length=seq, per_device_batch_size=tokens // seq,
      dtype="float32", weight_dtype="float32", attention="dot_product", remat_policy="full")
  mesh = maxtext_utils.get_mesh_from_config(config, devices=np.array(jax.devices()[:1]))
  model = model_creation_utils.from_config(config, mesh=mesh)
  t = jax.random.randint(jax.random.key(1), (tokens // seq, seq), 1, 512, dtype=jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), t.shape)

  @contextlib.contextmanager
  def context():
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.logical_axis_rules):
      yield

  with context():
    params = nn.unbox(model.init({"params": jax.random.key(0)}, t, pos,
                                 enable_dropout=False)["params"])

  def fn(p, x):
    return model.apply({"params": quantize.dequantized(p)}, *x, enable_dropout=False)

  pattern = r"decoder/layers/(self_attention/(query|key|value|out)|mlp/(wi_0|wi_1|wo))/kernel"
  rules = lambda method: [rule(pattern, method=method, rank=8, alpha=16.0)]
  select = lambda path, v: re.fullmatch(pattern, path) is not None
  with context():
    teacher = tree.merge(params, _random_update(fn, params, rules("lora"), (t, pos)))
    y = jnp.argmax(fn(teacher, (t, pos)), -1)
  loss = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return fn, params, rules, select, (t, pos), y, loss, context


def _random_update(fn, params, rules, x):
  """LoRA adapters with random up factors: a rank-8 change of the model to learn."""
  ads = intercept.init_adapters(jax.random.key(9), fn, params, rules, x)
  leaves, treedef = jax.tree.flatten(ads, is_leaf=is_adapter)
  leaves = [dataclasses.replace(ad, b=0.5 * jax.random.normal(jax.random.key(i), ad.b.shape))
            for i, ad in enumerate(leaves)]
  return jax.tree.unflatten(treedef, leaves)


def variants(model: str, quick: bool) -> tuple[list[Variant], dict, Any]:
  """The variants, the kernels' byte counts per base type, and the context to compile in."""
  if model == "maxtext":
    fn, params, rules, select, x, y, loss, context = _maxtext_model(256 if quick else 1024)
    with context():
      out, info = _variants(fn, params, rules, select, x, y, loss, types=("none", "int8"))
    return out, info, context
  if model == "dense":
    fn, params, rules, select, x, y, loss = _dense_model(512 if quick else 1024, 4,
                                                          512 if quick else 2048)
  else:
    fn, params, rules, select, x, y, loss = _gemma_model(256 if quick else 1024)
  out, info = _variants(fn, params, rules, select, x, y, loss)
  return out, info, contextlib.nullcontext


def _variants(fn, params, rules, select, x, y, loss, types=TYPES):
  lays = intercept.layouts(fn, params, rules("lora"), x)
  in_axes = {p: lay.in_axes for p, lay in lays.items()}
  # Full fine-tuning of the float model: the cost the adapted steps should undercut.
  full_loss = lambda p, frozen, batch: loss(fn(p, batch["x"]), batch["y"])  # noqa: E731
  full_params = jax.tree.map(jnp.copy, params)  # donated by its step; the bases keep theirs
  out = [Variant("full", train_step(full_loss, optax.adamw(LR)), full_params,
                 optax.adamw(LR).init(full_params), {}, {"x": x, "y": y})]
  info = {}
  for qtype in types:
    base = params if qtype == "none" else quantize.quantize_base(
        params, qtype, 64, select=select, in_axes=in_axes)
    flat = jax.tree_util.tree_flatten_with_path(
        base, is_leaf=lambda z: quantized.stored(z) is not None)[0]
    kernels = [v for kp, v in flat if select(path_str(kp), v)]
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(quantized.logical(kernels)))
    info[qtype] = {"kernel_bytes": quantize.device_bytes(kernels), "kernel_params": n,
                   "base_bytes": quantize.device_bytes(base)}
    for method in ("lora", "sds"):
      ads = intercept.init_adapters(jax.random.key(1), fn, base, rules(method), x)
      tx = sds_lora(optax.adamw(LR), warmup_steps=10) if method == "sds" else optax.adamw(LR)
      step_loss = lambda a, b, batch: loss(intercept.apply(fn, b, a, batch["x"]), batch["y"])
      name = method if qtype == "none" else f"{method}_{qtype}"
      out.append(Variant(name, train_step(step_loss, tx), ads, tx.init(ads), base,
                         {"x": x, "y": y}))
  return out, info


def run(model: str, quick: bool, steps: int, log) -> list[dict]:
  vs, info, context = variants(model, quick)
  with context():  # MaxText traces and compiles under its mesh and logical axis rules
    rows = measure(vs, steps - 2, log)  # two warm-up steps: ``steps`` updates in all
  by = {r["method"]: r for r in rows}
  for r in rows:
    method, _, qtype = r["method"].partition("_")
    qtype = qtype or "none"
    ref = by[method]
    bf16 = info["none"]["kernel_params"] * 2
    r.update(model=model, base=qtype, adapter=method,
             kernel_bytes=info[qtype]["kernel_bytes"], base_bytes=info[qtype]["base_bytes"],
             kernel_bytes_vs_bf16=info[qtype]["kernel_bytes"] / bf16,
             kernel_bytes_vs_f32=info[qtype]["kernel_bytes"] / (2 * bf16),
             step_vs_float_base=r["step_time_median_s"] / ref["step_time_median_s"],
             temp_vs_float_base=(r["temp_bytes"] / ref["temp_bytes"]
                                 if r["temp_bytes"] and ref["temp_bytes"] else None),
             peak_vs_float_base=(r["peak_bytes"] / ref["peak_bytes"]
                                 if r["peak_bytes"] and ref["peak_bytes"] else None),
             loss_vs_float_base=r["last_loss"] / ref["last_loss"], steps=steps)
  return rows


def table(rows: Sequence[dict]) -> str:
  head = ("| model | base | adapter | kernels MiB | x bf16 | x f32 | step ms | x float base "
          "| x full | temp MiB | x float base | x full | peak MiB | x float base "
          "| loss first -> last | x float base |")
  lines = [head, "|" + "---|" * 16]
  full = {r["model"]: r for r in rows if r["adapter"] == "full"}
  for r in rows:
    f = full.get(r["model"])
    temp_full = (r["temp_bytes"] / f["temp_bytes"] if f and r["temp_bytes"] and f["temp_bytes"]
                 else float("nan"))
    temp = r["temp_bytes"] / 2**20 if r["temp_bytes"] is not None else float("nan")
    peak = r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else float("nan")
    lines.append(
        f"| {r['model']} | {r['base']} | {r['adapter']} | {r['kernel_bytes'] / 2**20:.2f} | "
        f"{r['kernel_bytes_vs_bf16']:.3f} | {r['kernel_bytes_vs_f32']:.3f} | "
        f"{1e3 * r['step_time_median_s']:.1f} | {r['step_vs_float_base']:.2f} | "
        f"{r['ratio_vs_full'] or float('nan'):.2f} | {temp:.1f} | "
        f"{r['temp_vs_float_base'] or float('nan'):.2f} | {temp_full:.2f} | {peak:.1f} | "
        f"{r['peak_vs_float_base'] or float('nan'):.2f} | {r['first_loss']:.4f} -> "
        f"{r['last_loss']:.4f} | {r['loss_vs_float_base']:.3f} |")
  return "\n".join(lines)


FLAGS = flags.FlagValues()
flags.DEFINE_bool("quick", False, "Smaller models (d = 512).", flag_values=FLAGS)
flags.DEFINE_bool("json", False, "Print the records as JSON lines.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 50, "Timed steps.", flag_values=FLAGS)
flags.DEFINE_string("models", "dense,gemma", "Comma-separated models.", flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> None:
  args = cli.parse(FLAGS, argv)
  if args.steps < 3:
    cli.error("--steps must be at least 3")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  rows = []
  for model in args.models.split(","):
    log(f"{model}: building and compiling its steps")
    rows += run(model, args.quick, args.steps, log)
  if args.json:
    for r in rows:
      print(json.dumps(r))
  else:
    print(table(rows))


if __name__ == "__main__":
  cli.run(main, FLAGS)
