"""The import rules of docs/architecture.md hold (import-linter and grimp read the code).

A lower layer importing a higher one, the library importing the repo's
configs/, or the loop, checkpoints or evaluation reaching a method module by
name (instead of through `methods.registry`) fails here.
"""

import os
import subprocess
import sys

import grimp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What outside code may import from moco_jax.methods: the interface, the
# registry and the pieces methods share. Never a method itself.
METHODS_API = {'moco_jax.methods', 'moco_jax.methods.base', 'moco_jax.methods.registry',
               'moco_jax.methods.contrastive'}


def test_import_linter_contracts_are_kept():
  # In a subprocess: import-linter reconfigures logging, which later tests capture.
  result = subprocess.run(
      [sys.executable, '-c', 'import sys; from importlinter import cli; sys.exit('
       'cli.lint_imports(config_filename=".importlinter", no_cache=True, no_logo=True))'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_only_the_registry_imports_method_modules(monkeypatch):
  monkeypatch.chdir(ROOT)
  graph = grimp.build_graph('moco_jax', cache_dir=None)
  outside = graph.find_children('moco_jax') - {'moco_jax.methods'}
  method_modules = graph.find_descendants('moco_jax.methods') - METHODS_API
  assert method_modules, 'no method module found: the test would check nothing'
  wrong = []
  for module in sorted(method_modules):
    importers = graph.find_modules_that_directly_import(module)
    for importer in sorted(importers):
      if any(importer == o or importer.startswith(o + '.') for o in outside):
        wrong.append(f'{importer} imports {module}')
  assert not wrong, 'Reach methods through moco_jax.methods.registry: ' + '; '.join(wrong)


def _import_cycles(graph) -> list:
  """Strongly connected groups of more than one module in `graph` (Tarjan's algorithm)."""
  modules = sorted(graph.modules)
  edges = {m: sorted(set(graph.find_modules_directly_imported_by(m)) & set(modules))
           for m in modules}
  index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        cycles.append(sorted(group))

  for module in modules:
    if module not in index:
      visit(module)
  return cycles


def test_the_import_graph_has_no_circle(monkeypatch):
  """Function-level imports count too: grimp reads every import statement."""
  monkeypatch.chdir(ROOT)
  graph = grimp.build_graph('moco_jax', cache_dir=None)
  assert _import_cycles(graph) == []
  # The detector finds a circle when there is one.
  graph.add_import(importer='moco_jax.core.errors', imported='moco_jax.cli')
  assert _import_cycles(graph)


def _python_files(folder: str):
  for dirpath, _, filenames in os.walk(os.path.join(ROOT, folder)):
    for name in sorted(filenames):
      if name.endswith('.py'):
        yield os.path.join(dirpath, name)


def test_no_module_uses_another_modules_private_names():
  """`module._name` across modules is a seam that nobody declared: make it public or move it."""
  import ast  # pylint: disable=g-import-not-at-top
  wrong = []
  for path in _python_files('moco_jax'):
    tree = ast.parse(open(path).read(), path)
    imported = {alias.asname or alias.name.split('.')[-1]  # Names bound to moco_jax modules.
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('moco_jax')
                or isinstance(node, ast.Import)
                and any(a.name.startswith('moco_jax') for a in node.names)
                for alias in node.names}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('moco_jax'):
        wrong += [f'{path}: from {node.module} import {a.name}' for a in node.names
                  if a.name.startswith('_')]
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
          and not node.attr.startswith('__') and isinstance(node.value, ast.Name)
          and node.value.id in imported):
        wrong.append(f'{os.path.relpath(path, ROOT)}:{node.lineno}: {node.value.id}.{node.attr}')
  assert not wrong, wrong


# The network's input (its side and channel count): read by the model-side code that builds
# the step, the encoders and the feature function. Nothing else of config.data is.
INPUT_FIELDS = ('image_size', 'channels')


def test_only_the_data_package_reads_the_data_section():
  """`config.data` is resolved once, into `data.spec.DataSpec`, by the data package.

  Outside it, code holds a `sources.Source` (or its spec), and reads only the
  network's input fields (`INPUT_FIELDS`) of the section.
  """
  import ast  # pylint: disable=g-import-not-at-top
  wrong = []
  for path in _python_files('moco_jax'):
    if os.sep + os.path.join('moco_jax', 'data') + os.sep in path:
      continue
    tree = ast.parse(open(path).read(), path)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and node.attr == 'data' and (
          isinstance(node.value, ast.Name) and node.value.id == 'config' or
          isinstance(node.value, ast.Attribute) and node.value.attr == 'config'):
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.attr in INPUT_FIELDS:
          continue
        call = parents.get(parent)
        if (isinstance(parent, ast.Attribute) and parent.attr == 'get' and
            isinstance(call, ast.Call) and call.args and
            isinstance(call.args[0], ast.Constant) and call.args[0].value in INPUT_FIELDS):
          continue
        wrong.append(f'{os.path.relpath(path, ROOT)}:{node.lineno}')
  assert not wrong, 'Build the source once (data.sources.from_config) and pass it: ' + str(wrong)
