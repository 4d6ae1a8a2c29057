#!/usr/bin/env bash
# Install everything (system packages included), then: make a sample image
# dataset, commit it, change some labels, commit again, show log/ls/diff,
# mount the commit read-only and read from it.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- functions (tests/test_cli_promises.py sources this block) ---
# Print a command as it can be pasted into a shell (each word quoted the way
# Python's shlex.quote does: bare when safe, else in single quotes), then run it.
quote_word() {
    local q="'" word=$1
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$word"
    else
        printf "'%s'" "${word//$q/$q\"$q\"$q}"
    fi
}
show_command() {
    local word line=""
    for word in "$@"; do
        line+="${line:+ }$(quote_word "$word")"
    done
    printf '%s' "$line"
}
step() { printf '\n\033[1m$ %s\033[0m\n' "$(show_command "$@")"; "$@"; }
# --- end functions ---

echo "demo: installing what commitfs needs (scripts/setup.sh); the first run takes a few minutes" >&2
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
DEMO=${DEMO_DIR:-$PWD/demo}
rm -rf "$DEMO"
mkdir -p "$DEMO"
export COMMITFS_REPO="$DEMO/repo"
export XDG_CACHE_HOME="$DEMO/cache"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "demo: making a sample image dataset in $DEMO/data" >&2
python scripts/make_sample.py "$DEMO/data" --images 200
step commitfs init
step commitfs commit "$DEMO/data" -m "sample dataset v1" --meta source=make_sample.py
sed -i 's#^train/cat/img_00004.png,cat#train/cat/img_00004.png,dog#' "$DEMO/data/labels.csv"
rm "$DEMO/data/val/cat/img_00000.png"
cp "$DEMO/data/train/fish/img_00003.png" "$DEMO/data/train/fish/img_99999.png"
step commitfs commit "$DEMO/data" -m "fix a label, drop a bad image, add one"
step commitfs tag v1 main~1
step commitfs log --oneline
step commitfs ls main
step commitfs diff v1 main
step commitfs cat main:labels.csv | head -n 6

if commitfs mount --help >/dev/null 2>&1; then
    mkdir -p "$DEMO/mnt"
    trap 'commitfs umount "$DEMO/mnt" 2>/dev/null || true' EXIT
    step commitfs mount "$DEMO/mnt"
    step ls "$DEMO/mnt" "$DEMO/mnt/branches" "$DEMO/mnt/tags"
    step ls "$DEMO/mnt/tags/v1/train/cat" | head -n 5
    step sha256sum "$DEMO/mnt/branches/main/labels.csv" "$DEMO/data/labels.csv"
    # What a training script logs about the exact bytes it read:
    step python -c 'import sys, commitfs.lineage as l; print(l.describe(sys.argv[1]))' "$DEMO/mnt/tags/v1/labels.csv"
    step commitfs umount "$DEMO/mnt"
    # The path a training job uses: one revision, pinned, as the mount root.
    step commitfs mount v1 "$DEMO/mnt"
    step du -sh "$DEMO/mnt/train"
    step commitfs umount "$DEMO/mnt"
    trap - EXIT
fi
step commitfs fsck
printf '\ndemo done: repository in %s\n' "$COMMITFS_REPO"
