"""The op-level path on real outside LLM code, unedited: Gemma (``gemma``) and MaxText.

Tiny random configs. What a user writes per model is the rules (and PEFT names);
the model code is installed from the registry as it is.

* Gemma 4 (``gemma.gm.nn.Transformer``, Linen): weights called ``w`` in its own
  ``Einsum`` modules, fused k/v (``kv_einsum``, ``(2, K, D, H)``) and gate/up
  (``gating_einsum``, ``(2, D, F)``), the embedding tied to the logits.
* MaxText 0.2.5 (``maxtext.models.models.transformer_as_linen``): layers scanned with
  the layer axis at 1 (``param_scan_axis=1``), remat, logical-axis partitioning.
"""

import collections
import functools
import logging
import os

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdslora_jax import fused, intercept, sharding, tree
from sdslora_jax.targets import rule
from testing_utils import adapter_kernel_shapes, kernel_shaped_arithmetic, train_adapters

# The outside-LLM tests: in `make test` (CI), left out of `make test-library`.
pytestmark = pytest.mark.llm

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _train_20_steps(fn, params, ads, inputs, target, *, lr=3e-2):
  """20 steps of sds_lora(adamw) through the switch (warm-up 5); returns ads, losses, traces."""

  def loss_fn(a, params):
    logits = intercept.apply(fn, params, a, *inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

  ads, losses, traces = train_adapters(loss_fn, ads, params, lr=lr)
  return ads, losses, traces, loss_fn


def _no_kernel_sized_array(loss_fn, fn, params, ads, inputs):
  """The adapted step forms no kernel-shaped product or sum beyond the frozen model's own
  (the rank-r path is used; some models build kernel-shaped values themselves, e.g.
  MaxText's Linen wrapper runs the initialisers on every call)."""
  shapes = adapter_kernel_shapes(ads)
  count = lambda jaxpr: collections.Counter(kernel_shaped_arithmetic(jaxpr, shapes))
  frozen = count(jax.make_jaxpr(lambda p: jnp.sum(fn(p, *inputs)))(params))
  with fused.merging("never"):  # the rank-r op (merged ops form K + dK: tests/test_fused.py)
    adapted = count(jax.make_jaxpr(jax.grad(loss_fn))(ads, params))
  assert adapted - frozen == collections.Counter()
  # The check can fail: the dense merge is caught.
  total = lambda a: jnp.sum(fn(tree.merge(params, a), *inputs))
  assert count(jax.make_jaxpr(jax.grad(total))(ads)) - frozen


def _rel(x, y):
  return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))


# --- Gemma ---------------------------------------------------------------------------------

GEMMA_RULES = [
    rule(r"layer_\d+/attn/(q_einsum|kv_einsum|attn_vec_einsum)/w", method="sds", rank=4),
    rule(r"layer_\d+/mlp/(gating_einsum|linear)", method="sds", rank=4),
    rule("embedder/input_embedding", method="sds", rank=4),  # tied: lookup and logits
]


@pytest.fixture(scope="module")
def gemma():
  from gemma import gm  # the test extra installs it: a missing package fails, never skips
  cfg = gm.nn.config.TransformerConfig(
      num_embed=64, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
      final_logit_softcap=None, use_post_attn_norm=False, use_post_ffw_norm=False,
      attention_types=(gm.nn.AttentionType.GLOBAL,) * 2)
  model = gm.nn.Transformer(config=cfg, dtype=jnp.float32)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 1, 64, dtype=jnp.int32)  # 0 pads
  params = model.init(jax.random.key(0), tokens)["params"]
  fn = lambda p, t: model.apply({"params": p}, t).logits
  return fn, params, tokens


def test_gemma_layouts_init_train_merge(gemma):
  fn, params, tokens = gemma
  lay = intercept.layouts(fn, params, GEMMA_RULES, tokens)
  kv = lay["layer_0/attn/kv_einsum/w"]  # (2, K, D, H): D contracted, (C, K, H) out
  assert kv.in_axes == (2,) and kv.out_axes == (0, 1, 3)
  assert lay["layer_0/mlp/gating_einsum"].in_axes == (1,)
  ads = intercept.init_adapters(jax.random.key(2), fn, params, GEMMA_RULES, tokens)
  np.testing.assert_array_equal(jax.jit(functools.partial(intercept.apply, fn))(params, ads, tokens),
                                jax.jit(fn)(params, tokens))  # both compiled: bit for bit
  target = jnp.roll(tokens, -1, axis=1)
  ads, losses, traces, loss_fn = _train_20_steps(fn, params, ads, (tokens,), target)
  assert len(traces) == 1 and losses[-1] < 0.5 * losses[0]
  assert float(ads["layer_1"]["attn"]["kv_einsum"]["w"].sds_on) == 1.0
  got = intercept.apply(fn, params, ads, tokens)
  assert _rel(got, fn(tree.merge(params, ads), tokens)) < 1e-5
  _no_kernel_sized_array(loss_fn, fn, params, ads, (tokens,))


def test_gemma_tied_embedding_is_adapted_consistently(gemma):
  # The table is looked up (rows) and used for the logits (x @ table.T): one adapter, both uses.
  fn, params, tokens = gemma
  rules = [rule("embedder/input_embedding", method="sds", rank=4)]
  lay = intercept.layouts(fn, params, rules, tokens)
  assert lay["embedder/input_embedding"].kind == "embed"
  ads = intercept.init_adapters(jax.random.key(2), fn, params, rules, tokens)
  from testing_utils import randomize
  ads = randomize(ads, jax.random.key(3))
  got = intercept.apply(fn, params, ads, tokens)
  assert _rel(got, fn(tree.merge(params, ads), tokens)) < 1e-5


def test_gemma_on_an_nf4_base_dequantized_before_the_call(gemma):
  """QLoRA on Gemma as a user writes it: the kernels stored nf4 (qwix), the whole tree
  dequantized before Gemma's own (jitted) call. The adapted step matches the float
  model on the dequantized kernels, and no float kernel is formed in it."""
  import qwix
  fn, params, tokens = gemma
  rules = GEMMA_RULES[:2]
  lay = intercept.layouts(fn, params, rules, tokens)
  def quantize(kp, w):
    if (lw := lay.get(intercept.path_str(kp))) is None:
      return w
    inner = max(lw.in_axes, key=lambda a: w.shape[a])  # blocks of 8 along a contracted axis
    return qwix.quantize(w, "nf4", channelwise_axes=[a for a in range(w.ndim) if a != inner],
                         tiled_axes={inner: 8})
  qparams = jax.tree_util.tree_map_with_path(quantize, params)
  deq = lambda p: jax.tree.map(lambda z: qwix.dequantize(z) if hasattr(z, "qvalue") else z, p,
                               is_leaf=lambda z: hasattr(z, "qvalue"))
  qfn = lambda p, t: fn(deq(p), t)
  ads = intercept.init_adapters(jax.random.key(2), qfn, qparams, rules, tokens)
  from testing_utils import randomize
  ads = randomize(ads, jax.random.key(3))
  got = intercept.apply(qfn, qparams, ads, tokens)
  assert _rel(got, fn(tree.merge(deq(qparams), ads), tokens)) < 1e-5
  loss = lambda a: jnp.sum(jax.nn.log_softmax(intercept.apply(qfn, qparams, a, tokens)))
  ref = lambda a: jnp.sum(jax.nn.log_softmax(fn(tree.merge(deq(qparams), a), tokens)))
  g, g_ref = jax.grad(loss)(ads), jax.grad(ref)(ads)
  scale = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g_ref))
  for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):  # zero ones too
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * scale)
  shapes = {lay[p].shape for p in lay}
  floats = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      floats.update(tuple(v.aval.shape) for v in eqn.outvars
                    if jnp.issubdtype(v.aval.dtype, jnp.floating))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jax.make_jaxpr(jax.grad(loss))(ads).jaxpr)
  assert not floats & shapes
  walk(jax.make_jaxpr(lambda p: qfn(p, tokens))(qparams).jaxpr)
  assert floats & shapes  # the check sees the float kernels of Gemma's own quantized call


# --- MaxText -------------------------------------------------------------------------------

MAXTEXT_RULES = [
    rule(r"decoder/layers/self_attention/(query|key|value|out)/kernel", method="sds", rank=4),
    rule(r"decoder/layers/mlp/(wi_0|wi_1|wo)/kernel", method="sds", rank=4),
]


def _maxtext(n_devices):
  import flax.linen as nn
  from maxtext.configs import pyconfig
  from maxtext.utils import maxtext_utils, model_creation_utils

  logging.getLogger().setLevel(logging.WARNING)
  config = pyconfig.initialize(
      [""], run_name="tiny", base_output_directory="/tmp/sdslora_maxtext", hardware="cpu",
      skip_jax_distributed_system=True, enable_checkpointing=False, log_config=False,
      scan_layers=True, param_scan_axis=1, base_num_decoder_layers=2, base_emb_dim=32,
      base_mlp_dim=64, base_num_query_heads=4, base_num_kv_heads=2, head_dim=8, vocab_size=64,
      max_target_length=5, per_device_batch_size=8 / n_devices, dtype="float32",
      weight_dtype="float32", attention="dot_product", remat_policy="full",
      ici_fsdp_parallelism=n_devices)
  devices = np.array(jax.devices()[:n_devices])
  mesh = maxtext_utils.get_mesh_from_config(config, devices=devices)
  model = model_creation_utils.from_config(config, mesh=mesh)
  # Batch 8, length 5: no activation shape can be mistaken for a kernel's in the jaxpr checks.
  tokens = jax.random.randint(jax.random.key(1), (8, 5), 1, 64, dtype=jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (8, 5))
  rules_ctx = lambda: nn.logical_axis_rules(config.logical_axis_rules)
  with jax.set_mesh(mesh), rules_ctx():
    boxed = model.init({"params": jax.random.key(0)}, tokens, positions, enable_dropout=False)
  params = nn.unbox(boxed["params"])
  fn = lambda p, t, pos: model.apply({"params": p}, t, pos, enable_dropout=False)
  return fn, params, boxed["params"], (tokens, positions), mesh, rules_ctx, config


def test_maxtext_layer_axis_1_init_train_merge():
  fn, params, _, inputs, mesh, rules_ctx, _ = _maxtext(1)
  with jax.set_mesh(mesh), rules_ctx():
    lay = intercept.layouts(fn, params, MAXTEXT_RULES, *inputs)
    q = lay["decoder/layers/self_attention/query/kernel"]  # (D, L, N, H), layers on axis 1
    assert q.layer_axes == (1,) and q.in_axes == (0,) and q.out_axes == (2, 3)
    assert lay["decoder/layers/self_attention/out/kernel"].in_axes == (0, 2)
    ads = intercept.init_adapters(jax.random.key(2), fn, params, MAXTEXT_RULES, *inputs)
    assert ads["decoder"]["layers"]["mlp"]["wo"]["kernel"].a.shape == (2, 64, 4)  # per layer
    np.testing.assert_array_equal(jax.jit(functools.partial(intercept.apply, fn))(params, ads, *inputs),
                                  jax.jit(fn)(params, *inputs))
    target = jnp.roll(inputs[0], -1, axis=1)
    ads, losses, traces, loss_fn = _train_20_steps(fn, params, ads, inputs, target)
    assert len(traces) == 1 and losses[-1] < 0.8 * losses[0]
    got = intercept.apply(fn, params, ads, *inputs)
    merged = tree.merge(params, ads)
    assert _rel(got, fn(merged, *inputs)) < 1e-5
    d = np.asarray(merged["decoder"]["layers"]["mlp"]["wo"]["kernel"]
                   - params["decoder"]["layers"]["mlp"]["wo"]["kernel"])
    assert not np.allclose(d[:, 0], d[:, 1])  # each layer its own update (axis 1)
    _no_kernel_sized_array(loss_fn, fn, params, ads, inputs)


def test_maxtext_sharded_step_equals_single_device():
  out = []
  for n in (1, 8):
    fn, params, boxed, inputs, mesh, rules_ctx, config = _maxtext(n)
    with jax.set_mesh(mesh), rules_ctx():
      ads = intercept.init_adapters(jax.random.key(2), fn, params, MAXTEXT_RULES, *inputs)
      shards = sharding.adapter_shardings(ads, boxed, mesh=mesh, rules=config.logical_axis_rules)
      ads = jax.device_put(ads, shards)
      target = jnp.roll(inputs[0], -1, axis=1)
      ads, losses, traces, _ = _train_20_steps(fn, params, ads, inputs, target)
      if n == 8:
        a = ads["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].a
        assert "fsdp" in str(a.sharding.spec)  # the factor follows the kernel's fsdp axis
    out.append((losses, jax.device_get(ads)))
  (l1, a1), (l8, a8) = out
  np.testing.assert_allclose(l8, l1, rtol=1e-4)
  for (keys, x), (_, y) in zip(tree.adapter_items(a8), tree.adapter_items(a1)):
    for f in ("a", "b"):
      np.testing.assert_allclose(getattr(x, f), getattr(y, f), rtol=5e-3, atol=5e-5,
                                 err_msg=f"{keys} {f}")


# --- PEFT export under Hugging Face names (the glue a user writes per model) ---------------


def gemma_hf_names(num_layers):
  """Gemma's Flax paths -> Hugging Face module names; fused k/v and gate/up split in two."""
  names = {}
  for i in range(num_layers):
    f, h = f"layer_{i}", f"model.layers.{i}"
    names |= {f"{f}/attn/q_einsum/w": f"{h}.self_attn.q_proj",
              f"{f}/attn/kv_einsum/w": [f"{h}.self_attn.k_proj", f"{h}.self_attn.v_proj"],
              f"{f}/attn/attn_vec_einsum/w": f"{h}.self_attn.o_proj",
              f"{f}/mlp/gating_einsum": [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"],
              f"{f}/mlp/linear": f"{h}.mlp.down_proj"}
  return names


MAXTEXT_HF_NAMES = {  # one PEFT module per scanned layer
    f"decoder/layers/{m}/kernel": f"model.layers.{{layer}}.{hf}" for m, hf in [
        ("self_attention/query", "self_attn.q_proj"), ("self_attention/key", "self_attn.k_proj"),
        ("self_attention/value", "self_attn.v_proj"), ("self_attention/out", "self_attn.o_proj"),
        ("mlp/wi_0", "mlp.gate_proj"), ("mlp/wi_1", "mlp.up_proj"), ("mlp/wo", "mlp.down_proj")]}


def _exported_updates(directory):
  """``{module: s * B @ A}`` (torch orientation ``(out, in)``) from a PEFT directory."""
  import json

  from safetensors.numpy import load_file
  with open(os.path.join(directory, "adapter_config.json")) as f:
    cfg = json.load(f)
  t = load_file(os.path.join(directory, "adapter_model.safetensors"))
  out = {}
  for key in t:
    if key.endswith(".lora_A.weight"):
      name = key[len("base_model.model."):-len(".lora_A.weight")]
      r = t[key].shape[0]
      alpha = peft_pattern(cfg.get("alpha_pattern"), name, cfg["lora_alpha"])
      out[name] = (alpha / r) * t[key.replace("lora_A", "lora_B")] @ t[key]
  return out


def peft_pattern(patterns, name, default):
  for pat, v in (patterns or {}).items():
    if pat.startswith("^") and __import__("re").match(pat, name) or pat == name:
      return v
  return default


def _torch_rows(delta, in_axes, out_axes):
  """A kernel update in torch Linear orientation: ``(prod(out axes), prod(in axes))``."""
  d = np.transpose(delta, tuple(out_axes) + tuple(in_axes))
  n_out = int(np.prod([delta.shape[i] for i in out_axes]))
  return d.reshape(n_out, -1)


def test_gemma_peft_export_splits_fused_kernels_exactly(gemma, tmp_path):
  from sdslora_jax import peft
  from testing_utils import randomize
  fn, params, tokens = gemma
  ads = intercept.init_adapters(jax.random.key(2), fn, params, GEMMA_RULES[:2], tokens)
  ads = randomize(ads, jax.random.key(3))
  peft.export_peft(tmp_path / "gemma", ads, module_names=gemma_hf_names(2))
  got = _exported_updates(tmp_path / "gemma")
  assert len(got) == 2 * 7  # q, k, v, o, gate, up, down per layer
  kv = np.asarray(tree.kernel_delta(ads["layer_1"]["attn"]["kv_einsum"]["w"]))  # (2, K, D, H)
  for c, name in enumerate(["k_proj", "v_proj"]):
    want = _torch_rows(kv[c], (1,), (0, 2))  # (K*H, D)
    np.testing.assert_allclose(got[f"model.layers.1.self_attn.{name}"], want, atol=1e-5)
  gate = np.asarray(tree.kernel_delta(ads["layer_0"]["mlp"]["gating_einsum"]))  # (2, D, F)
  for c, name in enumerate(["gate_proj", "up_proj"]):
    np.testing.assert_allclose(got[f"model.layers.0.mlp.{name}"], gate[c].T, atol=1e-5)
  with pytest.raises(ValueError, match=r"split along its first output axis"):
    peft.export_peft(tmp_path / "bad", ads, module_names={
        **gemma_hf_names(2), "layer_0/attn/q_einsum/w": ["a", "b", "c"]})


def test_maxtext_peft_export_one_module_per_layer_on_axis_1(tmp_path):
  from sdslora_jax import peft
  from testing_utils import randomize
  fn, params, _, inputs, mesh, rules_ctx, _ = _maxtext(1)
  with jax.set_mesh(mesh), rules_ctx():
    ads = intercept.init_adapters(jax.random.key(2), fn, params, MAXTEXT_RULES, *inputs)
  ads = randomize(ads, jax.random.key(3))
  peft.export_peft(tmp_path / "maxtext", ads, module_names=MAXTEXT_HF_NAMES)
  got = _exported_updates(tmp_path / "maxtext")
  assert sorted(got) == sorted(n.format(layer=i) for n in MAXTEXT_HF_NAMES.values()
                               for i in range(2))
  q = np.asarray(tree.kernel_delta(ads["decoder"]["layers"]["self_attention"]["query"]["kernel"]))
  for layer in range(2):  # (D, L, N, H): layer on axis 1
    want = _torch_rows(q[:, layer], (0,), (1, 2))
    np.testing.assert_allclose(got[f"model.layers.{layer}.self_attn.q_proj"], want, atol=1e-5)
