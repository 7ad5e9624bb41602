#!/bin/bash
# CLI start-up (issue 16 target: `bkfs --help` and `bkfs list` under 100 ms).
# Usage: bash bench/startup.sh [RUNS]   (after npm run build)
# Prints, for each command, the median over RUNS of wall time and of user+sys CPU time of the
# whole process, and the same for `node -e 0` (the floor no bkfs change can go under).
set -euo pipefail
runs=${1:-15}
root=$(cd "$(dirname "$0")/.." && pwd)
repo=$(mktemp -d /tmp/bkfs-bench-startup.XXXXXX)
trap 'rm -rf "$repo"' EXIT
node "$root/bin/bkfs" -r "$repo/r" init >/dev/null
median() { # runs "$@" $runs times; prints "wall N ms, cpu N ms"
  local f
  f=$(mktemp /tmp/bkfs-bench-startup-time.XXXXXX)
  for _ in $(seq "$runs"); do /usr/bin/time -a -o "$f" -f '%e %U %S' "$@" >/dev/null 2>&1; done
  awk '{w[NR]=$1*1000; c[NR]=($2+$3)*1000} END {n=asort(w); asort(c); m=int((n+1)/2); printf "wall %d ms, cpu %d ms\n", w[m], c[m]}' "$f"
  rm -f "$f"
}
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "node -e 0:  $(median node -e 0)"
echo "bkfs --help: $(median node "$root/bin/bkfs" --help)"
echo "bkfs list:  $(median node "$root/bin/bkfs" -r "$repo/r" list)"
