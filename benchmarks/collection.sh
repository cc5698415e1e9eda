#!/usr/bin/env bash
# `diffcap caption FOLDER --output` on a large collection: peak memory for N images, throughput, and a run
# interrupted (SIGINT) and resumed, checked to hold every image exactly once.
#   benchmarks/collection.sh IMAGE_DIR [N_SMALL] [N_LARGE] [KILL_AFTER_S]
# IMAGE_DIR: a folder with at least N_LARGE images (e.g. Flickr8k's images/); the first N of them (by name) are
# linked into temporary folders. Uses the shipped checkpoint and its default sampler settings.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(realpath "$1"); small=${2:-10}; large=${3:-2000}; kill_after=${4:-60}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

collection() {  # collection NAME N: a folder of the first N images of $src
  mkdir -p "$work/$1"
  find "$src" -maxdepth 1 -type f | sort | head -n "$2" | while read -r f; do ln -s "$f" "$work/$1/"; done
  echo "$work/$1"
}

peak() {  # peak N: caption N images into a .jsonl, print peak RSS and the command's summary line
  local dir; dir=$(collection "n$1" "$1")
  /usr/bin/time -f "%M %e" -o "$work/time" .venv/bin/diffcap caption "$dir" --output "$work/n$1.jsonl" 2>"$work/err" \
    || { cat "$work/err"; exit 1; }
  read -r kb secs < "$work/time"
  echo "$1 images: peak RSS $((kb / 1024)) MiB, ${secs} s wall; $(tail -n 1 "$work/err")"
  [ "$(wc -l < "$work/n$1.jsonl")" -eq "$1" ] || { echo "expected $1 records"; exit 1; }
}

peak "$small"
peak "$large"

# interrupted and resumed: every image exactly once
dir="$work/n$large"; out="$work/resumed.jsonl"
.venv/bin/diffcap caption "$dir" --output "$out" 2>"$work/err1" &
pid=$!
sleep "$kill_after"; kill -INT "$pid"; wait "$pid" || true
kept=$(wc -l < "$out.partial")
.venv/bin/diffcap caption "$dir" --output "$out" --resume 2>"$work/err2"
python3 - "$out" "$work/n$large.jsonl" "$kept" <<'EOF'
import json, sys
resumed = [json.loads(line) for line in open(sys.argv[1])]
straight = [json.loads(line) for line in open(sys.argv[2])]
paths = [r["path"] for r in resumed]
assert len(paths) == len(set(paths)) == len(straight), (len(paths), len(set(paths)), len(straight))
same = sum(a == b for a, b in zip(resumed, straight))
print(f"interrupted after {sys.argv[3]} records, resumed: {len(paths)} records, each image once; "
      f"{same}/{len(straight)} identical to the uninterrupted run")
EOF
echo "resume summary: $(tail -n 1 "$work/err2")"
