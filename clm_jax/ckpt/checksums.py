"""Checksums of a checkpoint step's files: written before the step is committed, checked on restore.

Orbax (0.12) checks no array data: OCDBT checksums its own index and zarr3 its
chunk index, but the chunks themselves are stored bare, so a flipped bit in a
parameter reads back as a wrong value without any error. Nor does it offer a
checksum option. So the step's every file gets a CRC-32 (the standard
library's zlib; per 16 MiB block, so that a thread pool hashes one large file
in parallel: zlib releases the GIL) in <step>/checksums.json.

`write` runs in Orbax's `post_finalization_callback`: on process 0 only, once
every process's files are written and before Orbax renames the temporary
directory to its step, so a step directory either holds its checksums or was
written without them (by an older version of this code); never half of them.
"""

import concurrent.futures
import json
import os
import pathlib
import zlib

FILE = 'checksums.json'
BLOCK_BYTES = 16 << 20
# Orbax writes these after the callback (the commit marker, the commit time): the
# only files of a step the checksums leave out.
_WRITTEN_LATER = frozenset({'commit_success.txt', '_CHECKPOINT_METADATA', FILE})
# Hashing threads: enough to keep up with a disk, few enough to leave the input pipeline its cores.
THREADS = min(8, os.cpu_count() or 1)


def _block_crc(path: pathlib.Path, index: int) -> int:
  with path.open('rb') as f:
    f.seek(index * BLOCK_BYTES)
    return zlib.crc32(f.read(BLOCK_BYTES))


def _crcs(step_dir: pathlib.Path, sizes: dict[str, int]) -> dict[str, list[int]]:
  """name -> the CRC-32 of each of its blocks, read by a thread pool."""
  blocks = [(name, i) for name, size in sizes.items() for i in range(-(-size // BLOCK_BYTES))]
  with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
    crcs = pool.map(lambda b: _block_crc(step_dir / b[0], b[1]), blocks)
    out = {name: [] for name in sizes}
    for (name, _), crc in zip(blocks, crcs, strict=True):
      out[name].append(crc)
  return out


def write(step_dir) -> dict:
  """Writes step_dir/checksums.json over every file below it; returns what it wrote."""
  step_dir = pathlib.Path(step_dir)
  sizes = {
    p.relative_to(step_dir).as_posix(): p.stat().st_size
    for p in sorted(step_dir.rglob('*'))
    if p.is_file() and p.relative_to(step_dir).as_posix() not in _WRITTEN_LATER
  }
  crcs = _crcs(step_dir, sizes)
  record = {
    'algorithm': 'crc32',
    'block_bytes': BLOCK_BYTES,
    'files': {name: {'bytes': sizes[name], 'crc32': crcs[name]} for name in sizes},
  }
  tmp = step_dir / (FILE + '.tmp')
  tmp.write_text(json.dumps(record, indent=1) + '\n')
  tmp.replace(step_dir / FILE)
  return record


def present(step_dir) -> bool:
  return (pathlib.Path(step_dir) / FILE).is_file()


def verify(step_dir) -> str | None:
  """None if every file listed in step_dir/checksums.json is intact; else the damage, in a line."""
  step_dir = pathlib.Path(step_dir)
  try:
    record = json.loads((step_dir / FILE).read_text())
    files = {name: (int(f['bytes']), list(f['crc32'])) for name, f in record['files'].items()}
    if record['algorithm'] != 'crc32' or record['block_bytes'] != BLOCK_BYTES:
      return f'{FILE} is of an unknown format'
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'{FILE} is unreadable ({type(e).__name__})'
  problems, sizes = [], {}
  for name, (size, _) in files.items():
    path = step_dir / name
    if not path.is_file():
      problems.append(f'{name} is missing')
    elif path.stat().st_size != size:
      problems.append(f'{name} has {path.stat().st_size} bytes, not {size}')
    else:
      sizes[name] = size
  for name, crcs in _crcs(step_dir, sizes).items():
    want = files[name][1]
    bad = [i for i, got in enumerate(crcs) if i >= len(want) or got != want[i]]
    if bad:
      first, last = bad[0] * BLOCK_BYTES, min((bad[-1] + 1) * BLOCK_BYTES, sizes[name]) - 1
      problems.append(f'{name} differs from its checksum in bytes {first}-{last}')
  if not problems:
    return None
  more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
  return problems[0] + more
