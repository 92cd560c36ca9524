"""The layers the code promises, read from its imports (module-level and inside functions):
storage at the bottom, then the data side (data_pipelines), then uniemox_jax's library, then
the commands, which nothing imports; and no import circles."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data_pipelines", "uniemox_jax")
# The commands: entry points, imported by nothing.
COMMANDS = ("uniemox_jax.main", "uniemox_jax.demo", "uniemox_jax.evaluate",
            "uniemox_jax.predict", "uniemox_jax.plots", "uniemox_jax.explain",
            "uniemox_jax.suite", "uniemox_jax.results")
COMMAND_PACKAGES = ("uniemox_jax.tools",)


def _modules():
  """{module name: path} of every module of the two packages."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
          out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
              os.path.join(folder, f)
  return out


def _imports(name, path, known):
  """The project modules `name` imports anywhere in its file."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:             # relative: from the module's package
        parts = name.split(".")[:-node.level]
        base = ".".join(parts + ([base] if base else []))
      # `from package import module` depends on the module; `from module import name` on
      # the module (a package's __init__ that a submodule imports from is not a circle).
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in known:
        target = target.rpartition(".")[0]
      if target and target != name:
        found.add(target)
  return found


def _graph():
  known = _modules()
  return {name: _imports(name, path, known) for name, path in known.items()}


def _is_command(module):
  return module in COMMANDS or module.startswith(tuple(p + "." for p in COMMAND_PACKAGES))


def test_the_data_side_imports_no_training_code():
  bad = sorted(f"{m} imports {t}" for m, ts in _graph().items() if m.startswith("data_pipelines")
               for t in ts if t.startswith("uniemox_jax"))
  assert not bad, bad


def test_storage_is_a_leaf():
  assert _graph()["data_pipelines.storage"] == set()


def test_nothing_imports_a_command():
  bad = sorted(f"{m} imports the command {t}" for m, ts in _graph().items() for t in ts
               if _is_command(t))
  assert not bad, bad


def test_no_import_circles():
  graph = _graph()
  circles, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, stack)
    stack.pop()
    state[node] = "done"
  for node in sorted(graph):
    if node not in state:
      visit(node, [])
  assert not circles, circles


def test_the_rules_see_imports_inside_functions(tmp_path):
  """The reader is not fooled by a function-level import (how the circles were hidden)."""
  path = tmp_path / "m.py"
  path.write_text("def f():\n  from uniemox_jax import evaluate\n  import data_pipelines.storage\n")
  known = _modules()
  assert _imports("uniemox_jax.x", str(path), known) == {"uniemox_jax.evaluate",
                                                          "data_pipelines.storage"}
