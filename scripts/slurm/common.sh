# Sourced by the job scripts in this folder (not a job itself). The caller has already cd'ed into the
# ct-toolkit checkout: CT_TOOLKIT_DIR when set, else the folder sbatch was called from.
#
# ct_python [--nv] sets the array PY to the command that starts the project's Python; jobs then run
# "${PY[@]}" scripts/<name>.py ... . It is chosen from the environment:
#   CONTAINER=ct-toolkit.sif  run inside this Apptainer image (built from apptainer/ct-toolkit.def): the
#                             image holds the locked environment, the checkout's code comes first on
#                             PYTHONPATH (so the image needs a rebuild only when uv.lock changes);
#                             --nv (GPU jobs) makes the host's NVIDIA driver visible in it. Folders
#                             outside $HOME and the checkout must be bound: APPTAINER_BIND=/data,/scratch
#   PYTHON=path/to/python     otherwise this interpreter (default: the checkout's .venv/bin/python)

ct_python() {
    if [[ -n "${CONTAINER:-}" ]]; then
        if [[ ! -f "$CONTAINER" ]]; then
            echo "CONTAINER=$CONTAINER: no such image file" >&2
            exit 2
        fi
        if ! command -v apptainer >/dev/null; then
            echo "CONTAINER is set but apptainer is not on PATH (module load apptainer?)" >&2
            exit 2
        fi
        PY=(apptainer exec "$@" --env "PYTHONPATH=$PWD" "$CONTAINER" python)
    else
        local py=${PYTHON:-.venv/bin/python}
        if ! command -v "$py" >/dev/null; then
            echo "PYTHON=$py: not found in $PWD; build the environment (make venv), or set PYTHON or CONTAINER" >&2
            exit 2
        fi
        PY=("$py")
    fi
}

# ct_gpus_per_node sets GPUS_PER_NODE, the training processes to start on each node: GPUS_PER_NODE when set,
# else the GPUs Slurm gave this node (SLURM_GPUS_ON_NODE), else the GPUs nvidia-smi lists. None is an error
# that says what to set (a CPU-only allocation trains with GPUS_PER_NODE=<processes> and --device cpu).
ct_gpus_per_node() {
    local n=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [[ -z $n ]] && command -v nvidia-smi >/dev/null; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if ! [[ $n =~ ^[0-9]+$ ]] || (( n < 1 )); then
        echo "no GPU on this node (GPUS_PER_NODE, SLURM_GPUS_ON_NODE and nvidia-smi give '${n:-nothing}'): ask" \
            "for GPUs (--gpus-per-node), or train on CPUs with GPUS_PER_NODE=<processes> and --device cpu" >&2
        exit 2
    fi
    GPUS_PER_NODE=$n
}

# ct_run_requeueable NAME COMMAND...: the training jobs' way through a time limit or a preemption. The job
# asks for `#SBATCH --signal=B:USR1@90 --requeue`; COMMAND is an srun step. It runs in the background (a
# trap runs only between commands, and `wait` is one that a signal cuts short); USR1 or TERM reaching this
# shell is passed on to every process of the job's steps (scancel --signal: the B: signal comes to the
# batch shell only). The training finishes its step, saves its resume checkpoint and exits 75
# (EXIT_PREEMPTED). On 75, or on any failure after such a signal (torchrun's agent, signalled too, exits 1
# once its workers have saved and exited 75), the job requeues itself (scontrol requeue): the next run
# starts the same command again, and the job's --resume flag continues from the checkpoint. Returns
# COMMAND's exit status.
ct_run_requeueable() {
    local name=$1 pid status=
    shift
    CT_STOP_REQUESTED=0
    trap '_ct_forward_stop USR1' USR1
    trap '_ct_forward_stop TERM' TERM
    "$@" &
    pid=$!
    while [[ -z $status ]]; do
        wait "$pid" && status=0 || status=$?
        if (( status > 128 )) && kill -0 "$pid" 2>/dev/null; then status=; fi  # wait cut short by a trap
    done
    if (( status == 75 || (status != 0 && CT_STOP_REQUESTED) )); then
        echo "$name stopped for the time limit (status $status): requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID" || echo "$name: scontrol requeue failed; resubmit the job" >&2
    fi
    return "$status"
}

_ct_forward_stop() {
    CT_STOP_REQUESTED=1
    scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || true
}
