"""The package's import graph, counting imports inside functions, is acyclic, and imports sit at
module level but for the CLI's one deferred import of TensorFlow (behind the model_dir lock)."""

import ast
import glob
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "nnclr_tf")
# (module, imported module): the imports allowed inside a function, and why.
DEFERRED = {("cli", "experiment"), ("cli", "progress")}  # TensorFlow after the lock (cli.main)


def modules():
  return {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(PACKAGE, "*.py"))}


def imports(path, names):
  """[(imported nnclr_tf module, inside a function?)] of the module at `path`."""
  tree = ast.parse(open(path).read())
  inside = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      inside |= {id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
  out = []
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nnclr_tf"):
      if node.module == "nnclr_tf":
        targets = [a.name for a in node.names if a.name in names]
      else:
        targets = [node.module.split(".")[1]]
    elif isinstance(node, ast.Import):
      targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("nnclr_tf.")]
    out += [(t, id(node) in inside) for t in targets]
  return out


def function_local_imports(path):
  tree = ast.parse(open(path).read())
  return [sub for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef,
                                                               ast.AsyncFunctionDef))
          for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))]


def graph():
  mods = modules()
  return {m: {t for t, _ in imports(p, mods) if t != m} for m, p in mods.items()}


def cycle(g):
  """One cycle of the directed graph `g` as a list of nodes, or None."""
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(g.get(node, ())):
      if state.get(nxt) == "open":
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, path + [nxt])
        if found:
          return found
    state[node] = "done"
    return None

  for start in sorted(g):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


def test_the_import_graph_is_acyclic():
  g = graph()
  assert len(g) > 20
  assert cycle(g) is None, " -> ".join(cycle(g))


def test_the_cycle_finder_finds_one():
  assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_are_at_module_level_but_the_clis_deferred_one():
  mods = modules()
  found = set()
  for name, path in mods.items():
    found |= {(name, t) for t, inside in imports(path, mods) if inside}
    for node in function_local_imports(path):
      what = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
      if not (what or "").startswith("nnclr_tf"):
        found.add((name, what))
  assert found == DEFERRED
