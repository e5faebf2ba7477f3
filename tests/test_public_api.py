"""The public API is what the README's table lists: every name there exists, nothing else is exported."""

import importlib
import pathlib
import re

PUBLIC = ("sdslora_jax", "sdslora_jax.linen", "sdslora_jax.nnx", "sdslora_jax.optim",
          "sdslora_jax.diagnostics")
README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _table() -> dict[str, set[str]]:
  text = README.read_text()
  section = text[text.index("## Public API"):]
  section = section[:section.index("\n## ", 1)]
  names, module = {}, None
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    separator = all(c and set(c) <= {"-"} for c in cells)
    if len(cells) != 3 or not line.startswith("|") or separator or cells[0] == "module":
      continue
    module = cells[0].strip("`") or module
    names.setdefault(module, set()).update(re.findall(r"`(\w+)`", cells[1]))
  return names


def test_the_readme_table_is_the_exported_api():
  table = _table()
  assert set(table) == set(PUBLIC)
  for module in PUBLIC:
    exported = set(importlib.import_module(module).__all__)
    if module == "sdslora_jax.optim":
      exported.discard("sds_lora")  # listed once, at the top level
    assert exported == table[module], module


def test_every_public_name_resolves_and_is_one_idea():
  seen = {}
  for module in PUBLIC:
    m = importlib.import_module(module)
    for name in m.__all__:
      obj = getattr(m, name)
      seen.setdefault(id(obj), []).append(f"{module}.{name}")
  # One object per name; the only re-export is sds_lora (top level and optim).
  dups = sorted(v for v in seen.values() if len(v) > 1)
  assert dups == [["sdslora_jax.sds_lora", "sdslora_jax.optim.sds_lora"]]


def test_the_surface_stays_small():
  total = sum(len(v) for v in _table().values())
  assert total <= 55, total
