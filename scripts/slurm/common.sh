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
