#!/usr/bin/env bash
# Install everything (system packages included), then: make a sample image
# dataset, commit it, change some labels, commit again, show log/ls/diff,
# mount the commit read-only and read from it, then serve the review UI,
# fetch its front page and print the URL to open (Enter stops it; at once
# without a terminal).
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
step commitfs diff v1 main --rows -- labels.csv   # which rows of the label table changed
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

# The review UI: serve the repository, fetch its front page, print the URL.
printf '\n\033[1m$ commitfs ui --port %s &\033[0m\n' "${DEMO_UI_PORT:-8470}"
commitfs ui --port "${DEMO_UI_PORT:-8470}" > "$DEMO/ui.out" 2> "$DEMO/ui.err" &
ui_pid=$!
trap 'kill -INT "$ui_pid" 2>/dev/null || true; wait "$ui_pid" 2>/dev/null || true' EXIT
url=""
for _ in $(seq 100); do
    url=$(grep -o 'http://[^ ]*' "$DEMO/ui.out" || true)
    [ -n "$url" ] && break
    kill -0 "$ui_pid" 2>/dev/null || { cat "$DEMO/ui.err" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "demo: commitfs ui did not start" >&2; exit 1; }
cat "$DEMO/ui.out"
step python -c 'import sys, urllib.request as u; r = u.urlopen(sys.argv[1], timeout=30); page = r.read().decode()
print(r.status, len(page), "bytes:", page[page.index("<title>") + 7:page.index("</title>")])' "$url"
printf '\nOpen %s in a browser (the compare page: %scompare/v1/main).\n' "$url" "$url"
if [ -t 0 ] && [ -z "${CI:-}" ]; then
    read -r -p "Press Enter to stop the UI and end the demo. " _ || true
fi
kill -INT "$ui_pid"
wait "$ui_pid" || true
trap - EXIT
printf '\ndemo done: repository in %s\n' "$COMMITFS_REPO"
