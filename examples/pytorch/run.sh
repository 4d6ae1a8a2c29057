#!/usr/bin/env bash
# End to end: a sample image dataset -> `commitfs run` training a tiny PyTorch
# model on the mounted dataset -> weights committed with lineage -> `commitfs lineage`.
#
#   examples/pytorch/run.sh [WORKDIR]      (default: a new temporary directory)
#
# Needs torch (CPU build: pip install -e ".[example]") and FUSE. IMAGES=N sets
# the dataset size (default 60), EPOCHS=N the training length (default 2).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
PY=${PYTHON:-$root/.venv/bin/python}
[ -x "$PY" ] || PY=python3
cfs() { "$PY" -m commitfs "$@"; }

"$PY" "$root/scripts/make_sample.py" "$work/sample" --images "${IMAGES:-60}" >&2
cfs -r "$work/datasets" init >&2
cfs -r "$work/models" init >&2
data=$(cfs -r "$work/datasets" commit "$work/sample" -m "sample images")
echo "dataset commit: $data" >&2

# The dataset is mounted read-only at its commit for the whole run; the
# DataLoader's workers read the PNGs through the mount.
cd "$work"
cfs -r "$work/models" run \
    --input data="$work/datasets@main" \
    --output "$work/out" \
    --to main -m "tiny classifier on the sample images" \
    -- "$PY" "$here/train.py" --epochs "${EPOCHS:-2}" --workers 2 >"$work/run.out"
weights=$(tail -n 1 "$work/run.out")
sed '$d' "$work/run.out" >&2
echo "weights commit: $weights" >&2

# Upstream of the weights: the exact dataset commit (and the command, times).
cfs -r "$work/models" lineage "$weights"
# Downstream of the dataset: every commit trained on it, in the models repository.
cfs -r "$work/datasets" lineage "$data" --search "$work/models" --downstream
