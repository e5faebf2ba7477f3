"""PEFT export of the outside LLMs against PyTorch PEFT (opt in with ``-m peft_torch``).

Adapters made by the op-level path on Gemma and MaxText, exported under Hugging Face
names with the glue of ``test_llm_outside`` (fused k/v and gate/up split), must load
into PEFT on the matching ``transformers`` model with exactly the keys and shapes PEFT
itself creates for those modules and ranks, and give the same update per module.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
hf_peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from sdslora_jax import intercept, peft  # noqa: E402
from test_llm_outside import (  # noqa: E402
    GEMMA_RULES,
    MAXTEXT_HF_NAMES,
    MAXTEXT_RULES,
    _exported_updates,
    _maxtext,
    gemma,  # noqa: F401 (fixture)
    gemma_hf_names,
)
from testing_utils import randomize  # noqa: E402

pytestmark = pytest.mark.peft_torch

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_hidden_layers=2)


def _check_against_peft(directory, hf_model):
  """Our file's keys and shapes equal those of a PEFT model made for the same modules."""
  with open(os.path.join(directory, "adapter_config.json")) as f:
    cfg = json.load(f)
  from safetensors.numpy import load_file
  ours = {k: v.shape for k, v in load_file(os.path.join(directory,
                                                         "adapter_model.safetensors")).items()}
  config = hf_peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                              target_modules=cfg["target_modules"],
                              rank_pattern=cfg["rank_pattern"], alpha_pattern=cfg["alpha_pattern"])
  fresh = hf_peft.get_peft_model(hf_model, config)
  theirs = {k: tuple(v.shape) for k, v in hf_peft.get_peft_model_state_dict(fresh).items()}
  assert ours == theirs
  loaded = hf_peft.PeftModel.from_pretrained(fresh.base_model.model, directory)
  state = hf_peft.get_peft_model_state_dict(loaded)
  files = load_file(os.path.join(directory, "adapter_model.safetensors"))
  for k, v in files.items():
    np.testing.assert_array_equal(state[k].numpy(), v)


def test_gemma_export_loads_into_peft(gemma, tmp_path):  # noqa: F811
  fn, params, tokens = gemma
  ads = randomize(intercept.init_adapters(jax.random.key(2), fn, params, GEMMA_RULES[:2],
                                          tokens), jax.random.key(3))
  peft.export_peft(tmp_path / "g", ads, module_names=gemma_hf_names(2))
  model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**TINY))
  _check_against_peft(tmp_path / "g", model)
  assert len(_exported_updates(tmp_path / "g")) == 14


def test_maxtext_export_loads_into_peft(tmp_path):
  fn, params, _, inputs, mesh, rules_ctx, _ = _maxtext(1)
  with jax.set_mesh(mesh), rules_ctx():
    ads = intercept.init_adapters(jax.random.key(2), fn, params, MAXTEXT_RULES, *inputs)
  peft.export_peft(tmp_path / "m", randomize(ads, jax.random.key(3)),
                   module_names=MAXTEXT_HF_NAMES)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
  _check_against_peft(tmp_path / "m", model)
