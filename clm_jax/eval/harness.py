"""The generic code-eval harness: prompts -> completions -> sandboxed programs -> pass@k.

Scores are pass@k (Chen et al. 2021, https://arxiv.org/abs/2107.03374) for k
in 1, 10, 100 up to the number of samples per problem. The model side is a
function `complete(prompts) -> completions`, so this module needs neither JAX
nor a model. Generation and execution overlap: each batch of completions runs
in the sandbox while the model writes the next. Each completion becomes a
`sandbox.Program`: the completion untrusted, the benchmark's test trusted, so
that the verdict is the judge's and not the completion's.
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import os
import pathlib
import time
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence

import numpy as np
from absl import logging

from clm_jax.eval import sandbox

KS = (1, 10, 100)


def truncate(completion: str, stop_sequences: Sequence[str]) -> str:
  """Cuts `completion` at the first stop sequence (the stop sequence dropped)."""
  cut = min((i for s in stop_sequences if (i := completion.find(s)) >= 0), default=None)
  return completion if cut is None else completion[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased estimator of pass@k from n samples of which c passed.

  1 - C(n-c, k) / C(n, k): the chance that k samples drawn without replacement
  from the n include a passing one, as a product so that large n cannot overflow
  (Chen et al. 2021, figure 3).
  """
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f'need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}')
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def make_complete(
  generate_fn: Callable[[list[list[int]], int], Sequence[Sequence[int]]],
  tokenizer,
  *,
  seed: int = 0,
) -> Callable[[list[str]], list[str]]:
  """Builds `complete(prompts) -> completions` from a token-level generator.

  Args:
    generate_fn: (prompt token lists, BOS first; a seed) -> the new tokens of
      each, without the prompt, e.g. `lambda ids, seed: generate.generate(cfg,
      params, ids, seed=seed, max_new_tokens=512, temperature=0.8, top_p=0.95,
      stop_ids=[tok.eos_id], pad_id=tok.pad_id)`.
    tokenizer: Has `encode(str) -> list[int]` (without BOS), `decode(ids) -> str`
      and `bos_id`, like `clm_jax.data.tokenizer.Tokenizer`.
    seed: The first call's seed; each later call gets the next one, so that
      batches holding the same prompt draw different samples.

  Returns:
    A `complete` for `evaluate_humaneval`.
  """
  seeds = itertools.count(seed)

  def complete(prompts: list[str]) -> list[str]:
    prompt_ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    new_ids = generate_fn(prompt_ids, next(seeds))
    completions = []
    for prompt, ids, new in zip(prompts, prompt_ids, new_ids, strict=True):
      # Decoding the continuation alone can lose a leading space (sentencepiece
      # models with a dummy prefix, LLaMA's among them); in context it cannot.
      text = tokenizer.decode([*ids, *new])
      completions.append(text[len(prompt) :] if text.startswith(prompt) else tokenizer.decode(new))
    return completions

  return complete


def evaluate_programs(
  complete: Callable[[list[str]], Sequence[str]],
  prompts: Mapping[Hashable, str],
  make_program: Callable[[Hashable, str], sandbox.Program],
  *,
  name: str,
  stop_sequences: Sequence[str],
  samples: int,
  batch_size: int,
  out_dir: str | os.PathLike | None,
  samples_file: str,
  summary_file: str,
  timeout: float,
  limits: sandbox.Limits | None = None,
  max_workers: int | None = None,
  allow_weaker: bool = False,
) -> dict:
  """Scores `complete` on any prompt -> program benchmark (HumanEval, MBPP).

  Args:
    complete: Prompts -> one completion each.
    prompts: Task id -> prompt, in the order to report them.
    make_program: (task id, truncated completion) -> the program (untrusted
      code and trusted test) that passes iff the completion solves the task.
    name: The benchmark, for the logs.
    stop_sequences: Each completion is cut at the first of these (`truncate`).
    samples: Completions per task (n in pass@k).
    batch_size: Prompts per call of `complete`.
    out_dir: Where to write `samples_file` (one JSON line per sample: task_id,
      sample, completion, passed, status, detail) and `summary_file`; None: nowhere.
    timeout: Wall-clock seconds per program.
    limits: Sandbox resource limits; default `sandbox.Limits()`.
    max_workers: Programs run at once; default `sandbox.workers()`, one per CPU.
    allow_weaker: Run even where a sandbox layer is missing (`sandbox.require`
      logs a WARNING naming each); else that is an error before any generation.

  Returns:
    `summarize`'s dict plus 'seconds'.

  Raises:
    sandbox.SandboxError: A sandbox layer is missing and `allow_weaker` is False.
  """
  sandbox.require(allow_weaker)
  start = time.time()
  jobs = [(task_id, i) for task_id in prompts for i in range(samples)]
  rows = []
  with concurrent.futures.ThreadPoolExecutor(max_workers or sandbox.workers()) as pool:
    for first in range(0, len(jobs), batch_size):
      batch = jobs[first : first + batch_size]
      completions = list(complete([prompts[task_id] for task_id, _ in batch]))
      if len(completions) != len(batch):
        raise ValueError(f'complete() returned {len(completions)} completions for {len(batch)}')
      for (task_id, i), raw in zip(batch, completions, strict=True):
        completion = truncate(raw, stop_sequences)
        run = pool.submit(
          sandbox.run,
          make_program(task_id, completion),
          timeout=timeout,
          limits=limits,
          allow_weaker=allow_weaker,
        )
        rows.append(({'task_id': task_id, 'sample': i, 'completion': completion}, run))
      logging.log_every_n_seconds(
        logging.INFO, '%s: %d/%d completions written', 30, name, len(rows), len(jobs)
      )
    records = [dict(row, **dataclasses.asdict(run.result())) for row, run in rows]
  summary = summarize(records, samples)
  summary['seconds'] = round(time.time() - start, 2)
  if out_dir is not None:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / samples_file, 'w') as f:
      f.writelines(json.dumps(record) + '\n' for record in records)
    (out / summary_file).write_text(json.dumps(summary, indent=2) + '\n')
  logging.info('%s: %s', name, summary)
  return summary


def summarize(records: Sequence[Mapping], samples: int) -> dict:
  """pass@k averaged over problems, from per-sample records with 'task_id' and 'passed'."""
  passed = collections.Counter()
  counts = collections.Counter()
  for record in records:
    counts[record['task_id']] += 1
    passed[record['task_id']] += bool(record['passed'])
  summary = {
    f'pass@{k}': float(np.mean([pass_at_k(counts[t], passed[t], k) for t in counts]))
    for k in KS
    if k <= samples
  }
  summary.update(
    problems=len(counts),
    samples=samples,
    statuses=dict(collections.Counter(record['status'] for record in records)),
  )
  if summary['statuses'].get('error'):
    logging.warning('The sandbox failed %d times', summary['statuses']['error'])
  return summary
