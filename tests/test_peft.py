"""PEFT export / import: exact round trips, file layout, error paths."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sdslora_jax as sl
from sdslora_jax import peft
from sdslora_jax.adapter import kernel_delta
from sdslora_jax.targets import KernelLayout
from testing_utils import random_adapter


def _ad(key, shape, in_axes, *, scale=0.75, **kw):
  # Stale bases: the rank-2r export must be exact whatever the bases are.
  return random_adapter(key, shape, in_axes, scale=scale, stale_bases=True, **kw)


PARAMS = {
    "dense": {"kernel": jnp.zeros((6, 5))},
    "q": {"kernel": jnp.zeros((8, 2, 4))},
    "o": {"kernel": jnp.zeros((2, 4, 8))},
    "emb": {"embedding": jnp.zeros((10, 6))},
    "conv": {"kernel": jnp.zeros((3, 3, 2, 4))},
}
NAMES = {"dense/kernel": "m.dense", "q": "m.attn.q", "o": "m.attn.o", "emb": "m.emb", "conv": "m.conv"}


def _adapters():
  k = jax.random.split(jax.random.key(0), 5)
  return {
      "dense": {"kernel": _ad(k[0], (6, 5), (0,), method="lora", rank=3, scale=2.0)},
      "q": {"kernel": _ad(k[1], (8, 2, 4), (0,))},
      "o": {"kernel": _ad(k[2], (2, 4, 8), (0, 1), sds_on=0.0)},
      "emb": {"embedding": _ad(k[3], (10, 6), (0,), kind="embed")},
      "conv": {"kernel": _ad(k[4], (3, 3, 2, 4), (0, 1, 2), kind="conv")},
  }


def test_round_trip_is_exact(tmp_path):
  ads = _adapters()
  peft.export_peft(tmp_path, ads, module_names=NAMES, base_model_name_or_path="base")
  back = peft.import_peft(tmp_path, PARAMS, module_names=NAMES)
  for path in [("dense", "kernel"), ("q", "kernel"), ("o", "kernel"), ("emb", "embedding"),
               ("conv", "kernel")]:
    src, dst = ads[path[0]][path[1]], back[path[0]][path[1]]
    assert dst.method == "lora" and dst.kernel_shape == src.kernel_shape
    np.testing.assert_allclose(kernel_delta(dst), kernel_delta(src), rtol=1e-5, atol=1e-5)
  assert back["q"]["kernel"].rank == 4  # SDS phase -> rank 2r
  assert back["o"]["kernel"].rank == 2  # warm-up -> plain rank r


def test_file_layout_matches_peft(tmp_path):
  ads = _adapters()
  peft.export_peft(tmp_path, ads, module_names=lambda p: "model." + p.replace("/", "."))
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  t = load_file(str(tmp_path / "adapter_model.safetensors"))
  assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == sorted(
      ["model.dense", "model.q", "model.o", "model.emb", "model.conv"])
  assert t["base_model.model.model.q.lora_A.weight"].shape == (4, 8)
  assert t["base_model.model.model.q.lora_B.weight"].shape == (8, 4)
  assert t["base_model.model.model.emb.lora_embedding_A"].shape == (4, 10)
  assert t["base_model.model.model.conv.lora_A.weight"].shape == (4, 2, 3, 3)
  assert t["base_model.model.model.conv.lora_B.weight"].shape == (4, 4, 1, 1)

  def rank_alpha(name):
    return (cfg["rank_pattern"].get(name, cfg["r"]), cfg["alpha_pattern"].get(name, cfg["lora_alpha"]))

  # Independent reference in torch orientation: dW = (alpha / r) * B @ A == dK.T (flattened).
  for name, key, ad in [("model.q", "q", ads["q"]["kernel"]), ("model.dense", "dense", ads["dense"]["kernel"])]:
    r, alpha = rank_alpha(name)
    dw = alpha / r * t[f"base_model.model.{name}.lora_B.weight"] @ t[f"base_model.model.{name}.lora_A.weight"]
    np.testing.assert_allclose(dw, np.asarray(kernel_delta(ad)).reshape(ad.shape).T, rtol=1e-5, atol=1e-5)
  sds = ads["q"]["kernel"]
  np.testing.assert_allclose(t["base_model.model.model.q.lora_B.weight"],
                             np.concatenate([sds.b.T, sds.qb], axis=1), rtol=1e-6)
  np.testing.assert_allclose(t["base_model.model.model.q.lora_A.weight"],
                             np.concatenate([sds.qa.T, sds.a.T], axis=0), rtol=1e-6)
  assert rank_alpha("model.q") == (4, pytest.approx(4 * 0.75))
  # Conv: dW[o, c, h, w] = s * sum_r B[o, r] A[r, c, h, w] == K[h, w, c, o].
  r, alpha = rank_alpha("model.conv")
  a_c, b_c = t["base_model.model.model.conv.lora_A.weight"], t["base_model.model.model.conv.lora_B.weight"]
  dw = alpha / r * np.einsum("or,rchw->hwco", b_c[:, :, 0, 0], a_c)
  np.testing.assert_allclose(dw, kernel_delta(ads["conv"]["kernel"]), rtol=1e-5, atol=1e-5)


def test_rslora_import_and_exact_truncation(tmp_path):
  a_t = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)  # r=4 > min(3, 2)
  b_t = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
  save_file({"base_model.model.lin.lora_A.weight": a_t, "base_model.model.lin.lora_B.weight": b_t},
            str(tmp_path / "adapter_model.safetensors"))
  (tmp_path / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True}))
  back = peft.import_peft(tmp_path, {"lin": {"kernel": jnp.zeros((3, 2))}}, module_names={"lin": "lin"})
  ad = back["lin"]["kernel"]
  assert ad.rank == 2 and ad.scale == pytest.approx(8 / 2.0)
  np.testing.assert_allclose(kernel_delta(ad), (8 / 2.0 * b_t @ a_t).T, rtol=1e-5, atol=1e-5)


def test_overwrite_refused(tmp_path):
  peft.export_peft(tmp_path, _adapters(), module_names=NAMES)
  with pytest.raises(FileExistsError, match=r"adapter_config.json exists; pass overwrite=True"):
    peft.export_peft(tmp_path, _adapters(), module_names=NAMES)
  peft.export_peft(tmp_path, _adapters(), module_names=NAMES, overwrite=True)


def test_export_errors(tmp_path):
  with pytest.raises(KeyError, match=r"module_names has no entry for 'conv/kernel'"):
    peft.export_peft(tmp_path, _adapters(), module_names={k: v for k, v in NAMES.items() if k != "conv"})
  with pytest.raises(ValueError, match=r"module name 'x' is given to both"):
    peft.export_peft(tmp_path, _adapters(), module_names=lambda p: "x")


def _write(tmp_path, tensors, config):
  save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))


GOOD = {"base_model.model.lin.lora_A.weight": np.ones((2, 3), np.float32),
        "base_model.model.lin.lora_B.weight": np.ones((4, 2), np.float32)}
CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 2}
P = {"lin": {"kernel": jnp.zeros((3, 4))}}


@pytest.mark.parametrize("tensors,config,error,match", [
    (GOOD, {**CFG, "r": 3}, ValueError, r"module 'lin': tensors have rank 2 but the config says r=3"),
    ({k: v for k, v in GOOD.items() if "lora_B" in k}, CFG, ValueError, r"module 'lin': lora_A is missing"),
    ({**GOOD, "base_model.model.lin.lora_B.weight": np.ones((5, 2), np.float32)}, CFG, ValueError,
     r"lora_B \(5, 2\) do not fit the kernel 'lin/kernel' of shape \(3, 4\)"),
    ({**GOOD, "junk": np.ones(2, np.float32)}, CFG, ValueError, r"unexpected tensor 'junk'"),
    ({"base_model.model.other.lora_A.weight": GOOD["base_model.model.lin.lora_A.weight"],
      "base_model.model.other.lora_B.weight": GOOD["base_model.model.lin.lora_B.weight"]}, CFG,
     ValueError, r"module 'other' in the adapter has no Flax kernel"),
    (GOOD, {**CFG, "peft_type": "IA3"}, ValueError, r"peft_type is 'IA3'"),
    (GOOD, {**CFG, "use_dora": True}, NotImplementedError, r"DoRA"),
    (GOOD, {"peft_type": "LORA"}, ValueError, r"'r' must be a finite positive number"),
])
def test_import_errors(tmp_path, tensors, config, error, match):
  _write(tmp_path, tensors, config)
  with pytest.raises(error, match=match):
    peft.import_peft(tmp_path, P, module_names={"lin": "lin"})


def test_corrupted_files(tmp_path):
  _write(tmp_path, GOOD, CFG)
  assert peft.import_peft(tmp_path, P, module_names={"lin": "lin"})["lin"]["kernel"].rank == 2
  (tmp_path / "adapter_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
    peft.import_peft(tmp_path, P, module_names={"lin": "lin"})
  _write(tmp_path, GOOD, CFG)
  (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
  with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a readable safetensors file"):
    peft.import_peft(tmp_path, P, module_names={"lin": "lin"})
  (tmp_path / "adapter_model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors is missing"):
    peft.import_peft(tmp_path, P, module_names={"lin": "lin"})
  with pytest.raises(ValueError, match=r"module_names keys \['nope'\] name no kernel"):
    _write(tmp_path, GOOD, CFG)
    peft.import_peft(tmp_path, P, module_names={"nope": "lin"})


@pytest.mark.parametrize("kind,what", [
    ("conv_grouped", r"a grouped convolution \(feature_group_count > 1\)"),
    ("conv_transpose", r"a ConvTranspose \(its kernel orientation differs from torch.s\)"),
    ("conv_local", r"a ConvLocal \(unshared weights.*\)"),
])
def test_unexportable_conv_kinds(tmp_path, kind, what):
  ads = _adapters()
  ads["conv"]["kernel"] = _ad(jax.random.key(1), (3, 3, 2, 4), (0, 1, 2), kind=kind)
  with pytest.raises(NotImplementedError, match=r"cannot export the adapter at 'conv/kernel' "
                     rf"\(kernel shape \(3, 3, 2, 4\)\): it is on {what}, which has no PEFT LoRA"):
    peft.export_peft(tmp_path, ads, module_names=NAMES)
  assert not (tmp_path / peft.CONFIG_NAME).exists() and not (tmp_path / peft.WEIGHTS_NAME).exists()
  # A PEFT Conv adapter is not read onto such a kernel when the layouts say what it is.
  peft.export_peft(tmp_path, _adapters(), module_names=NAMES)
  lay = {"conv/kernel": KernelLayout((3, 3, 2, 4), (0, 1, 2), kind)}
  with pytest.raises(NotImplementedError, match=r"cannot import the adapter at 'conv/kernel'"):
    peft.import_peft(tmp_path, PARAMS, module_names=NAMES, layouts=lay)


# ----------------------------------------------------------------------------- rank / alpha patterns

ATTN = {"l0": {n: {"kernel": jnp.zeros((4, 4))} for n in ("query", "key", "value")}}
ATTN_NAMES = {f"l0/{n}": f"enc.l0.{n}" for n in ("query", "key", "value")}


def _write_attn(tmp_path, ranks, config):
  rng = np.random.default_rng(0)
  tensors = {}
  for n in ("query", "key", "value"):
    tensors[f"base_model.model.enc.l0.{n}.lora_A.weight"] = rng.normal(size=(ranks[n], 4)).astype(
        np.float32)
    tensors[f"base_model.model.enc.l0.{n}.lora_B.weight"] = rng.normal(size=(4, ranks[n])).astype(
        np.float32)
  _write(tmp_path, tensors, {"peft_type": "LORA", **config})
  back = peft.import_peft(tmp_path, ATTN, module_names=ATTN_NAMES)
  return {n: back["l0"][n]["kernel"] for n in ("query", "key", "value")}


def test_alpha_pattern_alternation_key(tmp_path):
  # The key is grouped as PEFT does: "query|value" names both modules.
  ads = _write_attn(tmp_path, dict(query=2, key=2, value=2),
                    {"r": 2, "lora_alpha": 2, "alpha_pattern": {"query|value": 8}})
  assert [ads[n].scale for n in ("query", "key", "value")] == [4.0, 1.0, 4.0]


def test_rank_pattern_alternation_key(tmp_path):
  ads = _write_attn(tmp_path, dict(query=3, key=2, value=3),
                    {"r": 2, "lora_alpha": 6, "rank_pattern": {"query|value": 3}})
  assert [ads[n].rank for n in ("query", "key", "value")] == [3, 2, 3]
  assert [ads[n].scale for n in ("query", "key", "value")] == [2.0, 3.0, 2.0]


def test_pattern_first_matching_key_wins(tmp_path):
  # An exact module name gets no priority over an earlier matching key.
  ads = _write_attn(tmp_path, dict(query=2, key=2, value=2), {
      "r": 2, "lora_alpha": 2, "alpha_pattern": {"query": 4, "enc.l0.query": 16, "l0.key": 6}})
  assert [ads[n].scale for n in ("query", "key", "value")] == [2.0, 3.0, 1.0]
  ads = _write_attn(tmp_path, dict(query=3, key=3, value=2), {
      "r": 2, "lora_alpha": 6, "use_rslora": True,
      "rank_pattern": {"l0.(query|key)": 3, "enc.l0.query": 4}})
  assert [ads[n].rank for n in ("query", "key", "value")] == [3, 3, 2]
  assert ads["query"].scale == pytest.approx(6 / np.sqrt(3))


DOCS_KEY = "^model.decoder.layers.0.encoder_attn.k_proj"  # LoraConfig's docstring example


@pytest.mark.parametrize("patterns,name,want", [
    ({DOCS_KEY: 16}, "model.decoder.layers.0.encoder_attn.k_proj", 16),
    ({DOCS_KEY: 16}, "model.decoder.layers.0.self_attn.k_proj", 8),
    ({DOCS_KEY: 16}, "model.decoder.layers.10.encoder_attn.k_proj", 8),
    ({DOCS_KEY: 16}, "base.model.decoder.layers.0.encoder_attn.k_proj", 8),  # "^": no prefix
    ({"k_proj": 4, DOCS_KEY: 16}, "model.decoder.layers.0.encoder_attn.k_proj", 4),
    ({DOCS_KEY: 16, "k_proj": 4}, "model.decoder.layers.0.encoder_attn.k_proj", 16),
    ({DOCS_KEY: 16, "k_proj": 4}, "model.decoder.layers.1.encoder_attn.k_proj", 4),
    ({"query|value": 2}, "encoder.layer.0.attention.self.value", 2),
    ({"query|value": 2}, "encoder.layer.0.attention.self.key", 8),
    ({"proj": 2}, "model.k_proj", 8),  # a key matches whole dotted components at the end
    ({"k_proj": 2}, "model.k_proj.base", 8),
    ({r"layers\.\d+\.self_attn\.(q|v)_proj": 2}, "model.layers.12.self_attn.v_proj", 2),
    ({".*attn.k_proj": 2}, "model.decoder.layers.0.encoder_attn.k_proj", 2),
    ({}, "any.name", 8),
    (None, "any.name", 8),
])
def test_pattern_matches_peft(patterns, name, want):
  assert peft._pattern(patterns, name, 8) == want


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("config,field", [
    ({**CFG, "lora_alpha": float("nan")}, r"'lora_alpha' must be a finite positive .*, got nan"),
    ({**CFG, "lora_alpha": float("inf")}, r"'lora_alpha' must be a finite positive .*, got inf"),
    ({**CFG, "r": float("inf")}, r"'r' must be a finite positive number, got inf"),
    ({**CFG, "r": float("nan")}, r"'r' must be a finite positive number"),
    ({**CFG, "lora_alpha": True}, r"'lora_alpha' must be a finite positive number, got True"),
    ({**CFG, "alpha_pattern": {"lin": float("nan")}},
     r"alpha_pattern\['lin'\] must be a finite positive number, got nan"),
    ({**CFG, "alpha_pattern": {"other": float("-inf")}},
     r"alpha_pattern\['other'\] must be a finite positive number, got -inf"),
    ({**CFG, "rank_pattern": {"l.n": float("inf")}},
     r"rank_pattern\['l.n'\] must be a finite positive number, got inf"),
    ({**CFG, "rank_pattern": {"lin": 0}}, r"rank_pattern\['lin'\] must be a finite positive"),
    ({**CFG, "alpha_pattern": [2]}, r"'alpha_pattern' must be a JSON object, got list"),
    ({**CFG, "alpha_pattern": {"(lin": 2}}, r"alpha_pattern key '\(lin' is not a valid regex"),
    # Would backtrack for hours against a long module name: refused before any matching.
    ({**CFG, "rank_pattern": {r"(\w|.)*Q": 8}}, r"rank_pattern key .* exponential time"),
    ({**CFG, "alpha_pattern": {r"(l+)+x": 8}}, r"alpha_pattern key .* exponential time"),
])
def test_import_rejects_bad_config_numbers(tmp_path, config, field):
  _write(tmp_path, GOOD, config)  # json writes nan / inf as NaN / Infinity, and reads them back
  cfg_path = re.escape(str(tmp_path / "adapter_config.json"))
  with pytest.raises(ValueError, match=rf"{cfg_path}: {field}"):
    peft.import_peft(tmp_path, P, module_names={"lin": "lin"})


@pytest.mark.parametrize("text,field", [
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}', "'lora_alpha'"),
    ('{"peft_type": "LORA", "r": Infinity, "lora_alpha": 2}', "'r'"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "alpha_pattern": {"lin": -Infinity}}',
     r"alpha_pattern\['lin'\]"),
])
def test_import_rejects_json_nan_infinity(tmp_path, text, field):
  _write(tmp_path, GOOD, CFG)
  (tmp_path / "adapter_config.json").write_text(text)
  with pytest.raises(ValueError, match=rf"adapter_config.json: {field} must be a finite positive"):
    peft.import_peft(tmp_path, P, module_names={"lin": "lin"})


@pytest.mark.parametrize("field", ["a", "b", "qa", "qb"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_export_refuses_non_finite(tmp_path, field, bad):
  ads = _adapters()
  ad = ads["q"]["kernel"]
  value = np.array(getattr(ad, field)).copy()
  value[1, 0] = bad
  ads["q"]["kernel"] = dataclasses.replace(ad, **{field: jnp.asarray(value)})
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=rf"cannot export the adapter at 'q/kernel': {field} holds "
                     r"non-finite values \(NaN or inf\)"):
    peft.export_peft(out, ads, module_names=NAMES)
  assert not out.exists()
  # Nor is an existing directory touched.
  out.mkdir()
  with pytest.raises(ValueError, match=r"'q/kernel'"):
    peft.export_peft(out, ads, module_names=NAMES, overwrite=True)
  assert list(out.iterdir()) == []


def test_export_refuses_non_finite_scale(tmp_path):
  ads = _adapters()
  ads["dense"]["kernel"] = dataclasses.replace(ads["dense"]["kernel"], scale=float("inf"))
  with pytest.raises(ValueError,
                     match=r"cannot export the adapter at 'dense/kernel': its scale is inf"):
    peft.export_peft(tmp_path / "out", ads, module_names=NAMES)
  assert not (tmp_path / "out").exists()


def test_export_patterns_survive_peft_matching(tmp_path):
  # "o" ends "m.attn.o" at a "." and "m.q" matches "mXq" as a regex: PEFT would give those
  # modules the other's rank and alpha, so the keys become anchored, escaped regexes.
  names = {"dense/kernel": "o", "q": "m.attn.o", "o": "m.q", "emb": "mXq", "conv": "m.conv"}
  ads = _adapters()
  peft.export_peft(tmp_path, ads, module_names=names)
  cfg = json.loads((tmp_path / peft.CONFIG_NAME).read_text())
  assert cfg["r"] == 4 and cfg["rank_pattern"] == {r"^m\.q": 2, "^o": 3}
  for field, default in [("rank_pattern", cfg["r"]), ("alpha_pattern", cfg["lora_alpha"])]:
    plain = {k.lstrip("^").replace("\\", ""): v for k, v in cfg[field].items()}
    assert any(peft._pattern(plain, n, default) != peft._pattern(cfg[field], n, default)
               for n in names.values())
  back = peft.import_peft(tmp_path, PARAMS, module_names=names)
  for path in [("dense", "kernel"), ("q", "kernel"), ("o", "kernel"), ("emb", "embedding")]:
    src, dst = ads[path[0]][path[1]], back[path[0]][path[1]]
    np.testing.assert_allclose(kernel_delta(dst), kernel_delta(src), rtol=1e-5, atol=1e-5)
  # Plain names are kept where PEFT reads them right.
  peft.export_peft(tmp_path, ads, module_names=NAMES, overwrite=True)
  cfg = json.loads((tmp_path / peft.CONFIG_NAME).read_text())
  assert cfg["rank_pattern"] == {"m.attn.o": 2, "m.dense": 3}


def test_a_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
  import sys
  ad = {"w": sl.init_adapter(jax.random.key(0), 4, 3, rank=2, scale=1.0, method="lora")}
  monkeypatch.setitem(sys.modules, "safetensors", None)
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(ImportError, match=r"sdslora-jax\[export\]"):
    sl.export_peft(tmp_path / "out", ad, module_names=lambda p: p)
  assert not (tmp_path / "out").exists()  # nothing written
