"""The package's layers, read from its source: no cycles, no import upward, no experiments."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sdslora_jax"
# The functional core: pure functions and the adapter pytree, no Flax (README, "Layout").
CORE = ("sdslora_jax._checks", "sdslora_jax._linalg", "sdslora_jax._batching",
        "sdslora_jax._trees", "sdslora_jax.basis",
        "sdslora_jax.gram_basis", "sdslora_jax.ops", "sdslora_jax.reparam",
        "sdslora_jax.retraction", "sdslora_jax.adapter", "sdslora_jax.fused")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, nodes) -> set[str]:
  """``from X import Y`` counts as an import of ``X.Y`` when that is a module, else of ``X``."""
  modules, out = _modules(), set()
  for node in nodes:
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
      out.update(subs or {node.module})
  return out


def _top_level_imports(path: pathlib.Path) -> set[str]:
  """Modules imported at module level (imports inside functions are deferred, not layering)."""
  return _imports(path, ast.parse(path.read_text()).body)


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: {i for i in _top_level_imports(p) if i in modules and i != m}
          for m, p in modules.items()}


def _all_imports() -> dict[str, set[str]]:
  return {m: _imports(p, ast.walk(ast.parse(p.read_text()))) for m, p in _modules().items()}


def test_the_library_imports_nothing_from_the_experiments():
  bad = {m: sorted(i for i in imps if i.split(".")[0] == "experiments")
         for m, imps in _all_imports().items()}
  assert not {m: v for m, v in bad.items() if v}


def test_the_library_tests_need_no_experiments():
  """``tests/*.py`` (``make test-library``) run without the experiments' code; tests of the
  library on the experiments' models and problems live in ``tests/experiments/``."""
  tests = pathlib.Path(__file__).resolve().parent
  bad = {p.name: sorted(i for i in _imports(p, ast.walk(ast.parse(p.read_text())))
                        if i.split(".")[0] == "experiments")
         for p in tests.glob("*.py")}
  assert not {m: v for m, v in bad.items() if v}


@pytest.mark.parametrize("module", CORE)
def test_the_functional_core_needs_no_flax(module):
  graph, seen, todo = _graph(), set(), [module]
  while todo:  # everything the core module loads at import time, inside the package
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo.extend(graph.get(m, ()))
  modules = _modules()
  flax = {m for m in seen if any(i.split(".")[0] == "flax" for i in _top_level_imports(modules[m]))}
  assert seen <= set(CORE) | {"sdslora_jax"}, sorted(seen - set(CORE))
  assert not flax, sorted(flax)


def test_no_import_cycles():
  graph, state, cycles = _graph(), {}, []

  def visit(m, stack):
    state[m] = "open"
    for n in graph[m]:
      if state.get(n) == "open":
        cycles.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n, stack + [n])
    state[m] = "done"

  for m in graph:
    if m not in state:
      visit(m, [m])
  assert not cycles, cycles


# The layers, lowest first (README, "Layout"): a module may import its own layer and the
# ones below, never one above, not even inside a function.
LAYERS = (
    CORE,
    ("sdslora_jax.targets", "sdslora_jax.quantized", "sdslora_jax.tree", "sdslora_jax.intercept",
     "sdslora_jax.peft", "sdslora_jax.sharding", "sdslora_jax.checkpoint",
     "sdslora_jax.diagnostics"),
    ("sdslora_jax.optim.schedules", "sdslora_jax.optim.grouping", "sdslora_jax.optim.state_reset",
     "sdslora_jax.optim.sds", "sdslora_jax.optim.baselines", "sdslora_jax.optim"),
    ("sdslora_jax.linen", "sdslora_jax.nnx"),
    ("sdslora_jax",),
)


def test_every_module_has_a_layer():
  assert set(_modules()) == {m for layer in LAYERS for m in layer}


def test_no_import_reaches_a_higher_layer():
  level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
  upward = {m: sorted(i for i in imps if i in level and level[i] > level[m])
            for m, imps in _all_imports().items()}
  assert not {m: v for m, v in upward.items() if v}
