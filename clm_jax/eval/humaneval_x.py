"""HumanEval-X: the 164 HumanEval problems in C++, Go, Java, JavaScript and Python.

The data ships in data/humaneval-x/ (CodeGeeX's release, Apache 2.0; its
README says where from). `load` reads one language's problems and refuses any
file whose bytes are not the release's.
"""

import gzip
import hashlib
import json
import os
import pathlib
import zlib

DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / 'data' / 'humaneval-x'
# Our language names (clm_jax.config.LANGUAGES) -> the release's file stem and task id prefix.
FILES = {
  'python': ('python', 'Python'),
  'cpp': ('cpp', 'CPP'),
  'java': ('java', 'Java'),
  'javascript': ('js', 'JavaScript'),
  'go': ('go', 'Go'),
}
LANGUAGES = tuple(FILES)
# sha256 of each file of the release (data/humaneval-x/README.md).
SHA256 = {
  'humaneval_cpp.jsonl.gz': 'dcf2e280a1e91bbc3c5f90edb41397e8a9ac1ccc9f5d2b70082f0b0fbfb6dbb0',
  'humaneval_go.jsonl.gz': '09126ef64ac68f87296c5f3781186aedc5dec799b114d9df99d6de4a715a7830',
  'humaneval_java.jsonl.gz': '276f36db2eb7aeb864f36a19a2f4e1bb2460fb6e22ff100f0b5bedabe3799967',
  'humaneval_js.jsonl.gz': 'fe5d467f2c1a027b3f6f18d3729aca01f6458c1de2e2d1292a019c5aa9bed424',
  'humaneval_python.jsonl.gz': '5752fb122efddb0e9b47c77907ae6ce9a15aac4dea14e44c46032c831e6b987a',
  'go-evaluation/go.mod': 'cea5dade02a8e4daa766c97f84b5c51f2ab921681908f03b1a833b2035b9347b',
  'go-evaluation/go.sum': '40565af0c7bc9299286ac5e13c801b6b984d21c7401f09a09fff8ce1849e4dc7',
  'go-evaluation/vendor.tar.gz': '46dcd59eb54c4eb2ee36e9dbd64be55628e3e19b1a8e87c3b1f74700a81ccfd5',
}
PROBLEMS = 164
# The fields every language's records have; Go's also have import, docstring
# and test_setup, Python's and Java's a text (the docstring's text).
FIELDS = ('task_id', 'prompt', 'declaration', 'canonical_solution', 'test', 'example_test')


class HumanEvalXError(ValueError):
  """A HumanEval-X file is not the release's, or is malformed."""


def path_of(language: str, directory: str | os.PathLike = DATA_DIR) -> pathlib.Path:
  """The problems file of `language` (one of LANGUAGES) under `directory`."""
  if language not in FILES:
    raise HumanEvalXError(f'unknown HumanEval-X language {language!r}; one of {LANGUAGES}')
  return pathlib.Path(directory) / f'humaneval_{FILES[language][0]}.jsonl.gz'


def load(
  language: str, *, directory: str | os.PathLike = DATA_DIR, verify: bool = True
) -> dict[str, dict]:
  """The problems of one language by task id ('CPP/0', ...), in file order.

  Args:
    language: One of LANGUAGES.
    directory: Where the release's files are.
    verify: Refuse a file whose SHA-256 is not the release's (SHA256); False
      reads a file of one's own, in the release's format.

  Raises:
    HumanEvalXError: The checksum differs, or the file is not gzip, or a line
      ('humaneval_go.jsonl.gz:LINE: ...') is not a JSON object with string
      FIELDS, has a task id out of order, or the file does not hold PROBLEMS.
  """
  path = path_of(language, directory)
  data = path.read_bytes()
  if verify and (actual := hashlib.sha256(data).hexdigest()) != SHA256[path.name]:
    raise HumanEvalXError(
      f'{path}: sha256 is {actual}, expected {SHA256[path.name]}: not the HumanEval-X release'
    )
  try:
    text = gzip.decompress(data).decode('utf-8')
  except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
    raise HumanEvalXError(f'{path}: not a gzipped UTF-8 file: {e}') from None
  prefix = FILES[language][1]
  # Not splitlines(): it would also split at characters JSON strings may hold.
  lines = text.split('\n')
  if lines[-1] == '':
    lines.pop()
  problems = {}
  for number, line in enumerate(lines, start=1):
    where = f'{path.name}:{number}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise HumanEvalXError(f'{where}: not a JSON line: {e}') from None
    if not isinstance(record, dict):
      raise HumanEvalXError(f'{where}: expected a JSON object, got {type(record).__name__}')
    if missing := [field for field in FIELDS if not isinstance(record.get(field), str)]:
      raise HumanEvalXError(f'{where}: missing or non-string field(s) {", ".join(missing)}')
    # The ids count up from 0 in the release; one out of place is a damaged or mixed file.
    if record['task_id'] != (expected_id := f'{prefix}/{len(problems)}'):
      raise HumanEvalXError(f'{where}: task_id {record["task_id"]!r}, expected {expected_id!r}')
    problems[record['task_id']] = record
  if len(problems) != PROBLEMS:
    raise HumanEvalXError(f'{path}: {len(problems)} problems, expected {PROBLEMS}')
  return problems
