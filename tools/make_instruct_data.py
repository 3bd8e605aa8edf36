"""Generates data/instruct: instruction tasks made from the standard library's functions.

Every task is built from a documented top-level function of a pure-Python
standard-library module, read from this interpreter's source files with `ast`
(nothing is imported, so no module runs). For each function:

  write      'Write a Python function `name(args)` that <its summary>.'
             -> its source in a ```python block, after the imports, constants
             and private helpers it needs, so the answer runs on its own
             (only for functions whose dependencies resolve to a few lines);
  explain    the function without its docstring -> the docstring, in prose;
  docstring  the function without its docstring -> the function with it.

Some tasks carry a system prompt, and some go on for a second turn ('Which
module defines it?', 'Add a docstring to it.'). Single-turn tasks are written
as {"prompt", "completion"} records (with "system" where there is one),
multi-turn ones as {"messages"}; every record also has an "id" and the
"source" file. About 5% of the functions, chosen by a hash of their name,
go with all their tasks to heldout.jsonl.

The output is a function of the standard library's source, so it is
reproducible byte for byte only on the Python version in PYTHON (other
versions change docstrings and code). Usage:

  python tools/make_instruct_data.py [--out data/instruct]
"""

import argparse
import ast
import builtins
import hashlib
import json
import pathlib
import random
import shutil
import sys
import sysconfig

# The Python the shipped files were generated with; tests compare only there.
PYTHON = '3.11'
SEED = 'clm_jax-instruct-v1'
HELDOUT_FRACTION = 0.05
# Pure-Python modules whose functions are documented and small.
MODULES = (
  'abc',
  'ast',
  'base64',
  'bisect',
  'calendar',
  'codecs',
  'colorsys',
  'contextlib',
  'copy',
  'difflib',
  'dis',
  'email.utils',
  'enum',
  'filecmp',
  'fnmatch',
  'fractions',
  'functools',
  'genericpath',
  'gettext',
  'glob',
  'heapq',
  'hmac',
  'html',
  'inspect',
  'ipaddress',
  'linecache',
  'locale',
  'mimetypes',
  'ntpath',
  'nturl2path',
  'operator',
  'platform',
  'posixpath',
  'pprint',
  'quopri',
  'reprlib',
  'secrets',
  'shlex',
  'shutil',
  'stat',
  'statistics',
  'string',
  'tarfile',
  'textwrap',
  'tokenize',
  'traceback',
  'types',
  'typing',
  'urllib.parse',
  'uuid',
  'warnings',
  'wsgiref.util',
  'zipfile',
)
MAX_LINES = 30  # Longest function, docstring included.
MAX_HELPER_LINES = 25  # Most lines of dependencies a 'write' answer may carry.
MAX_SUMMARY = 300  # Longest first docstring paragraph, in characters.
MAX_EXPLANATION = 800  # Longer docstrings are explained by their first paragraph.

# Docstrings start with an imperative ('Return the ...'); a task says 'a
# function that returns the ...'. Other first words keep their sentence whole.
_IMPERATIVES = frozenset(
  'add apply arrange ask build cast check clean clear compare compute construct convert copy '
  'create decide decode detect determine disassemble discard encode escape extract find format '
  'generate get guess increment insert join make normalize parse pop pretty-print print push '
  'quote read remove replace represent resolve return set split take test transform turn update '
  'walk write yield'.split()
)
_THIRD_PERSON = frozenset(
  'adds converts creates parses prints registers removes returns sets'.split()
)
_SYSTEM = {
  'code': (
    'You are a Python expert. Reply with one ```python code block and nothing else.',
    'You are a helpful coding assistant.',
  ),
  'prose': (
    'You are a patient teacher who explains Python code in plain English.',
    'You are a helpful coding assistant.',
  ),
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='data/instruct', help='Directory of the JSONL files.')
  args = parser.parse_args(argv)
  python = f'{sys.version_info.major}.{sys.version_info.minor}'
  if python != PYTHON:
    print(f'Warning: Python {python}, not {PYTHON}: the output differs from the shipped files.')
  counts = generate(pathlib.Path(args.out))
  print(f'Wrote {counts} records to {args.out}.')


def generate(out: pathlib.Path) -> dict[str, int]:
  """Writes stdlib_tasks.jsonl, heldout.jsonl and LICENSE-PSF.txt under `out`.

  Returns:
    Records written per file.
  """
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  splits = {'stdlib_tasks.jsonl': [], 'heldout.jsonl': []}
  seen = set()
  for module in MODULES:
    for function in _functions(root, module):
      if function['code'] in seen:  # posixpath and ntpath share some functions.
        continue
      seen.add(function['code'])
      name = f'{module}.{function["name"]}'
      digest = hashlib.sha256(f'{SEED}/heldout/{name}'.encode()).digest()
      held_out = int.from_bytes(digest[:8], 'big') / 2**64 < HELDOUT_FRACTION
      file = 'heldout.jsonl' if held_out else 'stdlib_tasks.jsonl'
      splits[file].extend(_tasks(module, function, random.Random(f'{SEED}/{name}')))
  out.mkdir(parents=True, exist_ok=True)
  for file, records in splits.items():
    with open(out / file, 'w', encoding='utf-8', newline='\n') as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
  # The PSF licence asks derivative works to keep its text and notice.
  shutil.copyfile(root / 'LICENSE.txt', out / 'LICENSE-PSF.txt')
  return {file: len(records) for file, records in splits.items()}


def _functions(root: pathlib.Path, module: str) -> list[dict]:
  """The usable documented top-level functions of a module, in source order."""
  path = root / (module.replace('.', '/') + '.py')
  if not path.is_file():
    path = root / module.replace('.', '/') / '__init__.py'
  text = path.read_text(encoding='utf-8')
  lines = text.splitlines()
  tree = ast.parse(text)
  definitions = {}  # Name -> the top-level statements binding it.
  for node in tree.body:
    # A name bound under `if` or `try` depends on the platform or on what
    # imports; its compound statement stands for it, and resolves to nothing.
    inner = [node] if isinstance(node, ast.FunctionDef | ast.ClassDef) else ast.walk(node)
    for name in {name for child in inner for name in _bound_names(child)}:
      definitions.setdefault(name, []).append(node)
  functions = []
  for node in tree.body:
    if not _usable(node):
      continue
    doc = ast.get_docstring(node, clean=True)
    doc_node = node.body[0]
    code = '\n'.join(lines[node.lineno - 1 : node.end_lineno])
    bare = '\n'.join(
      lines[node.lineno - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
    )
    functions.append(
      {
        'name': node.name,
        'signature': f'{node.name}({ast.unparse(node.args)})',
        'doc': doc,
        'code': code,
        'bare': bare,
        'standalone': _standalone(node, definitions, lines),
        'source': f'Lib/{path.relative_to(root).as_posix()}',
      }
    )
  return functions


def _usable(node) -> bool:
  if not isinstance(node, ast.FunctionDef) or node.name.startswith('_') or node.decorator_list:
    return False
  doc = ast.get_docstring(node)
  if not doc or len(node.body) < 2 or node.body[0].lineno == node.lineno:
    return False  # No docstring, nothing but one, or one on the def line.
  summary = _paragraphs(doc)[0]
  return (
    node.end_lineno - node.lineno < MAX_LINES
    and 20 <= len(summary) <= MAX_SUMMARY
    and not summary.startswith((node.name + '(', '@'))  # A signature, not a sentence.
    and '\t' not in summary
  )


def _standalone(node: ast.FunctionDef, definitions: dict, lines: list[str]) -> str | None:
  """The function's source after what it uses from its module, or None.

  What it uses must resolve to module imports, constants and functions bound
  once, unconditionally, at the top level, and in all to at most
  MAX_HELPER_LINES lines; anything else (a class, a star import, a name bound
  under `if` or `try`) makes the function unfit to write on its own.
  """
  imports, needed, queue = set(), set(), [node]
  while queue:
    current = queue.pop()
    for name in sorted(_free_names(current)):
      bindings = definitions.get(name, [])
      if len(bindings) != 1:
        return None
      binding = bindings[0]
      if isinstance(binding, ast.Import | ast.ImportFrom):
        imports.add(_import_line(binding, name))
      elif isinstance(binding, ast.Assign | ast.FunctionDef) and binding is not node:
        if binding not in needed:
          needed.add(binding)
          queue.append(binding)
      elif binding is not node:
        return None
  helpers = sorted(needed, key=lambda n: n.lineno)
  if sum(n.end_lineno - n.lineno + 1 for n in helpers) > MAX_HELPER_LINES:
    return None
  blocks = ['\n'.join(sorted(imports))] if imports else []
  constants = [n for n in helpers if isinstance(n, ast.Assign)]
  if constants:
    blocks.append('\n'.join(_lines(n, lines) for n in constants))
  blocks += [_lines(n, lines) for n in helpers if isinstance(n, ast.FunctionDef)]
  blocks.append(_lines(node, lines))
  return '\n\n\n'.join(blocks)


def _lines(node, lines: list[str]) -> str:
  return '\n'.join(lines[node.lineno - 1 : node.end_lineno])


def _bound_names(node) -> list[str]:
  if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
    return [node.name]
  if isinstance(node, ast.Import | ast.ImportFrom):
    return [(alias.asname or alias.name).split('.')[0] for alias in node.names]
  if isinstance(node, ast.Assign):
    return [n.id for target in node.targets for n in ast.walk(target) if isinstance(n, ast.Name)]
  if isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
    return [node.target.id]
  return []


def _import_line(node: ast.Import | ast.ImportFrom, name: str) -> str:
  """The import statement for `name` alone."""
  alias = next(a for a in node.names if (a.asname or a.name).split('.')[0] == name)
  if isinstance(node, ast.Import):
    return ast.unparse(ast.Import(names=[alias]))
  return ast.unparse(ast.ImportFrom(module=node.module, names=[alias], level=node.level))


def _free_names(node) -> set[str]:
  """Names a statement reads but neither binds itself nor finds in builtins."""
  bound, read = set(), set()
  # `global x` makes x a module name, even where the function assigns it.
  declared = {name for n in ast.walk(node) if isinstance(n, ast.Global) for name in n.names}
  for child in ast.walk(node):
    if isinstance(child, ast.Name):
      (read if isinstance(child.ctx, ast.Load) else bound).add(child.id)
    elif isinstance(child, ast.arg):
      bound.add(child.arg)
    elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
      if child is not node:
        bound.add(child.name)
    elif isinstance(child, ast.ExceptHandler) and child.name:
      bound.add(child.name)
    elif isinstance(child, ast.Import | ast.ImportFrom):
      bound.update((a.asname or a.name).split('.')[0] for a in child.names)
  free = read - bound | declared
  if isinstance(node, ast.FunctionDef):
    # Defaults are read where the function is defined: `def f(x, cmp=cmp)`
    # needs a module-level cmp although its body only sees the argument.
    defaults = [*node.args.defaults, *filter(None, node.args.kw_defaults)]
    free |= {n.id for d in defaults for n in ast.walk(d) if isinstance(n, ast.Name)}
  return free - set(dir(builtins))


def _paragraphs(doc: str) -> list[str]:
  """A docstring's paragraphs, each on one line."""
  return [' '.join(p.split()) for p in doc.split('\n\n') if p.strip()]


def _describe(summary: str) -> tuple[str, str]:
  """('returns the ...', 'It returns the ...') for 'Return the ...'; else ('', summary)."""
  first, _, rest = summary.partition(' ')
  if first.lower() in _IMPERATIVES:
    verb = first.lower()
    if verb.endswith('y') and verb[-2] not in 'aeiou':
      verb = verb[:-1] + 'ies'  # copy -> copies
    elif verb.endswith(('s', 'sh', 'ch', 'x', 'z', 'o')):
      verb += 'es'
    else:
      verb += 's'
  elif first.lower() in _THIRD_PERSON:
    verb = first.lower()
  elif first == 'Same' and rest.startswith('as '):
    verb = 'does the same'
  else:
    return '', summary
  clause = f'{verb} {rest}'
  if not clause.endswith(('.', '?', '!', ':')):
    clause += '.'
  return clause, f'It {clause}'


def _tasks(module: str, function: dict, rng: random.Random) -> list[dict]:
  """The records of one function."""
  name, signature = function['name'], function['signature']
  paragraphs = _paragraphs(function['doc'])
  clause, sentence = _describe(paragraphs[0])
  # Later paragraphs keep their lines: they hold examples and lists.
  rest = [p.strip('\n') for p in function['doc'].split('\n\n') if p.strip()][1:]
  explanation = '\n\n'.join([sentence, *rest])
  if len(explanation) > MAX_EXPLANATION:
    explanation = sentence
  shown = f'```python\n{function["bare"]}\n```'
  with_doc = f'```python\n{function["code"]}\n```'
  tasks = []
  if function['standalone'] is not None:
    if clause:
      ask = f'Write a Python function `{signature}` that {clause}'
    else:
      ask = f'Write a Python function `{signature}`. Its docstring says: {paragraphs[0]}'
    answer = f'```python\n{function["standalone"]}\n```'
    turns = [ask, answer]
    if rng.random() < 0.2:
      turns += [
        'Which standard library module defines it, and how do I import it?',
        f'`{name}` is defined in the `{module}` module of the Python standard library: '
        f'`from {module} import {name}`.',
      ]
    tasks.append(('write', 'code', turns))
  kind = rng.choice(('explain', 'docstring'))
  if kind == 'explain':
    turns = [f'Explain what this function does:\n\n{shown}', explanation]
    if rng.random() < 0.2:
      turns += ['Add a docstring to it.', with_doc]
    tasks.append(('explain', 'prose', turns))
  else:
    tasks.append(('docstring', 'code', [f'Add a docstring to this function:\n\n{shown}', with_doc]))
  return [_record(module, function, task, rng) for task in tasks]


def _record(module: str, function: dict, task: tuple, rng: random.Random) -> dict:
  kind, style, turns = task
  system = rng.choice(_SYSTEM[style]) if rng.random() < 0.25 else None
  record = {'id': f'{module}.{function["name"]}/{kind}', 'source': function['source']}
  if len(turns) == 2 and (system is None or rng.random() < 0.5):
    if system is not None:
      record['system'] = system
    return {**record, 'prompt': turns[0], 'completion': turns[1]}
  messages = [{'role': 'system', 'content': system}] if system is not None else []
  messages += [
    {'role': ('user', 'assistant')[i % 2], 'content': content} for i, content in enumerate(turns)
  ]
  return {**record, 'messages': messages}


if __name__ == '__main__':
  main()
