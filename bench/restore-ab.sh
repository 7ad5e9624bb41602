#!/bin/bash
# A/B of whole-disk restore to raw (issue 16), interleaved, against qemu-img convert of the same image.
#
#   bench/restore-ab.sh [--base DIR] [--runs N] [--workers "0 2"] [--dir /var/tmp]
#
# Builds (once, kept in DIR/bkfs-restore-ab) a 512 MiB qcow2 like bench/restore.ts's (1 MiB
# extents every 2 MiB, alternately random and text; 4 incrementals with scattered changes), backs
# it up, then runs N rounds of: `bkfs restore vm@check5 --disk vda --to out.raw` of this tree for
# each BKFS_RESTORE_WORKERS value, of the --base tree (another built checkout, e.g. main's) if
# given, and `qemu-img convert -O raw` of the flat image. Each line: case, wall seconds (including
# `sync` of the output), CPU seconds (user + sys, GNU time); then medians.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
BASE=""; RUNS=5; WORKERS="0 2"; DIR=/var/tmp
while [ $# -gt 0 ]; do
  case $1 in
    --base) BASE=$2; shift 2;; --runs) RUNS=$2; shift 2;;
    --workers) WORKERS=$2; shift 2;; --dir) DIR=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
W=$DIR/bkfs-restore-ab
bk() { node "$HERE/bin/bkfs" -r "$W/repo" "$@"; }
if [ ! -d "$W/repo" ]; then
  rm -rf "$W"; mkdir -p "$W"; cd "$W"
  node -e '
    const { randomBuffer, textFile } = require(process.argv[1] + "/dist/test/helpers/images");
    const fs = require("fs"); const MiB = 1 << 20; const fd = fs.openSync("src.raw", "w");
    fs.ftruncateSync(fd, 512 * MiB); const text = textFile(1, MiB).subarray(0, MiB);
    for (let off = 0, i = 0; off + MiB <= 512 * MiB; off += 2 * MiB, i++)
      fs.writeSync(fd, i % 2 === 0 ? randomBuffer(1000 + i, MiB) : text, 0, MiB, off);
    fs.closeSync(fd);
    fs.writeFileSync("chg.bin", randomBuffer(5000, MiB));' "$HERE"
  qemu-img convert -q -f raw -O qcow2 src.raw src.qcow2; rm src.raw
  bk init >/dev/null; bk backup vm --disk vda=src.qcow2 --level full >/dev/null
  for c in 2 3 4 5; do
    qemu-io -f qcow2 -c "write -s chg.bin $((c * 37))M 512k" -c "write -s chg.bin $((c * 53 + 1))M 512k" \
      -c "write -z $((c * 31))M 1M" src.qcow2 >/dev/null
    bk backup vm --disk vda=src.qcow2 --level inc >/dev/null
  done
fi
cd "$W"
OUT=$(mktemp)
cases="$([ -n "$BASE" ] && echo base) $(for w in $WORKERS; do echo "w$w"; done) qemu-img"
for r in $(seq "$RUNS"); do
  for v in $cases; do
    rm -f out.raw; sync
    w=0
    case $v in
      base) cmd=(node "$BASE/bin/bkfs" -r repo restore vm@check5 --disk vda --to out.raw);;
      qemu-img) cmd=(qemu-img convert -f qcow2 -O raw src.qcow2 out.raw);;
      *) cmd=(node "$HERE/bin/bkfs" -r repo restore vm@check5 --disk vda --to out.raw); w=${v#w};;
    esac
    s=$(date +%s.%N)
    BKFS_RESTORE_WORKERS=$w /usr/bin/time -f "%U %S" -o t.txt "${cmd[@]}" >/dev/null
    sync out.raw; e=$(date +%s.%N)
    read -r u sy < t.txt
    echo "$v $(echo "$e - $s" | bc) $(echo "$u + $sy" | bc)" | tee -a "$OUT"
  done
done
python3 - "$OUT" <<'PY'
import collections, statistics, sys
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    v, w, c = line.split(); d[v].append((float(w), float(c)))
for v, xs in d.items():
    print(f"{v}: wall median {statistics.median(x[0] for x in xs):.2f} s, cpu median {statistics.median(x[1] for x in xs):.2f} s")
PY
rm -f "$OUT" out.raw
