"""PEFT interoperability against PyTorch PEFT itself (opt in with ``-m peft_torch``).

A small torch model (Embedding, Linear, Conv2d) shares its weights with a Flax
parameter tree; adapters exported from JAX must reproduce the JAX adapted
outputs when loaded by ``peft.PeftModel``, and adapters made in PEFT must
reproduce PEFT's outputs after ``import_peft``.
"""

import importlib
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
hf_peft = pytest.importorskip("peft")

from sdslora_jax import peft  # noqa: E402
from sdslora_jax.targets import KernelLayout  # noqa: E402
from sdslora_jax.tree import merge  # noqa: E402
from testing_utils import random_adapter  # noqa: E402

pytestmark = pytest.mark.peft_torch

V, D, H, K, C_IN, C_OUT = 11, 8, 2, 3, 2, 4  # H * K = 6
RTOL = 1e-5
# The (H, K, D) = (2, 3, 8) output kernel is not one the shape heuristic decides.
LAYOUTS = {"body/o/kernel": KernelLayout((H, K, D), (0, 1), "dense")}


class Body(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.dense = torch.nn.Linear(D, H * K)
    self.q = torch.nn.Linear(H * K, H * K)
    self.o = torch.nn.Linear(H * K, D)


class Net(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.emb = torch.nn.Embedding(V, D)
    self.body = Body()
    self.conv = torch.nn.Conv2d(C_IN, C_OUT, 3, padding=1)

  def forward(self, ids, img):
    h = torch.tanh(self.body.dense(self.emb(ids)))
    return self.body.o(torch.tanh(self.body.q(h))), self.conv(img)


def _base_params():
  ks = iter(jax.random.split(jax.random.key(0), 10))

  def rnd(*shape):
    return 0.5 * jax.random.normal(next(ks), shape)

  return {
      "emb": {"embedding": rnd(V, D)},
      "body": {
          "dense": {"kernel": rnd(D, H * K), "bias": rnd(H * K)},
          "q": {"kernel": rnd(H * K, H, K), "bias": rnd(H, K)},  # DenseGeneral (D, H, K)
          "o": {"kernel": rnd(H, K, D), "bias": rnd(D)},  # DenseGeneral over (H, K)
      },
      "conv": {"kernel": rnd(3, 3, C_IN, C_OUT), "bias": rnd(C_OUT)},
  }


def _torch_net(params):
  """``Net`` holding ``params``: Linear weight = kernel.T (flattened), Conv2d OIHW = HWIO."""
  net = Net()
  p = jax.tree.map(np.asarray, params)
  b = p["body"]
  weights = {
      "emb.weight": p["emb"]["embedding"],
      "body.dense.weight": b["dense"]["kernel"].T,
      "body.dense.bias": b["dense"]["bias"],
      "body.q.weight": b["q"]["kernel"].reshape(H * K, H * K).T,
      "body.q.bias": b["q"]["bias"].reshape(-1),
      "body.o.weight": b["o"]["kernel"].reshape(H * K, D).T,
      "body.o.bias": b["o"]["bias"],
      "conv.weight": p["conv"]["kernel"].transpose(3, 2, 0, 1),
      "conv.bias": p["conv"]["bias"],
  }
  net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()})
  return net.eval()


def _jax_forward(params, ids, img_nhwc):
  b = params["body"]
  h = jnp.tanh(params["emb"]["embedding"][ids] @ b["dense"]["kernel"] + b["dense"]["bias"])
  q = jnp.tanh(jnp.einsum("bld,dhk->blhk", h, b["q"]["kernel"]) + b["q"]["bias"])
  o = jnp.einsum("blhk,hkd->bld", q, b["o"]["kernel"]) + b["o"]["bias"]
  y = jax.lax.conv_general_dilated(img_nhwc, params["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return o, y + params["conv"]["bias"]


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, V, size=(3, 5))
  img = rng.normal(size=(2, 5, 5, C_IN)).astype(np.float32)
  return ids, img


def _torch_outputs(model, ids, img):
  with torch.no_grad():
    o, y = model(torch.from_numpy(ids), torch.from_numpy(img.transpose(0, 3, 1, 2).copy()))
  return o.numpy(), y.numpy().transpose(0, 2, 3, 1)


def _rel_err(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _names(module_path):
  return module_path.replace("/", ".")


def _adapters(method):
  ks = jax.random.split(jax.random.key(1), 5)
  kw = dict(method=method, stale_bases=method == "sds")
  return {
      "emb": {"embedding": random_adapter(ks[0], (V, D), (0,), rank=2, scale=0.3, kind="embed",
                                          **kw)},
      "body": {
          "dense": {"kernel": random_adapter(ks[1], (D, H * K), (0,), rank=3,
                                             scale=4.0 / math.sqrt(3), **kw)},  # rsLoRA
          "q": {"kernel": random_adapter(ks[2], (H * K, H, K), (0,), rank=1, scale=0.7, **kw)},
          "o": {"kernel": random_adapter(ks[3], (H, K, D), (0, 1), rank=2, scale=0.25,
                                         **kw, **({"sds_on": 0.0} if method == "sds" else {}))},
      },
      "conv": {"kernel": random_adapter(ks[4], (3, 3, C_IN, C_OUT), (0, 1, 2), rank=2, scale=0.2,
                                        kind="conv", **kw)},
  }


@pytest.mark.parametrize("method", ["lora", "sds"])
def test_jax_export_loads_in_peft(tmp_path, method):
  params = _base_params()
  ads = _adapters(method)
  peft.export_peft(tmp_path, ads, module_names=_names)
  model = hf_peft.PeftModel.from_pretrained(_torch_net(params), str(tmp_path)).eval()
  ids, img = _inputs()
  got = _torch_outputs(model, ids, img)
  want = _jax_forward(merge(params, ads), ids, img)
  base = _jax_forward(params, ids, img)
  errs = [_rel_err(g, np.asarray(w)) for g, w in zip(got, want)]
  print(f"{method}: JAX export -> PEFT, max relative error {max(errs):.2e}")
  assert max(errs) < RTOL
  # The adapters change the outputs far beyond the tolerance.
  assert min(_rel_err(np.asarray(b), np.asarray(w)) for b, w in zip(base, want)) > 1e-2
  cfg = hf_peft.PeftConfig.from_pretrained(str(tmp_path))
  assert cfg.rank_pattern and cfg.alpha_pattern  # per-module ranks and alphas are exercised


def _peft_adapter(params, directory, rank_pattern, alpha_pattern):
  """A PEFT rsLoRA model on ``Net`` with random lora_A / lora_B, saved to ``directory``."""
  torch.manual_seed(0)
  config = hf_peft.LoraConfig(
      r=2,
      lora_alpha=4,
      target_modules=["emb", "dense", "q", "o", "conv"],
      rank_pattern=rank_pattern,
      alpha_pattern=alpha_pattern,
      use_rslora=True,
  )
  model = hf_peft.get_peft_model(_torch_net(params), config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:  # PEFT starts lora_B (lora_embedding_A) at zero
        p.copy_(0.5 * torch.randn_like(p))
  model.save_pretrained(str(directory))
  return model.eval()


def test_peft_adapter_imports_in_jax(tmp_path):
  params = _base_params()
  # "b.*(q|o)" comes before the exact "body.o" (also in the sorted file): body.o gets rank 3.
  model = _peft_adapter(params, tmp_path, {"b.*(q|o)": 3, "body.o": 1}, {"conv": 5, "dense|q": 6})
  ranks = {n: m.r["default"] for n, m in model.base_model.model.named_modules() if hasattr(m, "r")}
  assert ranks == {"emb": 2, "body.dense": 2, "body.q": 3, "body.o": 3, "conv": 2}
  ads = peft.import_peft(tmp_path, params, module_names=_names, layouts=LAYOUTS)
  b = ads["body"]
  scales = [ads["emb"]["embedding"].scale, b["dense"]["kernel"].scale, b["q"]["kernel"].scale,
            b["o"]["kernel"].scale, ads["conv"]["kernel"].scale]
  assert scales == pytest.approx([4 / math.sqrt(2), 6 / math.sqrt(2), 6 / math.sqrt(3),
                                  4 / math.sqrt(3), 5 / math.sqrt(2)])
  ids, img = _inputs()
  want = _torch_outputs(model, ids, img)
  got = _jax_forward(merge(params, ads), ids, img)
  errs = [_rel_err(np.asarray(g), w) for g, w in zip(got, want)]
  print(f"PEFT -> import_peft, max relative error {max(errs):.2e}")
  assert max(errs) < RTOL
  # PEFT reads its own file the same way.
  again = hf_peft.PeftModel.from_pretrained(_torch_net(params), str(tmp_path)).eval()
  errs = [_rel_err(g, w) for g, w in zip(_torch_outputs(again, ids, img), want)]
  assert max(errs) < RTOL


def test_file_order_decides_like_peft(tmp_path):
  # save_pretrained sorts the keys: "body.o" now precedes "q|o", so the file says rank 1 for
  # body.o although the model has rank 3. PEFT and import_peft both refuse the file.
  params = _base_params()
  _peft_adapter(params, tmp_path, {"q|o": 3, "body.o": 1}, {})
  with pytest.raises(RuntimeError, match=r"size mismatch for base_model.model.body.o.lora_A"):
    hf_peft.PeftModel.from_pretrained(_torch_net(params), str(tmp_path))
  with pytest.raises(ValueError, match=r"'body.o': tensors have rank 3 but the config says r=1"):
    peft.import_peft(tmp_path, params, module_names=_names, layouts=LAYOUTS)


class Pair(torch.nn.Module):
  """Two modules, ``o`` and ``body.o``, where the name ``o`` ends the other at a dot."""

  def __init__(self):
    super().__init__()
    self.o = torch.nn.Linear(4, 4)
    self.body = torch.nn.ModuleDict({"o": torch.nn.Linear(4, 4)})

  def forward(self, x):
    return self.body["o"](torch.tanh(self.o(x)))


def test_export_keys_peft_cannot_misread(tmp_path):
  ks = jax.random.split(jax.random.key(2), 6)
  params = {"o": {"kernel": jax.random.normal(ks[0], (4, 4)), "bias": jnp.zeros(4)},
            "body": {"o": {"kernel": jax.random.normal(ks[1], (4, 4)), "bias": jnp.ones(4)}}}
  ads = {"o": {"kernel": random_adapter(ks[2], (4, 4), (0,), method="lora", rank=1, scale=0.5)},
         "body": {"o": {"kernel": random_adapter(ks[3], (4, 4), (0,), rank=2, scale=0.3)}}}
  peft.export_peft(tmp_path, ads, module_names=_names)
  cfg = hf_peft.PeftConfig.from_pretrained(str(tmp_path))
  assert cfg.r == 4 and cfg.rank_pattern == {"^o": 1}  # a plain "o" would also match body.o
  net = Pair()
  net.load_state_dict({
      "o.weight": torch.from_numpy(np.array(params["o"]["kernel"]).T.copy()),
      "o.bias": torch.from_numpy(np.array(params["o"]["bias"])),
      "body.o.weight": torch.from_numpy(np.array(params["body"]["o"]["kernel"]).T.copy()),
      "body.o.bias": torch.from_numpy(np.array(params["body"]["o"]["bias"])),
  })
  model = hf_peft.PeftModel.from_pretrained(net, str(tmp_path)).eval()
  x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  with torch.no_grad():
    got = model(torch.from_numpy(x)).numpy()
  m = merge(params, ads)
  h = jnp.tanh(x @ m["o"]["kernel"] + m["o"]["bias"])
  want = np.asarray(h @ m["body"]["o"]["kernel"] + m["body"]["o"]["bias"])
  print(f"anchored pattern keys: max relative error {_rel_err(got, want):.2e}")
  assert _rel_err(got, want) < RTOL


KEYS = ["q", "o", "q|o", "body.o", "^body.o", "body.(dense|q)", "dense|conv", r"b\w+.q", ".*o",
        "^model.decoder.layers.0.encoder_attn.k_proj", "k_proj", "layers.0.*proj", "ody.q"]
NAMES = ["q", "o", "body.o", "body.q", "body.dense", "conv", "xbody.o", "a.body.o",
         "model.decoder.layers.0.encoder_attn.k_proj", "model.decoder.layers.1.self_attn.k_proj",
         "base.model.decoder.layers.0.encoder_attn.k_proj"]


def test_pattern_agrees_with_peft():
  get_pattern_key = getattr(importlib.import_module("peft.utils.other"), "get_pattern_key", None)
  if get_pattern_key is None:
    pytest.skip("this PEFT version has no peft.utils.other.get_pattern_key")
  for keys in itertools.permutations(KEYS, 3):
    patterns = {k: i for i, k in enumerate(keys)}
    for name in NAMES:
      want = patterns.get(get_pattern_key(patterns.keys(), name), -1)
      assert peft._pattern(patterns, name, -1) == want, (keys, name)
