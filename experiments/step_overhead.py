"""Train-step cost of adapters: full fine-tuning, a hand-written LoRA, ours, ``nnx.LoRA``.

Every variant is one compiled train step (``jax.jit`` with the trainable state
donated; frozen parameters and the batch passed as arguments, never closed
over): forward, backward and AdamW (``optax.adamw(1e-4)``). SDS-LoRA runs inside
``sds_lora(optax.adamw(1e-4), warmup_steps=0)`` with the bases refreshed after
every update (the default schedule, the most expensive). Its adapters start in
the SDS phase (``sds_on=True``: zero factors, random bases; ``warmup_steps=0``),
so every timed step is an SDS step; the program is the same one a run with a
warm-up compiles (the switch branch is in it either way). Variants:

* ``full``: every parameter trained (the cost adapters should undercut).
* ``handwritten``: the LoRA a user writes by hand, ``y = x @ K + s * (x @ a) @ b``
  in the module, differentiated by JAX's autodiff.
* ``lora``, ``sds``: this library (``method="lora"`` / ``"sds"``; Linen
  ``sdslora_jax.linen.apply`` for MiniLM, NNX ``sdslora_jax.nnx.adapt`` for the
  Dense stacks).
* ``nnx_lora``: Flax's ``nnx.LoRA`` wrapping each ``nnx.Linear`` (Dense stacks).
* ``op_lora``, ``op_sds``: the same adapted steps written through the op-level path,
  ``sdslora_jax.intercept.apply`` over the plain, unadapted model function (the
  frozen parameters as a pure dict, the adapter tree as the trainable state; same
  rules, optimizer and schedule as ``lora`` / ``sds``). Their records add
  ``frontend`` (``"lora"`` / ``"sds"``, the variant they are compared with) and the
  op-level / frontend ratios ``ratio_vs_frontend`` (median step time),
  ``compile_ratio_vs_frontend`` and ``temp_ratio_vs_frontend`` (temporary memory);
  a second table prints them side by side. ``run_configuration`` measures them only
  when asked (``only=ALL_VARIANTS``); the command line measures them by default.

Models: all-MiniLM-L6-v2 with a classification head (trained fully by every
adapted variant), rank 8 on q/k/v/o and the FFN; a stack of 4 ``nnx.Linear``
layers of width ``d`` with ReLU, activations ``(tokens / 128, 128, d)``.

Timing: after compilation and 2 warm-up steps, the variants of a configuration
run interleaved (one step of each, in turn, ``repeats`` times) and each step is
timed to ``block_until_ready``; the record gives the median and the 25th / 75th
percentiles. Memory is XLA's account of the compiled step
(``compiled.memory_analysis()``): ``temp_bytes`` (temporaries) and
``peak_bytes`` (arguments + outputs - donated aliases + temporaries).

Run::

  python -m experiments.step_overhead            # the whole grid (tens of minutes)
  python -m experiments.step_overhead --quick    # a small grid, under a minute
  python -m experiments.step_overhead --json     # one JSON record per line on stdout
  python -m experiments.step_overhead --load 2   # with 2 busy processes competing
  python -m experiments.step_overhead --models minilm --variants lora,sds  # two-way A/B
  python -m experiments.step_overhead --quick --variants full,lora,sds,op_lora,op_sds

Ratios (``ratio_vs_lora``, ``ratio_vs_full``, ``ratio_vs_handwritten``) are of
median step times measured in the same process.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

import sdslora_jax.linen
import sdslora_jax.nnx
from experiments import cli
from sdslora_jax import intercept, targets, tree
from sdslora_jax.optim import sds_lora


LR = 1e-4
WARMUP_STEPS = 2
MINILM_TARGETS = (r".*attention/(query|key|value|output)/kernel", r".*(intermediate|output)/kernel")


@dataclasses.dataclass
class Variant:
  """One compiled train step and its state: ``step(trainable, opt_state, frozen, batch)``."""

  name: str
  step: Callable
  trainable: Any
  opt_state: Any
  frozen: Any
  batch: Any
  compiled: Any = None
  compile_s: float = 0.0
  times: list = dataclasses.field(default_factory=list)
  losses: list = dataclasses.field(default_factory=list)

  def compile(self) -> None:
    t0 = time.perf_counter()
    self.compiled = self.step.lower(self.trainable, self.opt_state, self.frozen, self.batch).compile()
    self.compile_s = time.perf_counter() - t0

  def run(self) -> float:
    t0 = time.perf_counter()
    self.trainable, self.opt_state, loss = self.compiled(
        self.trainable, self.opt_state, self.frozen, self.batch)
    jax.block_until_ready((self.trainable, self.opt_state, loss))
    elapsed = time.perf_counter() - t0
    self.losses.append(loss)
    return elapsed

  def memory(self) -> dict:
    m = self.compiled.memory_analysis()
    if m is None:
      return {"temp_bytes": None, "peak_bytes": None}
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {"temp_bytes": int(m.temp_size_in_bytes), "peak_bytes": int(peak + m.temp_size_in_bytes)}

  def hlo_instructions(self) -> int:
    return sum(" = " in line for line in self.compiled.as_text().splitlines())


def train_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """``jit(step)``: value_and_grad of ``loss_fn(trainable, frozen, batch)`` + ``tx``."""

  def step(trainable, opt_state, frozen, batch):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _variant(name, loss_fn, tx, trainable, frozen, batch) -> Variant:
  return Variant(name, train_step(loss_fn, tx), trainable, tx.init(trainable), frozen, batch)


def _copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# ----------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 + head (Linen).


def _hand_lora(factors: dict, scale: float):
  """A Linen interceptor adding ``s * (x @ a) @ b`` to the output of each adapted module.

  The plain hand-written LoRA (autodiff, no custom backward); ``factors`` maps a
  module path to ``(a, b)`` with ``a: (d_in, r)`` over the flattened input axes.
  """
  import flax.linen as nn

  def interceptor(next_fun, args, kwargs, ctx):
    y = next_fun(*args, **kwargs)
    key = "/".join(ctx.module.path)
    if ctx.method_name != "__call__" or key not in factors:
      return y
    a, b = factors[key]
    x = args[0]
    if isinstance(ctx.module, nn.DenseGeneral) and not isinstance(ctx.module.axis, int):
      x = x.reshape(*x.shape[: -len(ctx.module.axis)], -1)  # output projection: (.., h, dh)
    delta = scale * ((x @ a) @ b)
    return y + delta.reshape(y.shape)

  return interceptor


def minilm_variants(batch: int, seq: int, rank: int, num_layers: int | None,
                    op_level: bool = False) -> list[Variant]:
  import flax.linen as nn

  from experiments.models import SentenceClassifier
  from experiments.models import minilm

  overrides = {"dropout_rate": 0.0, **({"num_layers": num_layers} if num_layers else {})}
  cfg, params = minilm.init_classifier_params(2, jax.random.key(0), **overrides)
  model = SentenceClassifier(cfg, 2)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1000, cfg.vocab_size, (batch, seq)), jnp.int32)
  mask = jnp.ones((batch, seq), jnp.int32)
  data = {"ids": ids, "mask": mask, "label": jnp.asarray(rng.integers(0, 2, batch))}
  head = params.pop("classifier")
  base = params
  alpha = 16.0
  scale = alpha / rank

  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def full_loss(p, frozen, d):
    return xent(model.apply({"params": p}, d["ids"], d["mask"], deterministic=True), d["label"])

  rules = [targets.rule(t, method="lora", rank=rank, alpha=alpha) for t in MINILM_TARGETS]
  lora_ad = sdslora_jax.linen.init_adapters(jax.random.key(1), model, {**base, "classifier": head}, rules,
                                   ids, mask)
  lora_ad.pop("classifier", None)
  sds_rules = [dataclasses.replace(r, method="sds") for r in rules]
  sds_ad = sdslora_jax.linen.init_adapters(jax.random.key(1), model, {**base, "classifier": head},
                                           sds_rules, ids, mask, sds_on=True)
  sds_ad.pop("classifier", None)

  def adapted_loss(t, frozen, d):
    out = sdslora_jax.linen.apply(model, {"params": {**frozen, "classifier": t["head"]}}, t["adapters"],
                         d["ids"], d["mask"], deterministic=True)
    return xent(out, d["label"])

  factors = {"/".join(k[:-1]): (ad.a, ad.b) for k, ad in tree.adapter_items(lora_ad)}

  def hand_loss(t, frozen, d):
    with nn.intercept_methods(_hand_lora(t["factors"], scale)):
      out = model.apply({"params": {**frozen, "classifier": t["head"]}}, d["ids"], d["mask"],
                        deterministic=True)
    return xent(out, d["label"])

  adamw = optax.adamw(LR)
  out = [
      _variant("full", full_loss, adamw, _copy({**base, "classifier": head}), {}, data),
      _variant("handwritten", hand_loss, adamw, {"factors": _copy(factors), "head": _copy(head)},
               base, data),
      _variant("lora", adapted_loss, adamw, {"adapters": lora_ad, "head": _copy(head)}, base, data),
      _variant("sds", adapted_loss, sds_lora(optax.adamw(LR), warmup_steps=0),
               {"adapters": sds_ad, "head": _copy(head)}, base, data),
  ]
  if not op_level:
    return out

  # The op-level path: the plain model function, adapters added at its dot_generals.
  def plain(p, ids, mask):
    return model.apply({"params": p}, ids, mask, deterministic=True)

  def op_loss(t, frozen, d):
    out = intercept.apply(plain, {**frozen, "classifier": t["head"]}, t["adapters"],
                          d["ids"], d["mask"])
    return xent(out, d["label"])

  def op_adapters(rs, sds_on):
    ad = intercept.init_adapters(jax.random.key(1), plain, {**base, "classifier": head}, rs,
                                 ids, mask, sds_on=sds_on)
    ad.pop("classifier", None)
    return ad

  out += [
      _variant("op_lora", op_loss, optax.adamw(LR),
               {"adapters": op_adapters(rules, False), "head": _copy(head)}, base, data),
      _variant("op_sds", op_loss, sds_lora(optax.adamw(LR), warmup_steps=0),
               {"adapters": op_adapters(sds_rules, True), "head": _copy(head)}, base, data),
  ]
  return out


# ----------------------------------------------------------------------------------------
# A stack of nnx.Linear layers.


def _stack_variants(d: int, rank: int, tokens: int, layers: int = 4, seq: int = 128,
                    op_level: bool = False):
  from flax import nnx

  class Stack(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(d, d, rngs=rngs) for _ in range(layers)])

    def __call__(self, x):
      for layer in self.layers:
        x = nnx.relu(layer(x))
      return x

  class HandLoRAParam(nnx.Variable):
    pass

  class HandLoRA(nnx.Module):
    """``x @ K + bias + s * (x @ a) @ b``, written the plain way."""

    def __init__(self, base: nnx.Linear, key, scale):
      self.base = base
      bound = 1.0 / np.sqrt(d)
      self.a = HandLoRAParam(jax.random.uniform(key, (d, rank), jnp.float32, -bound, bound))
      self.b = HandLoRAParam(jnp.zeros((rank, d)))
      self.scale = scale

    def __call__(self, x):
      return self.base(x) + self.scale * ((x @ self.a[...]) @ self.b[...])

  scale = 2.0  # alpha = 2 r
  if tokens % seq:
    raise ValueError(f"tokens ({tokens}) must be a multiple of {seq}")
  x = jax.random.normal(jax.random.key(7), (tokens // seq, seq, d))
  y = jax.random.normal(jax.random.key(8), (tokens // seq, seq, d))
  data = {"x": x, "y": y}

  def build():
    return Stack(nnx.Rngs(0))

  def split_step(name, model, wrt, tx):
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)

    def loss(t, f, batch):
      m = nnx.merge(graphdef, t, f)
      return jnp.mean((m(batch["x"]) - batch["y"]) ** 2)

    return _variant(name, loss, tx, trainable, frozen, data)

  out = [split_step("full", build(), nnx.Param, optax.adamw(LR))]
  m = build()
  for i, layer in enumerate(m.layers):
    m.layers[i] = HandLoRA(layer, jax.random.key(100 + i), scale)
  out.append(split_step("handwritten", m, HandLoRAParam, optax.adamw(LR)))
  rules = lambda method: [targets.rule(r"layers/\d+/kernel", method=method, rank=rank,
                                          alpha=scale * rank)]
  m = sdslora_jax.nnx.adapt(build(), rules("lora"), key=jax.random.key(1))
  out.append(split_step("lora", m, sdslora_jax.nnx.AdapterVariable, optax.adamw(LR)))
  m = sdslora_jax.nnx.adapt(build(), rules("sds"), key=jax.random.key(1), sds_on=True)
  out.append(split_step("sds", m, sdslora_jax.nnx.AdapterVariable,
                        sds_lora(optax.adamw(LR), warmup_steps=0)))
  m = build()
  for i, layer in enumerate(m.layers):
    m.layers[i] = nnx.LoRA(d, rank, d, base_module=layer, rngs=nnx.Rngs(100 + i))
  out.append(split_step("nnx_lora", m, nnx.LoRAParam, optax.adamw(LR)))
  if not op_level:
    return out

  # The op-level path: the unadapted Stack as a function of a pure parameter dict, the
  # adapters added by intercept.apply where each kernel meets its activations.
  plain, frozen, _ = sdslora_jax.nnx.as_function(build())

  def op_loss(t, f, batch):
    return jnp.mean((intercept.apply(plain, f, t, batch["x"]) - batch["y"]) ** 2)

  for name, method, tx in (("op_lora", "lora", optax.adamw(LR)),
                           ("op_sds", "sds", sds_lora(optax.adamw(LR), warmup_steps=0))):
    ads = intercept.init_adapters(jax.random.key(1), plain, frozen, rules(method), x,
                                  sds_on=method == "sds")
    out.append(_variant(name, op_loss, tx, ads, frozen, data))
  return out


# ----------------------------------------------------------------------------------------
# Measurement.


def measure(variants: Sequence[Variant], repeats: int, log) -> list[dict]:
  for v in variants:
    v.compile()
    for _ in range(WARMUP_STEPS):
      v.run()
    log(f"  {v.name}: compiled in {v.compile_s:.1f} s")
  for _ in range(repeats):
    for v in variants:
      v.times.append(v.run())
  rows = []
  for v in variants:
    t = np.asarray(v.times)
    rows.append({
        "method": v.name,
        "step_time_median_s": float(np.median(t)),
        "step_time_p25_s": float(np.percentile(t, 25)),
        "step_time_p75_s": float(np.percentile(t, 75)),
        "compile_s": v.compile_s,
        "hlo_instructions": v.hlo_instructions(),
        "repeats": len(t),
        "first_loss": float(v.losses[0]),
        "last_loss": float(v.losses[-1]),
        **v.memory(),
    })
  by = {r["method"]: r for r in rows}
  for r in rows:
    for ref in ("lora", "full", "handwritten"):
      r[f"ratio_vs_{ref}"] = (r["step_time_median_s"] / by[ref]["step_time_median_s"]
                              if ref in by else None)
    r["compile_ratio_vs_lora"] = r["compile_s"] / by["lora"]["compile_s"] if "lora" in by else None
  for r in rows:  # op-level rows only: the existing records keep their keys
    if (ref := FRONTEND.get(r["method"])) is None:
      continue
    f = by.get(ref)
    r["frontend"] = ref
    r["ratio_vs_frontend"] = r["step_time_median_s"] / f["step_time_median_s"] if f else None
    r["compile_ratio_vs_frontend"] = r["compile_s"] / f["compile_s"] if f else None
    r["temp_ratio_vs_frontend"] = (
        r["temp_bytes"] / f["temp_bytes"] if f and r["temp_bytes"] is not None
        and f["temp_bytes"] else None)
  return rows


def configurations(quick: bool) -> list[dict]:
  """The grid: MiniLM and Dense stacks (d, rank, tokens)."""
  if quick:
    return [
        {"model": "minilm", "batch": 8, "seq": 128, "rank": 8, "num_layers": 2, "repeats": 5},
        {"model": "dense_stack", "d": 1024, "rank": 16, "tokens": 2048, "repeats": 5},
    ]
  grid = [{"model": "minilm", "batch": 32, "seq": 128, "rank": 8, "num_layers": None,
           "repeats": 30}]
  for d, tokens, ranks, repeats in ((1024, 512, (8, 16, 64), 30), (1024, 2048, (8, 16, 64), 20),
                                    (1024, 8192, (8, 16, 64), 8), (4096, 512, (8, 16, 64), 8),
                                    (4096, 2048, (8, 16, 64), 4)):
    grid += [{"model": "dense_stack", "d": d, "rank": r, "tokens": tokens, "repeats": repeats}
             for r in ranks]
  return grid


VARIANTS = ("full", "handwritten", "lora", "sds", "nnx_lora")
OP_VARIANTS = ("op_lora", "op_sds")  # the op-level path (intercept.apply), opt-in here
ALL_VARIANTS = VARIANTS + OP_VARIANTS
FRONTEND = {"op_lora": "lora", "op_sds": "sds"}  # op-level variant -> the variant it mirrors


def run_configuration(c: dict, log, only: Sequence[str] = VARIANTS) -> list[dict]:
  """Measures the variants named in ``only`` (e.g. ``("lora", "sds")`` for a two-way A/B).

  The op-level variants (``OP_VARIANTS``) are built only when ``only`` names one.
  """
  op_level = any(v in OP_VARIANTS for v in only)
  if c["model"] == "minilm":
    variants = minilm_variants(c["batch"], c["seq"], c["rank"], c["num_layers"], op_level)
    meta = {"model": "minilm" if not c["num_layers"] else f"minilm_{c['num_layers']}layers",
            "d": 384, "rank": c["rank"], "tokens": c["batch"] * c["seq"]}
  else:
    variants = _stack_variants(c["d"], c["rank"], c["tokens"], op_level=op_level)
    meta = {"model": "dense_stack", "d": c["d"], "rank": c["rank"], "tokens": c["tokens"]}
  variants = [v for v in variants if v.name in only]
  log(f"{meta}")
  rows = measure(variants, c["repeats"], log)
  return [{**meta, "dtype": "float32", "platform": jax.devices()[0].platform, **r} for r in rows]


def _busy() -> None:  # a competing process for --load
  while True:
    pass


def _ratio(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def table(rows: Sequence[dict]) -> str:
  head = ("| model | d | r | tokens | method | step (s) | p25-p75 (s) | vs LoRA | vs full | "
          "vs hand | temp MiB | compile (s) |")
  lines = [head, "|" + "---|" * 12]
  for r in rows:
    temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.0f}"
    lines.append(
        f"| {r['model']} | {r['d']} | {r['rank']} | {r['tokens']} | {r['method']} | "
        f"{r['step_time_median_s']:.4f} | {r['step_time_p25_s']:.4f}-{r['step_time_p75_s']:.4f} | "
        f"{_ratio(r['ratio_vs_lora'])} | {_ratio(r['ratio_vs_full'])} | "
        f"{_ratio(r['ratio_vs_handwritten'])} | {temp} | {r['compile_s']:.1f} |")
  return "\n".join(lines)


def oplevel_table(rows: Sequence[dict]) -> str:
  """The op-level rows beside the variants they mirror ("" when there are none)."""
  rows = [r for r in rows if r["method"] in FRONTEND]
  if not rows:
    return ""
  head = ("| model | d | r | tokens | op-level | step (s): op / frontend | op / frontend | "
          "op / full | frontend / full | compile (s): op / frontend | compile op / frontend | "
          "temp MiB: op / frontend | temp op / frontend |")
  lines = [head, "|" + "---|" * 13]
  mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f}"
  for r in rows:
    vs_full = r["ratio_vs_full"]
    front_full = (vs_full / r["ratio_vs_frontend"]
                  if vs_full is not None and r["ratio_vs_frontend"] else None)
    front_t = (r["step_time_median_s"] / r["ratio_vs_frontend"]
               if r["ratio_vs_frontend"] else None)
    front_c = r["compile_s"] / r["compile_ratio_vs_frontend"] if r["compile_ratio_vs_frontend"] \
        else None
    front_m = (r["temp_bytes"] / r["temp_ratio_vs_frontend"]
               if r["temp_ratio_vs_frontend"] else None)
    lines.append(
        f"| {r['model']} | {r['d']} | {r['rank']} | {r['tokens']} | {r['method']} | "
        f"{r['step_time_median_s']:.4f} / {'-' if front_t is None else f'{front_t:.4f}'} | "
        f"{_ratio(r['ratio_vs_frontend'])} | {_ratio(vs_full)} | {_ratio(front_full)} | "
        f"{r['compile_s']:.1f} / {'-' if front_c is None else f'{front_c:.1f}'} | "
        f"{_ratio(r['compile_ratio_vs_frontend'])} | {mib(r['temp_bytes'])} / {mib(front_m)} | "
        f"{_ratio(r['temp_ratio_vs_frontend'])} |")
  return "\n".join(lines)


def summary_table(rows: Sequence[dict]) -> str:
  """One line per configuration: the ratios the performance targets are about."""
  configs: dict[tuple, dict] = {}
  for r in rows:
    configs.setdefault((r["model"], r["d"], r["rank"], r["tokens"]), {})[r["method"]] = r
  head = ("| model | d | r | tokens | LoRA step (s) | LoRA / full | LoRA / hand-written | "
          "SDS / LoRA | nnx.LoRA / LoRA | temp MiB: full / hand / LoRA / SDS | "
          "compile (s): LoRA / SDS |")
  lines = [head, "|" + "---|" * 11]
  fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
  for (model, d, rank, tokens), by in configs.items():
    lora = by["lora"]
    t = lambda m: by[m]["step_time_median_s"] if m in by else None
    ratio = lambda m, ref: None if m not in by or ref not in by else t(m) / t(ref)
    mib = " / ".join("n/a" if m not in by or by[m]["temp_bytes"] is None
                     else f"{by[m]['temp_bytes'] / 2**20:.0f}"
                     for m in ("full", "handwritten", "lora", "sds"))
    lines.append(
        f"| {model} | {d} | {rank} | {tokens} | {lora['step_time_median_s']:.3f} | "
        f"{fmt(ratio('lora', 'full'))} | {fmt(ratio('lora', 'handwritten'))} | "
        f"{fmt(ratio('sds', 'lora'))} | {fmt(ratio('nnx_lora', 'lora'))} | {mib} | "
        f"{lora['compile_s']:.1f} / {by['sds']['compile_s']:.1f} |")
  return "\n".join(lines)


def write_markdown(rows: Sequence[dict], path: str, load: int) -> None:
  with open(path, "w") as f:
    f.write(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
            f"load {load}, float32; medians of interleaved steps.\n\n{summary_table(rows)}\n\n"
            f"All variants:\n\n{table(rows)}\n")
    if op := oplevel_table(rows):
      f.write(f"\nOp-level path (intercept.apply) against the frontends:\n\n{op}\n")


FLAGS = flags.FlagValues()
flags.DEFINE_bool("quick", False, "A small grid, under a minute.", flag_values=FLAGS)
flags.DEFINE_bool("json", False, "JSON records on stdout, one per line.", flag_values=FLAGS)
flags.DEFINE_string("models", "minilm,dense_stack", "Comma-separated subset of minilm,dense_stack.",
                    flag_values=FLAGS)
flags.DEFINE_multi_integer("d", None, "Only these widths of the Dense stacks (repeat the flag).",
                           flag_values=FLAGS)
flags.DEFINE_multi_integer("ranks", None, "Only these ranks of the Dense stacks (repeat the flag).",
                           flag_values=FLAGS)
flags.DEFINE_multi_integer("tokens", None, "Only these token counts (repeat the flag).",
                           flag_values=FLAGS)
flags.DEFINE_integer("repeats", None, "Interleaved repeats (default: per config).",
                     flag_values=FLAGS)
flags.DEFINE_string("variants", ",".join(ALL_VARIANTS),
                    f"Comma-separated subset of {','.join(ALL_VARIANTS)}.", flag_values=FLAGS)
flags.DEFINE_integer("load", 0, "Busy processes competing for the CPU during the measurement.",
                     flag_values=FLAGS)
flags.DEFINE_string("out", None, "Also write the JSON records to this file.", flag_values=FLAGS)
flags.DEFINE_string("markdown", None, "Also write the tables to this Markdown file.",
                    flag_values=FLAGS)
flags.DEFINE_string("from_json", None, "Only rewrite --markdown from these JSON records.",
                    flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> None:
  args = cli.parse(FLAGS, argv)

  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  if args.from_json:
    if not args.markdown:
      cli.error("--from_json needs --markdown")
    with open(args.from_json) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    write_markdown(rows, args.markdown, rows[0].get("load", 0) if rows else 0)
    return
  models = set(args.models.split(","))
  grid = [c for c in configurations(args.quick) if c["model"] in models
          and (c["model"] != "dense_stack" or (
              (not args.d or c["d"] in args.d) and (not args.ranks or c["rank"] in args.ranks)
              and (not args.tokens or c["tokens"] in args.tokens)))]
  if not grid:
    cli.error("no configuration matches the filters")
  only = args.variants.split(",")
  if unknown := sorted(set(only) - set(ALL_VARIANTS)):
    cli.error(f"unknown variants {unknown}; choose from {','.join(ALL_VARIANTS)}")
  hogs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.load)]
  for h in hogs:
    h.start()
  log(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs), "
      f"{len(grid)} configurations, load {args.load}")
  rows = []
  try:
    for i, c in enumerate(grid):
      if args.repeats:
        c = {**c, "repeats": args.repeats}
      log(f"[{i + 1}/{len(grid)}]")
      new = [{**r, "load": args.load} for r in run_configuration(c, log, only)]
      rows.extend(new)
      if args.json:
        for r in new:
          print(json.dumps(r), flush=True)
      if args.out:
        with open(args.out, "w") as f:
          f.writelines(json.dumps(r) + "\n" for r in rows)
  finally:
    for h in hogs:
      h.terminate()
  print(table(rows), file=sys.stderr if args.json else sys.stdout)
  if op := oplevel_table(rows):
    print(f"\nOp-level path (intercept.apply) against the frontends:\n\n{op}",
          file=sys.stderr if args.json else sys.stdout)
  if args.markdown:
    write_markdown(rows, args.markdown, args.load)


if __name__ == "__main__":
  cli.run(main, FLAGS)
