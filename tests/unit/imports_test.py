"""The layering rule that import-linter cannot see: no imports inside library functions.

The layers themselves are import-linter's contracts (.importlinter), which
.ci/run checks with `lint-imports`.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Importing the package stays cheap: `clm_jax.load` imports the model on first use.
_LAZY_ALLOWED = {ROOT / 'clm_jax' / '__init__.py'}


def _function_level_imports(source: str, name: str) -> list[str]:
  found = {}
  for node in ast.walk(ast.parse(source, name)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for sub in ast.walk(node):
        if isinstance(sub, (ast.Import, ast.ImportFrom)):
          found[sub.lineno] = f'{name}:{sub.lineno}: {ast.unparse(sub)}'
  return [found[line] for line in sorted(found)]


def test_library_imports_at_module_level_only():
  # A function-level import can hide a cycle between layers from the contract;
  # only launch/ defers imports (so that `--help` needs no JAX start-up).
  files = sorted(set((ROOT / 'clm_jax').rglob('*.py')) - _LAZY_ALLOWED)
  assert len(files) > 40
  found = [
    line
    for path in files
    for line in _function_level_imports(path.read_text(), str(path.relative_to(ROOT)))
  ]
  assert not found, 'imports inside functions:\n' + '\n'.join(found)


def test_the_check_finds_nested_imports():
  source = 'import os\n\ndef f():\n  def g():\n    from clm_jax import config\n  return g\n'
  assert _function_level_imports(source, 'm.py') == ['m.py:5: from clm_jax import config']
