#!/bin/bash
#@HEADER@
# Written by clm_jax.cluster.slurm from its template, clm_jax/cluster/sbatch.sh,
# filling in the template's placeholders (names between at signs). Submit from
# the repository root with the virtualenv active: sbatch passes the submitting
# environment to the job, so the script activates nothing itself.
#
# --exclusive and --mem=0: whole nodes, all of their cores and memory.
# --requeue: Slurm may requeue the job after a node failure or preemption; the
#   same command then resumes from the latest checkpoint in the workdir.
# --signal: USR1 to this shell @WARNING_SECONDS@ s before the time limit (see the trap).
# --open-mode=append: a requeued job keeps its id, and so its log files; append
#   rather than overwrite the earlier attempts.
# sbatch reads #SBATCH lines only up to the first command.
#@SBATCH_LINES@

set -euo pipefail

# The directory the job runs in: the --chdir given, or where sbatch ran.
RUN_DIR=@RUN_DIR@
# The batch log's directory, and so the per-task logs' too.
LOG_DIR=@LOG_DIR@
# 1 (one process per node) or the GPUs per node (one process per GPU).
TASKS_PER_NODE=@TASKS_PER_NODE@
# The coordinator's port; 0: derived from the job id, below.
PORT=@PORT@
# Each task's log file; %t in the name is the task id.
TASK_LOG=@TASK_LOG@
# What each task runs with `bash -c`. The `$` references in it are left to that
# shell, so that each task expands them with its own values (its SLURM_PROCID).
# shellcheck disable=SC2016  # Single quotes on purpose, see above.
TASK_COMMAND=@TASK_COMMAND@

# Relative paths in the arguments (config, workdir) are relative to this directory.
cd "$RUN_DIR"
# Slurm already opened this script's own log; the per-task logs go here too.
mkdir -p "$LOG_DIR"
# Log lines reach the files as they are printed, not when a buffer fills or the
# process is killed.
export PYTHONUNBUFFERED=1

# Process 0 hosts JAX's coordinator; srun places task 0 on the first node.
# sed reads the whole list, where `head -n 1` could exit first and fail the
# script (SIGPIPE under pipefail).
COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
if (( PORT == 0 )); then
  # Derived from the job id: two jobs sharing a first node get different ports,
  # and a requeued job (same id) gets the same one.
  PORT=$((20000 + SLURM_JOB_ID % 20000))
fi
export JAX_COORDINATOR_ADDRESS="$COORDINATOR:$PORT"
# An equal share of the node's cores for each task; srun's default is one core each.
CPUS_PER_TASK=$(( SLURM_CPUS_ON_NODE / TASKS_PER_NODE ))

echo "clm_jax: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})," \
  "$SLURM_JOB_NUM_NODES node(s) x $TASKS_PER_NODE task(s) = $SLURM_NTASKS process(es)," \
  "$CPUS_PER_TASK CPU(s) each, coordinator $JAX_COORDINATOR_ADDRESS"
echo "clm_jax: nodes $SLURM_JOB_NODELIST"

# USR1 (the time limit is near): one SIGTERM to the step, which srun passes to
# every task; training finishes its step, saves and exits 0. The requeue waits
# until the step has exited, since requeueing a running job kills it.
# TERM (scancel, preemption, the time limit itself): Slurm signals the tasks
# directly, so this shell passes nothing on (a second SIGTERM makes training exit
# without saving); it only keeps waiting, because the job ends when this shell
# exits, and that would kill the tasks mid-save.
REQUEUE=0
STOP_SENT=0
INTERRUPTED=0
SRUN_PID=
# shellcheck disable=SC2317  # Reached through the traps below (ShellCheck 0.9 misses that).
on_usr1() {
  INTERRUPTED=1
  REQUEUE=1
  echo "clm_jax: time limit near: stopping training to save; the job requeues after."
  if (( ! STOP_SENT )) && [[ -n $SRUN_PID ]]; then
    STOP_SENT=1
    kill -TERM "$SRUN_PID" 2>/dev/null || true
  fi
}
# shellcheck disable=SC2317  # As for on_usr1.
on_term() {
  INTERRUPTED=1
  echo "clm_jax: SIGTERM: Slurm is stopping the tasks; waiting for them to save."
}
trap on_usr1 USR1
trap on_term TERM

# In the background, so that this shell can run its traps while srun runs.
# --kill-on-bad-exit: one failed task ends the step instead of leaving the
# others blocked in a collective.
srun \
  --ntasks-per-node="$TASKS_PER_NODE" \
  --cpus-per-task="$CPUS_PER_TASK" \
  --kill-on-bad-exit=1 \
  --open-mode=append \
  --output="$TASK_LOG" \
  bash -c "$TASK_COMMAND" &
SRUN_PID=$!

# A trap makes `wait` return early; wait again until srun itself has exited
# (bash keeps a finished child's status for the next `wait`).
while true; do
  INTERRUPTED=0
  STATUS=0
  wait "$SRUN_PID" || STATUS=$?
  (( INTERRUPTED )) || break
done

if (( REQUEUE )); then
  echo "clm_jax: training exited with status $STATUS; requeueing job $SLURM_JOB_ID."
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "clm_jax: training exited with status $STATUS."
exit "$STATUS"
