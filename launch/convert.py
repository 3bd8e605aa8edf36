"""`convert`: a run's checkpoint to params only, and Hugging Face directories both ways."""

from absl import app
from absl import flags

from launch import common

_TO_PARAMS = flags.DEFINE_bool('to_params', False, 'convert: write a params-only checkpoint.')
_FROM_HF = flags.DEFINE_string('from_hf', None, 'convert: a Hugging Face Llama dir -> --output.')
_TO_HF = flags.DEFINE_string('to_hf', None, 'convert: --checkpoint (or --workdir) -> this HF dir.')
_DTYPE = flags.DEFINE_string('dtype', 'bfloat16', 'convert: dtype of the written params.')
_STEP = flags.DEFINE_integer('step', None, 'convert: checkpoint step; default the latest.')
CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'A run dir, a params-only checkpoint or a Hugging Face Llama dir.'
)


def convert():
  from clm_jax.ckpt import hf
  from clm_jax.ckpt import params as params_lib

  output, workdir = common.OUTPUT.value, common.workdir()
  if _FROM_HF.value:
    common.need('output')
    out = hf.convert_from_hf(_FROM_HF.value, output)
    print(
      f'Wrote {_FROM_HF.value} as a params-only checkpoint {out["output"]} '
      f'({out["bytes"] / 2**20:.1f} MiB).',
      flush=True,
    )
    return
  if _TO_HF.value:
    src = CHECKPOINT.value or workdir
    out = hf.convert_to_hf(src, _TO_HF.value, dtype=_DTYPE.value, step=_STEP.value)
    step = '' if out['step'] is None else f' (step {out["step"]})'
    print(f'Wrote {src}{step} as a Hugging Face Llama directory {_TO_HF.value}.', flush=True)
    return
  if not _TO_PARAMS.value:
    raise app.UsageError('convert: say what to convert (--to_params, --from_hf or --to_hf).')
  common.need('output')
  out = params_lib.to_params(workdir, output, dtype=_DTYPE.value, step=_STEP.value)
  print(
    f'Wrote the params of step {out["step"]} of {workdir} as {_DTYPE.value} to '
    f'{out["output"]} ({out["bytes"] / 2**20:.1f} MiB).',
    flush=True,
  )


COMMANDS = {'convert': convert}
