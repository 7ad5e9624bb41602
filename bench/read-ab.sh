#!/bin/bash
# A/B of two bkfs builds on the random 4 KiB read routes, interleaved (issue 14 §3): for each round
# and each build, a fresh `bkfs serve` (fio's nbd engine) and/or `bkfs mount` (O_DIRECT file),
# page cache dropped before every figure, fio 4 KiB randread at QD1 and QD16; prints IOPS, p99 and
# the serving process's CPU µs per read (user+sys from /proc/PID/stat: robust under load).
#
#   bench/read-ab.sh REPO ROUNDS SECS ROUTES BUILD_DIR...
#     REPO      e.g. the "repo-frames" that `node dist/bench/random-read.js --small --keep --work DIR` leaves
#     ROUTES    any of serve, mount, ceiling (comma-separated); ceiling = bench/fuse-ceiling.ts's
#               in-memory fuse-native file system (same mount options, no bkfs code): the FUSE
#               per-request cost alone
#     BUILD_DIR checkouts with a built dist/ (e.g. this worktree and an export of main)
# Needs root (drop_caches, FUSE) and fio with the nbd engine. Set WARM=1 to keep the page cache.
set -euo pipefail
repo=$1 rounds=$2 secs=$3 routes=$4
shift 4
work=$(mktemp -d /var/tmp/bkfs-read-ab-XXXXXX)
export BKFS_RUN_DIR=$work/run
trap 'rm -rf "$work"' EXIT

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
drop() { [ "${WARM:-0}" = 1 ] || { sync; echo 3 > /proc/sys/vm/drop_caches; }; }
fiorun() { # target-args... -> "iops p99us"
  fio --name=r --rw=randread --bs=4k --runtime="$secs" --time_based --output-format=json "$@" |
    node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s.slice(s.indexOf("{"))).jobs[0].read;console.log(Math.round(j.iops),Math.round(j.clat_ns.percentile["99.000000"]/1000))})'
}
report() { # build route qd pid c0 iops p99
  local c1 us
  c1=$(cpu "$4")
  us=$(awk -v a="$5" -v b="$c1" -v n="$6" -v s="$secs" 'BEGIN{printf "%d", (b-a)*10000/(n*s)}')
  printf '%-40s %-5s QD%-2s %7s IOPS  p99 %6s us  CPU %4s us/read  load %s\n' "$1" "$2" "$3" "$6" "$7" "$us" "$(cut -d' ' -f1 /proc/loadavg)"
}

for r in $(seq 1 "$rounds"); do
  for b in "$@"; do
    for qd in 1 16; do
      if [[ $routes == *serve* ]]; then
        sock=$work/s.sock
        rm -f "$sock"
        node "$b/bin/bkfs" -r "$repo" serve vm --listen "unix:$sock" --foreground 2>/dev/null &
        pid=$!
        for _ in $(seq 1 300); do [ -S "$sock" ] && break; sleep 0.05; done
        drop
        c0=$(cpu $pid)
        read -r iops p99 < <(fiorun --ioengine=nbd --uri="nbd+unix:///vda?socket=$sock" --iodepth=$qd)
        report "$b" serve $qd $pid "$c0" "$iops" "$p99"
        kill -TERM $pid
        wait $pid 2>/dev/null || true
      fi
      if [[ $routes == *mount* ]]; then
        mp=$work/mnt
        mkdir -p "$mp"
        node "$b/bin/bkfs" -r "$repo" mount vm "$mp" >/dev/null
        pid=$(node -e 'console.log(require(process.argv[1]).readState(process.argv[2]).pid)' "$b/dist/src/fuse/state.js" "$mp")
        drop
        c0=$(cpu "$pid")
        if [ "$qd" = 1 ]; then
          read -r iops p99 < <(fiorun --filename="$mp/vda.raw" --direct=1 --ioengine=psync)
        else
          read -r iops p99 < <(fiorun --filename="$mp/vda.raw" --direct=1 --ioengine=libaio --iodepth=$qd)
        fi
        report "$b" mount $qd "$pid" "$c0" "$iops" "$p99"
        node "$b/bin/bkfs" umount "$mp" >/dev/null || node "$b/bin/bkfs" umount --lazy "$mp" >/dev/null
      fi
      if [[ $routes == *ceiling* ]]; then
        mp=$work/ceil
        mkdir -p "$mp"
        coproc CEIL { exec node "$b/dist/bench/fuse-ceiling.js" --serve "$mp" --size-mib 512; }
        pid=$CEIL_PID
        read -r _ <&"${CEIL[0]}"
        drop
        c0=$(cpu "$pid")
        if [ "$qd" = 1 ]; then
          read -r iops p99 < <(fiorun --filename="$mp/vda.raw" --direct=1 --ioengine=psync)
        else
          read -r iops p99 < <(fiorun --filename="$mp/vda.raw" --direct=1 --ioengine=libaio --iodepth=$qd)
        fi
        report "$b" ceil $qd "$pid" "$c0" "$iops" "$p99"
        kill -TERM "$pid"
        wait "$pid" 2>/dev/null || true
      fi
    done
  done
done
