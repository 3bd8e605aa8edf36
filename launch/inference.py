"""`generate` and `eval`: sample from a checkpoint; HumanEval and held-out perplexity."""

import json
import pathlib

from absl import flags
from absl import logging

from launch import common
from launch import convert

_PROMPT = flags.DEFINE_string('prompt', None, 'generate: the text to continue (or the prefix).')
_SUFFIX = flags.DEFINE_string('suffix', None, 'generate: infill between --prompt and this.')
_SPM = flags.DEFINE_bool('spm', False, 'generate: infill in SPM (suffix first) order.')
_CHAT = flags.DEFINE_bool('chat', False, 'generate: --prompt is a user turn, in the chat format.')
_SYSTEM = flags.DEFINE_string('system', None, 'generate --chat: a system prompt.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'generate, eval: tokens to add at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'generate, eval: 0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'generate, eval: sample the k likeliest; 0 = all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'generate, eval: nucleus sampling mass.')
_SEED = flags.DEFINE_integer('seed', 0, 'generate, eval: sampling seed.')
_TASK = flags.DEFINE_enum(
  'task', 'humaneval', ['humaneval', 'mbpp', 'perplexity'], 'eval: what to run.'
)
_DATA = flags.DEFINE_string('data', '', 'eval mbpp: the MBPP file; default data/mbpp/mbpp.jsonl.')
_SPLIT = flags.DEFINE_enum(
  'split', 'test', ['test', 'validation', 'train', 'prompt'], 'eval mbpp: the split.'
)
_SAMPLES = flags.DEFINE_integer('samples', 1, 'eval humaneval: completions per problem.')
_PROBLEMS = flags.DEFINE_integer('problems', 0, 'eval humaneval, mbpp: only the first N; 0 = all.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'eval humaneval, mbpp: prompts generated at once.')
_ALLOW_WEAKER = flags.DEFINE_bool(
  'allow_weaker_sandbox',
  False,
  'eval humaneval, mbpp: run the code sandbox even where an isolation layer is missing.',
)


def _load():
  import clm_jax

  common.need('checkpoint')
  model = clm_jax.load(convert.CHECKPOINT.value)
  if model.tokenizer is None:
    raise FileNotFoundError(f'--checkpoint={convert.CHECKPOINT.value} has no tokenizer.model.')
  return model


def _sampling() -> dict:
  return dict(
    max_new_tokens=_MAX_NEW.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    seed=_SEED.value,
  )


def generate():
  from clm_jax.inference import generate as generate_lib

  common.need('prompt')
  model = _load()
  tok = model.tokenizer
  if _SUFFIX.value is not None:
    middle = generate_lib.infill(
      model.config, model.params, tok, _PROMPT.value, _SUFFIX.value, spm=_SPM.value, **_sampling()
    )
    print(_PROMPT.value + middle + _SUFFIX.value, flush=True)
    return
  if _CHAT.value:
    from clm_jax.data import chat

    system = [{'role': 'system', 'content': _SYSTEM.value}] if _SYSTEM.value else []
    ids = chat.prompt_tokens([*system, {'role': 'user', 'content': _PROMPT.value}], tok)
    new = model.generate([ids], stop_ids=(tok.eos_id,), pad_id=tok.pad_id, **_sampling())[0]
    print(tok.decode(new).strip(), flush=True)  # The answer alone, as a chat shows it.
    return
  ids = [tok.bos_id, *tok.encode(_PROMPT.value)]
  new = model.generate([ids], stop_ids=(tok.eos_id,), pad_id=tok.pad_id, **_sampling())[0]
  # Decoded together: a character may span the prompt's last token and the first new one.
  print(tok.decode(ids[1:] + new), flush=True)


def evaluate():
  model = _load()
  out_dir = common.OUTPUT.value or pathlib.Path(convert.CHECKPOINT.value) / 'eval' / _TASK.value
  out_dir = pathlib.Path(out_dir)
  if _TASK.value == 'perplexity':
    from clm_jax.eval import perplexity

    result = perplexity.heldout(model, flags.FLAGS.config)
  else:
    result = _code_eval(model, out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'summary.json').write_text(json.dumps(result, indent=2) + '\n')
  print(json.dumps(result), flush=True)
  print(f'Results in {out_dir}', flush=True)


def _code_eval(model, out_dir) -> dict:
  """HumanEval (zero-shot) or MBPP (3-shot): pass@k of sandboxed completions."""
  from clm_jax.eval import sandbox
  from clm_jax.eval import tasks

  sampling = _sampling()
  if _SAMPLES.value > 1 and sampling['temperature'] == 0:
    # pass@k of k identical greedy samples says nothing; CodeLlama samples so.
    sampling.update(temperature=0.8, top_p=0.95)
    print('--samples > 1: sampling at --temperature=0.8 --top_p=0.95', flush=True)
  logging.info('sandbox isolation: %s', sandbox.isolation())
  complete = tasks.make_complete(model.config, model.params, model.tokenizer, **sampling)
  return tasks.evaluate(
    _TASK.value,
    complete,
    problems=_PROBLEMS.value,
    samples=_SAMPLES.value,
    batch_size=_BATCH.value,
    out_dir=out_dir,
    split=_SPLIT.value,
    data_path=_DATA.value,
    allow_weaker=_ALLOW_WEAKER.value,
  )


COMMANDS = {'generate': generate, 'eval': evaluate}
