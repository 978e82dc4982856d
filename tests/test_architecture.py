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
