"""The README's evidence block is rebuilt from the results JSON alone."""

from __future__ import annotations

import json
import shutil

from experiments import results_section

RESULTS = results_section.RESULTS


def test_block_is_regenerated_from_json_only(tmp_path):
  for name in ("conditioning.json", "geometry.json", "ablations.json"):
    shutil.copy(RESULTS / name, tmp_path / name)
  text = results_section.section(tmp_path)
  # The tables are those the experiments wrote, rebuilt from the JSON.
  assert (RESULTS / "conditioning.md").read_text().strip().splitlines()[-1] in text
  assert (tmp_path / "conditioning.png").exists() and (tmp_path / "geometry.png").exists()
  assert "| cos(full-FT gradient, induced update) | SDS-LoRA |" in text
  assert "Fine-tuning grid: not run yet" in text  # no finetune.json here
  # The ablation table, rebuilt: one row per variant in the JSON.
  ablations = (tmp_path / "ablations.md").read_text()
  assert ablations.strip() in text and (tmp_path / "ablations.png").exists()
  assert ablations.count("\n| sds") == len({r["variant"] for r in json.loads(
      (RESULTS / "ablations.json").read_text()) if r["variant"].startswith("sds")})
  readme = tmp_path / "README.md"
  readme.write_text(f"a\n{results_section.BEGIN}\nold\n{results_section.END}\nb\n")
  assert results_section.main(["--readme", str(readme), "--results", str(tmp_path)]) == 0
  out = readme.read_text()
  assert out.startswith("a\n") and out.endswith("\nb\n") and "old" not in out and text in out
