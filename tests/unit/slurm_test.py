"""sbatch scripts: their directives, and their shell logic run against fake srun / scontrol."""

import pathlib

import pytest

from clm_jax.cluster import slurm

ROOT = pathlib.Path(__file__).resolve().parents[2]

TRAIN_ARGS = ['--config=configs/codellama_34b.py', '--workdir=runs/cl34b']

# Stand-ins for the cluster. srun runs its command as tasks 0 and 1, as two
# nodes with one task each would, and passes SIGTERM on to them; python
# records its arguments and, when FAKE_SLEEP is set, runs until SIGTERM.
FAKE_SRUN = """\
#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
while [[ $1 == -* ]]; do shift; done
pids=()
on_term() { echo TERM >> "$FAKE_LOG/srun.signals"; kill -TERM "${pids[@]}"; }
trap on_term TERM
for i in 0 1; do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=2 "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while true; do
    s=0; wait "$pid" || s=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  (( s > status )) && status=$s
done
exit $status
"""
FAKE_SCONTROL = """\
#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
# A long list, line by line, as a large allocation gives: a reader that stops
# after the first line would make this writer die of SIGPIPE.
if [[ $1 == show && $2 == hostnames ]]; then
  for i in $(seq 17 3000); do printf 'gpu-%03d\\n' "$i"; done
fi
"""
FAKE_PYTHON = """\
#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/python.$SLURM_PROCID.args"
if [[ -n ${FAKE_SLEEP:-} ]]; then
  trap 'kill $sleeper; echo TERM > "$FAKE_LOG/python.$SLURM_PROCID.term"; exit 0' TERM
  sleep "$FAKE_SLEEP" & sleeper=$!
  touch "$FAKE_LOG/python.$SLURM_PROCID.started"
  wait $sleeper
fi
exit "${FAKE_STATUS:-0}"
"""


def _script(per, **kwargs):
  return slurm.sbatch_script(TRAIN_ARGS, nodes=16, gpus_per_node=8, per=per, **kwargs)


def _sbatch_options(text):
  return [line.removeprefix('#SBATCH ') for line in text.splitlines() if line.startswith('#SBATCH')]


def test_render_fills_every_placeholder_and_nothing_else():
  template = '#!/bin/bash\n#@HEAD@\nX=@X@\necho "$X" # @X@\n'
  text = slurm._render(template, HEAD='# a\n# b', X='@HEAD@')
  assert text == '#!/bin/bash\n# a\n# b\nX=@HEAD@\necho "$X" # @HEAD@\n'
  with pytest.raises(RuntimeError, match='@X@'):
    slurm._render(template, HEAD='')
  with pytest.raises(RuntimeError, match='Y'):
    slurm._render(template, HEAD='', X='', Y='')


def test_optional_directives_absent_when_not_given():
  options = _sbatch_options(_script('node'))
  assert not any(o.split('=')[0] in ('--partition', '--time', '--account') for o in options)


def test_workdir_root_is_the_run_directory():
  text = _script('node', workdir_root='/lustre/me/clm_jax')
  assert '#SBATCH --chdir=/lustre/me/clm_jax' in text
  assert '\nRUN_DIR=/lustre/me/clm_jax\n' in text and 'RUN_DIR="$SLURM_SUBMIT_DIR"' not in text
  with pytest.raises(ValueError, match='--workdir_root'):
    _script('node', workdir_root='/lustre/my runs')


@pytest.mark.parametrize(
  'kwargs, flag',
  [
    (dict(nodes=0), '--nodes'),
    (dict(nodes=2, gpus_per_node=0), '--gpus_per_node'),
    (dict(nodes=2, per='socket'), '--per'),
    (dict(nodes=2, port=70000), '--port'),
    (dict(nodes=2, partition='a b'), '--partition'),
  ],
)
def test_bad_input_names_the_flag(kwargs, flag):
  with pytest.raises(ValueError, match=flag):
    slurm.sbatch_script(TRAIN_ARGS, **kwargs)


def test_args_the_script_sets_or_cannot_expand_are_rejected():
  with pytest.raises(ValueError, match='--process_id'):
    slurm.sbatch_script([*TRAIN_ARGS, '--process_id=3'], nodes=2)
  with pytest.raises(ValueError, match='--array'):
    slurm.sbatch_script(['--trial=$SLURM_ARRAY_TASK_ID'], nodes=2)


def test_extra_sbatch_lines_are_added_verbatim():
  options = _sbatch_options(_script('node', extra_sbatch=('--qos=high', '#SBATCH --reservation=r')))
  assert options[-2:] == ['--qos=high', '--reservation=r']


def test_write_sbatch_creates_parents(tmp_path):
  path = slurm.write_sbatch(str(tmp_path / 'a' / 'b' / 'x.sbatch'), '#!/bin/bash\n')
  assert isinstance(path, pathlib.Path) and path.read_text() == '#!/bin/bash\n'
