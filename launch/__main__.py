"""clm_jax command line: `python -m launch COMMAND [--config=...] [--flags]`.

Commands:
  train             Train (or resume) the config into --workdir.
  plan              Parameters, memory per device, FLOPs and time of the config, and the
                    layouts that fit; --xla also compiles the real step (--json for data).
  tokenizer train   Train a sentencepiece BPE tokenizer for code on --input.
  data prepare      Filter, deduplicate and tokenize --input into ArrayRecord shards.
  convert           --to_params: a run's latest checkpoint -> params only, in --dtype;
                    --from_hf / --to_hf: Hugging Face Llama directories <-> clm_jax.
  generate          Continue --prompt (or infill up to --suffix) with --checkpoint.
  eval              --task=humaneval | mbpp (pass@k, sandboxed) | perplexity (held-out code).
  slurm             Write an sbatch script that trains the config on --nodes nodes.
  sweep             Run the trials of a sweep file (--config=configs/sweeps/NAME.py).

`python -m launch COMMAND --help` lists the flags COMMAND takes; any other flag, an
unknown config key or a broken config file is a one-line error.

`train` joins a multi-process run given --coordinator_address, --num_processes
and --process_id (or JAX_* variables, or under srun / mpirun); --spawn=N runs
N such processes on this machine.

Examples:
  python -m launch train
  python -m launch plan --config=configs/codellama_34b.py [--device_type=h100-80gb] [--xla]
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
  python -m launch eval --task=mbpp --checkpoint=runs/default --max_new_tokens=512
  python -m launch eval --task=perplexity --checkpoint=runs/default
"""

import sys

from absl import app
from absl import logging

from launch import arguments
from launch import cluster
from launch import common
from launch import convert
from launch import data
from launch import inference
from launch import planning
from launch import preflight
from launch import training

# Each command's flags live in its module; importing them defines the flags.
_MODULES = (training, planning, data, convert, inference, cluster)
_RUN = {name: run for module in _MODULES for name, run in module.COMMANDS.items()}
# A command takes the flags of the module that runs it (any added there later too),
# launch.common's and absl's, and these of other modules: all of one, or one by name.
_BORROWS = {
  'generate': ('checkpoint',),
  'eval': ('checkpoint',),
  'slurm': (training,),  # The script runs `train` with them.
  'sweep': training.DISTRIBUTED_FLAGS,  # A multi-host trial joins with these.
}
_TAKES = {
  name: (module, *_BORROWS.get(name, ())) for module in _MODULES for name in module.COMMANDS
}


def main(argv):
  command = ' '.join(argv[1:])
  try:
    preflight.check(command)
  except app.UsageError as e:
    sys.exit(f'error: {e}')
  logging.get_absl_handler().addFilter(common.QuietLibraries())
  # Imported here so that `--help` and usage errors need no JAX start-up.
  from clm_jax import config as config_lib
  from clm_jax.ckpt import checkpoint
  from clm_jax.ckpt import hf
  from clm_jax.cluster import sweep
  from clm_jax.data import records
  from clm_jax.eval import mbpp
  from clm_jax.parallel import distributed

  try:
    _RUN[command]()
  except (
    app.UsageError,
    config_lib.ConfigError,
    records.DataError,
    checkpoint.CheckpointError,
    distributed.DistributedError,
    sweep.SweepError,
    hf.HFError,
    mbpp.MBPPError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
  ) as e:
    sys.exit(f'error: {e}')


def _parse(argv: list[str]):
  """`arguments.parse`, except that `sweep --config=FILE` names a sweep file, not a config."""
  if 'sweep' in argv[1:]:
    argv = [
      '--sweep_file' + arg[len('--config') :] if arg.split('=')[0] == '--config' else arg
      for arg in argv
    ]
  try:
    return arguments.parse(argv, _TAKES, __doc__)
  except app.UsageError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
