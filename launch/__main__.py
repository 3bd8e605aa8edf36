"""clm_jax command line: `python -m launch COMMAND [--config=...] [--flags]`.

Commands:
  train             Train (or resume) the config into --workdir.
  tokenizer train   Train a sentencepiece BPE tokenizer for code on --input.
  data prepare      Filter, deduplicate and tokenize --input into ArrayRecord shards.
  convert           --to_params: a run's latest checkpoint -> params only, in --dtype;
                    --from_hf / --to_hf: Hugging Face Llama directories <-> clm_jax.
  generate          Continue --prompt (or infill up to --suffix) with --checkpoint.
  eval              --task=humaneval (pass@k, sandboxed) or perplexity (held-out code).
  slurm             Write an sbatch script that trains the config on --nodes nodes.
  sweep             Run the trials of a sweep file (--config=configs/sweeps/NAME.py).

`train` joins a multi-process run given --coordinator_address, --num_processes
and --process_id (or JAX_* variables, or under srun / mpirun); --spawn=N runs
N such processes on this machine.

Examples:
  python -m launch train
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m launch train --spawn=2 \\
      --config.mesh.data=4 --config.mesh.tensor=2
  python -m launch slurm --config=configs/codellama_34b.py --nodes=16 --gpus_per_node=8
  python -m launch sweep --config=configs/sweeps/lr_warmup.py
  python -m launch train --config=configs/bench_tiny.py --config.train.steps=20 \\
      --workdir=runs/bench
  python -m launch tokenizer train --input=~/code,dump.jsonl.gz --output=tok.model \\
      --vocab_size=32000 --sample_mb=2048
  python -m launch data prepare --input=~/code,dump.jsonl.gz --output=data/code \\
      --tokenizer=tok.model
  python -m launch convert --to_params --dtype=bfloat16 --workdir=runs/default \\
      --output=params/default
  python -m launch convert --from_hf=~/models/CodeLlama-7b-hf --output=params/cl7b
  python -m launch convert --to_hf=hf/default --workdir=runs/default
  python -m launch generate --checkpoint=runs/default --prompt='def fib(n):'
  python -m launch eval --task=humaneval --checkpoint=runs/default --max_new_tokens=512
  python -m launch eval --task=perplexity --checkpoint=runs/default
"""

import logging as std_logging
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / 'configs'
COMMANDS = (
  'train',
  'tokenizer train',
  'data prepare',
  'convert',
  'generate',
  'eval',
  'slurm',
  'sweep',
)

config_flags.DEFINE_config_file(
  'config',
  str(_CONFIGS / 'default.py'),
  'Config file (a get_config() module).',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; default runs/<config file name>.')

# train: the distributed runtime (clm_jax/distributed.py says where the layout comes from)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'HOST:PORT of process 0; else $JAX_COORDINATOR_ADDRESS or SLURM/MPI.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
  'local_device_ids', None, 'GPUs this process drives (one process per GPU); default all.'
)
_HEARTBEAT = flags.DEFINE_integer(
  'heartbeat_timeout', 100, 'Seconds of silence after which a process counts as lost.'
)
_INIT_TIMEOUT = flags.DEFINE_integer(
  'init_timeout', 300, 'Seconds to wait for every process to join.'
)
_SPAWN = flags.DEFINE_integer(
  'spawn', 0, 'Run this many processes on this machine, joined over 127.0.0.1.'
)
_GPU_DEFAULTS = flags.DEFINE_bool(
  'gpu_defaults', True, 'On GPUs, set the XLA / NCCL defaults of clm_jax/gpu_env.py.'
)

# sweep (its --config names a sweep file, read as --sweep_file)
_SWEEP_FILE = flags.DEFINE_string('sweep_file', None, 'sweep: the sweep file (given as --config).')
_TRIAL = flags.DEFINE_integer('trial', None, 'sweep: run only this trial (a SLURM array task).')
_SLURM = flags.DEFINE_bool('slurm', False, 'sweep: write a SLURM job array instead of running.')

# slurm
_NODES = flags.DEFINE_integer('nodes', 1, 'slurm: nodes.')
_GPUS_PER_NODE = flags.DEFINE_integer('gpus_per_node', 8, 'slurm: GPUs per node.')
_PER = flags.DEFINE_enum('per', 'node', ['node', 'gpu'], 'slurm: one process per node or GPU.')
_PARTITION = flags.DEFINE_string('partition', '', 'slurm: partition; default the cluster default.')
_TIME = flags.DEFINE_string('time', '', 'slurm: time limit (e.g. 48:00:00); requeued when hit.')
_ACCOUNT = flags.DEFINE_string('account', '', 'slurm: account to charge.')
_LOG_DIR = flags.DEFINE_string('slurm_logs', 'logs', 'slurm: directory of the per-node logs.')
_SLURM_ONLY = (
  'nodes',
  'gpus_per_node',
  'per',
  'partition',
  'time',
  'account',
  'slurm_logs',
  'output',
)

# tokenizer train, data prepare
_INPUT = flags.DEFINE_list('input', [], 'Directories, JSONL(.gz) or Parquet files.')
_OUTPUT = flags.DEFINE_string('output', None, 'Tokenizer .model file, or prepared directory.')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'content', 'JSONL / Parquet field with the text.')
_LANGUAGE_FIELD = flags.DEFINE_string(
  'language_field', 'language', 'Optional field with the language; else the path field.'
)
_PATH_FIELD = flags.DEFINE_string('path_field', 'path', 'Optional field with a file path.')
_LANGUAGES = flags.DEFINE_list('languages', [], 'Keep only these languages; default all.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 32000, 'tokenizer train: pieces in the model.')
_SAMPLE_MB = flags.DEFINE_float('sample_mb', 1024, 'tokenizer train: MiB of text sampled.')
_TOKENIZER = flags.DEFINE_string(
  'tokenizer', None, "data prepare: tokenizer .model; default the default config's."
)
_WORKERS = flags.DEFINE_integer('workers', 0, 'data prepare: processes; 0 = one per CPU.')
_NEAR_DUP = flags.DEFINE_float(
  'near_dup_threshold', 0.85, 'data prepare: MinHash Jaccard of near duplicates; 0 = off.'
)
_HELDOUT = flags.DEFINE_float('heldout_fraction', 0.005, 'data prepare: documents held out.')
_SHARD_MB = flags.DEFINE_float('shard_mb', 256, 'data prepare: target MiB per output shard.')
_KEEP_WORK = flags.DEFINE_bool('keep_work', False, 'data prepare: keep output/work.')

# convert
_TO_PARAMS = flags.DEFINE_bool('to_params', False, 'convert: write a params-only checkpoint.')
_FROM_HF = flags.DEFINE_string('from_hf', None, 'convert: a Hugging Face Llama dir -> --output.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'convert: --checkpoint (or --workdir) -> this HF dir.')

# generate, convert --to_hf
_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'A run dir, a params-only checkpoint or a Hugging Face Llama dir.'
)
_PROMPT = flags.DEFINE_string('prompt', None, 'generate: the text to continue (or the prefix).')
_SUFFIX = flags.DEFINE_string('suffix', None, 'generate: infill between --prompt and this.')
_SPM = flags.DEFINE_bool('spm', False, 'generate: infill in SPM (suffix first) order.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'generate: tokens to add at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'generate: 0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'generate: sample from the k likeliest; 0 = all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'generate: nucleus sampling mass.')
_SEED = flags.DEFINE_integer('seed', 0, 'generate: sampling seed.')

# eval
_TASK = flags.DEFINE_enum('task', 'humaneval', ['humaneval', 'perplexity'], 'eval: what to run.')
_SAMPLES = flags.DEFINE_integer('samples', 1, 'eval humaneval: completions per problem.')
_PROBLEMS = flags.DEFINE_integer('problems', 0, 'eval humaneval: only the first N; 0 = all 164.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'eval humaneval: prompts generated at once.')
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', 'convert: dtype of the written params.')
_STEP = flags.DEFINE_integer('step', None, 'convert: checkpoint step; default the latest.')


def _workdir() -> pathlib.Path:
  if _WORKDIR.value:
    return pathlib.Path(_WORKDIR.value)
  return pathlib.Path('runs') / pathlib.Path(flags.FLAGS['config'].config_filename).stem


class _QuietLibraries(std_logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the training log."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _read_options():
  from clm_jax.data import sources

  return sources.ReadOptions(
    text_field=_TEXT_FIELD.value,
    language_field=_LANGUAGE_FIELD.value,
    path_field=_PATH_FIELD.value,
  )


def _need(*names):
  missing = [f'--{name}' for name in names if not flags.FLAGS[name].value]
  if missing:
    raise app.UsageError(f'{" and ".join(missing)} required.')


def _without(args: list[str], names) -> list[str]:
  """`args` less the flags `names`, in either --name=value or --name value form."""
  out, skip_value = [], False
  for arg in args:
    name = arg.lstrip('-').split('=', 1)[0]
    if skip_value:
      skip_value = False
    elif arg.startswith('-') and name in names:
      # Booleans (--nofoo, --foo) never take a separate value; these flags all do.
      skip_value = '=' not in arg
    else:
      out.append(arg)
  return out


def _split_gpus(processes: int) -> list[list[int]] | None:
  """This machine's GPUs in equal blocks, one per spawned process; None on CPU."""
  from clm_jax import gpu_env

  count = gpu_env.gpu_count()
  if not count:
    return None  # Each CPU process has its own (--xla_force_host_platform_device_count).
  if count % processes:
    raise app.UsageError(f'--spawn={processes} does not divide the {count} GPUs.')
  k = count // processes
  return [list(range(i * k, (i + 1) * k)) for i in range(processes)]


def _sweep():
  from clm_jax import slurm
  from clm_jax import sweep
  from clm_jax import sweep_run

  _need('sweep_file')
  path = _SWEEP_FILE.value
  if _SLURM.value:
    loaded = sweep.load(path)
    workdir = _WORKDIR.value or sweep_run.default_workdir(loaded)
    text = sweep_run.slurm_script(
      loaded,
      path,
      workdir,
      nodes=_NODES.value,
      gpus_per_node=_GPUS_PER_NODE.value,
      per=_PER.value,
      partition=_PARTITION.value,
      time=_TIME.value,
      account=_ACCOUNT.value,
      log_dir=_LOG_DIR.value,
    )
    out = slurm.write_sbatch(_OUTPUT.value or f'slurm/sweep-{loaded.name}.sbatch', text)
    pathlib.Path(_LOG_DIR.value).mkdir(parents=True, exist_ok=True)
    print(f'Wrote {out}: a job array of {len(loaded.trials)} trials. Submit with:')
    print(f'  sbatch {out}')
    return
  # A multi-host trial: every process runs the sweep, each trial's train joins them.
  dist = [
    f'--{name}={",".join(map(str, value)) if isinstance(value, list) else value}'
    for name in ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids')
    if (value := flags.FLAGS[name].value) is not None
  ]
  sys.exit(
    sweep_run.main(
      path, _WORKDIR.value, _TRIAL.value, extra_args=dist, process_id=_PROCESS_ID.value or 0
    )
  )


def _generate():
  import clm_jax
  from clm_jax import generate

  _need('checkpoint', 'prompt')
  model = clm_jax.load(_CHECKPOINT.value)
  tok = model.tokenizer
  if tok is None:
    raise FileNotFoundError(f'--checkpoint={_CHECKPOINT.value} has no tokenizer.model.')
  sampling = dict(
    max_new_tokens=_MAX_NEW.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    seed=_SEED.value,
  )
  if _SUFFIX.value is not None:
    middle = generate.infill(
      model.config, model.params, tok, _PROMPT.value, _SUFFIX.value, spm=_SPM.value, **sampling
    )
    print(_PROMPT.value + middle + _SUFFIX.value, flush=True)
    return
  ids = [tok.bos_id, *tok.encode(_PROMPT.value)]
  new = model.generate([ids], stop_ids=(tok.eos_id,), pad_id=tok.pad_id, **sampling)[0]
  # Decoded together: a character may span the prompt's last token and the first new one.
  print(tok.decode(ids[1:] + new), flush=True)


def _eval():
  import json

  import clm_jax

  _need('checkpoint')
  model = clm_jax.load(_CHECKPOINT.value)
  out_dir = pathlib.Path(_OUTPUT.value or pathlib.Path(_CHECKPOINT.value) / 'eval' / _TASK.value)
  if _TASK.value == 'perplexity':
    from clm_jax import perplexity

    result = perplexity.heldout(model, flags.FLAGS.config)
  else:
    result = _humaneval(model, out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'summary.json').write_text(json.dumps(result, indent=2) + '\n')
  print(json.dumps(result), flush=True)
  print(f'Results in {out_dir}', flush=True)


def _humaneval(model, out_dir) -> dict:
  from clm_jax import evaluate
  from clm_jax import generate
  from clm_jax import sandbox

  tok = model.tokenizer
  if tok is None:
    raise FileNotFoundError(f'--checkpoint={_CHECKPOINT.value} has no tokenizer.model.')
  temperature, top_p = _TEMPERATURE.value, _TOP_P.value
  if _SAMPLES.value > 1 and temperature == 0:
    # pass@k of k identical greedy samples says nothing; CodeLlama samples so.
    temperature, top_p = 0.8, 0.95
    print('--samples > 1: sampling at --temperature=0.8 --top_p=0.95', flush=True)
  logging.info('sandbox isolation: %s', sandbox.isolation())

  def generate_fn(ids, seed):
    return generate.generate(
      model.config,
      model.params,
      ids,
      max_new_tokens=_MAX_NEW.value,
      temperature=temperature,
      top_k=_TOP_K.value,
      top_p=top_p,
      stop_ids=(tok.eos_id,),
      pad_id=tok.pad_id,
      seed=seed,
    )

  problems = evaluate.load_problems()
  if _PROBLEMS.value:
    problems = dict(list(problems.items())[: _PROBLEMS.value])
  return evaluate.evaluate_humaneval(
    evaluate.make_complete(generate_fn, tok, seed=_SEED.value),
    samples=_SAMPLES.value,
    batch_size=_BATCH.value,
    out_dir=out_dir,
    problems=problems,
  )


def _slurm():
  from clm_jax import slurm

  args = list(sys.argv[1:])
  args.remove('slurm')
  args = _without(args, _SLURM_ONLY)
  if not any(a.startswith('--config=') for a in args):
    args.insert(0, f'--config={flags.FLAGS["config"].config_filename}')
  if not _WORKDIR.value:
    args.append(f'--workdir={_workdir()}')
  text = slurm.sbatch_script(
    args,
    nodes=_NODES.value,
    gpus_per_node=_GPUS_PER_NODE.value,
    per=_PER.value,
    job_name=_workdir().name,
    partition=_PARTITION.value,
    time=_TIME.value,
    account=_ACCOUNT.value,
    log_dir=_LOG_DIR.value,
  )
  path = slurm.write_sbatch(_OUTPUT.value or f'slurm/{_workdir().name}.sbatch', text)
  # Slurm opens the job's log before the script runs: the directory must exist.
  pathlib.Path(_LOG_DIR.value).mkdir(parents=True, exist_ok=True)
  print(f'Wrote {path}: {_NODES.value} nodes x {_GPUS_PER_NODE.value} GPUs. Submit with:')
  print(f'  sbatch {path}')


def _train():
  from clm_jax import distributed

  layout = distributed.resolve(
    _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _LOCAL_DEVICE_IDS.value
  )
  distributed.initialize(
    layout, heartbeat_timeout=_HEARTBEAT.value, init_timeout=_INIT_TIMEOUT.value
  )
  from clm_jax import loop

  loop.run(flags.FLAGS.config, _workdir())


def _tokenizer_train():
  from clm_jax import tokenizer

  _need('input', 'output')
  tokenizer.train_on_inputs(
    _INPUT.value,
    _OUTPUT.value,
    _VOCAB_SIZE.value,
    sample_mb=_SAMPLE_MB.value,
    read_options=_read_options(),
    languages=_LANGUAGES.value,
  )


def _data_prepare():
  from clm_jax import tokenizer
  from clm_jax.data import prepare

  _need('input', 'output')
  tokenizer_path = _TOKENIZER.value
  if not tokenizer_path:
    c = flags.FLAGS.config
    tokenizer_path = tokenizer.for_corpus(c.data, c.model.vocab_size).path
    print(f'Tokenizer: {tokenizer_path} (of --config; --tokenizer=MODEL to choose)', flush=True)
  options = prepare.PrepareOptions(
    read=_read_options(),
    languages=tuple(_LANGUAGES.value),
    near_dup_threshold=_NEAR_DUP.value,
    heldout_fraction=_HELDOUT.value,
    shard_mb=_SHARD_MB.value,
  )
  prepare.prepare(
    _INPUT.value,
    _OUTPUT.value,
    tokenizer_path,
    options,
    workers=_WORKERS.value,
    keep_work=_KEEP_WORK.value,
  )


def _convert():
  from clm_jax import checkpoint
  from clm_jax import hf

  if _FROM_HF.value:
    _need('output')
    out = hf.convert_from_hf(_FROM_HF.value, _OUTPUT.value)
    print(
      f'Wrote {_FROM_HF.value} as a params-only checkpoint {out["output"]} '
      f'({out["bytes"] / 2**20:.1f} MiB).',
      flush=True,
    )
    return
  if _TO_HF.value:
    src = _CHECKPOINT.value or _workdir()
    out = hf.convert_to_hf(src, _TO_HF.value, dtype=_DTYPE.value, step=_STEP.value)
    step = '' if out['step'] is None else f' (step {out["step"]})'
    print(f'Wrote {src}{step} as a Hugging Face Llama directory {_TO_HF.value}.', flush=True)
    return
  if not _TO_PARAMS.value:
    raise app.UsageError('convert: say what to convert (--to_params, --from_hf or --to_hf).')
  _need('output')
  out = checkpoint.to_params(_workdir(), _OUTPUT.value, dtype=_DTYPE.value, step=_STEP.value)
  print(
    f'Wrote the params of step {out["step"]} of {_workdir()} as {_DTYPE.value} to '
    f'{out["output"]} ({out["bytes"] / 2**20:.1f} MiB).',
    flush=True,
  )


_RUN = {
  'train': _train,
  'tokenizer train': _tokenizer_train,
  'data prepare': _data_prepare,
  'convert': _convert,
  'slurm': _slurm,
  'sweep': _sweep,
  'generate': _generate,
  'eval': _eval,
}


def main(argv):
  command = ' '.join(argv[1:])
  if command not in _RUN:
    raise app.UsageError(
      f'usage: python -m launch {{{"|".join(COMMANDS)}}} [flags]; got {argv[1:]}'
    )
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if command == 'train' and _GPU_DEFAULTS.value:
    from clm_jax import gpu_env

    # Before any JAX backend starts: XLA reads its flags once, at start-up.
    if gpu_env.gpu_present() and (changed := gpu_env.apply(os.environ)):
      logging.info('GPU defaults: %s', ' '.join(f'{k}={v}' for k, v in changed.items()))
  if _SPAWN.value:
    from clm_jax import spawn

    if command != 'train':
      raise app.UsageError('--spawn runs `train` only.')
    sys.exit(
      spawn.run(
        _without(sys.argv[1:], ('spawn',)),
        _SPAWN.value,
        # The others notice a lost process within a heartbeat; then they are ended.
        grace=_HEARTBEAT.value + 30,
        devices_per_process=_split_gpus(_SPAWN.value),
      )
    )
  # Imported here so that `--help` and usage errors need no JAX start-up.
  from clm_jax import checkpoint
  from clm_jax import config as config_lib
  from clm_jax import distributed
  from clm_jax import hf
  from clm_jax import sweep
  from clm_jax.data import records

  try:
    _RUN[command]()
  except (
    config_lib.ConfigError,
    records.DataError,
    checkpoint.CheckpointError,
    distributed.DistributedError,
    sweep.SweepError,
    hf.HFError,
    FileNotFoundError,
    FileExistsError,
  ) as e:
    sys.exit(f'error: {e}')


def _parse(argv: list[str]):
  """absl's parsing, except that `sweep --config=FILE` names a sweep file, not a config."""
  if 'sweep' in argv[1:]:
    argv = [
      '--sweep_file' + arg[len('--config') :] if arg.split('=')[0] == '--config' else arg
      for arg in argv
    ]
  return app.parse_flags_with_usage(argv)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
