"""Every Python example in the README runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
  assert len(BLOCKS) >= 3


def _needs_llm_code(block):
  """Examples on Gemma or MaxText run with the ``llm`` tests (``make test``, not ``test-library``)."""
  return re.search(r"^\s*(from|import) (gemma|maxtext)\b", block, flags=re.M) is not None


@pytest.mark.parametrize("index", [
    pytest.param(i, marks=pytest.mark.llm) if _needs_llm_code(b) else i
    for i, b in enumerate(BLOCKS)])
def test_readme_example_runs(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples that write files write here
  exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
