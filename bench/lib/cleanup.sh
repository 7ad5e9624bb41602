# Backstop cleanup for bench/run, sourced by it. The node programs release what they create in
# finally blocks; this runs on every exit of bench/run (EXIT trap) and releases whatever a crashed
# or killed node process left below the work directory:
#   1. ext4 (loop) mounts below $BENCH_WORK, then loop devices whose backing file lies below it,
#   2. FUSE mounts below it (fusermount3 -u, lazily as a last resort),
#   3. libvirt domains recorded in */domains/ (destroy, undefine with checkpoint metadata),
#   4. processes recorded in */pids/<pid> (SIGTERM by PID, SIGKILL after 15 s), only while
#      /proc/<pid>/comm still names the recorded command (no stray kills after PID reuse),
#   5. libvirtd/virtlogd if bench/run started them (by the PID it recorded).
# Mounts are found in /proc/self/mounts, loop devices with `losetup -l`.

bench_log() { printf '[bench/run] %s\n' "$*" >&2; }

# Mount points (decoded) at or below $1, deepest first; with $2 = fuse|other, only that kind.
bench_mounts_under() {
  local dir=$1 kind=${2:-all}
  awk -v d="$dir" -v kind="$kind" '
    function dec(s,   out, i, c) {
      out = ""
      for (i = 1; i <= length(s); i++) {
        c = substr(s, i, 1)
        if (c == "\\" && substr(s, i + 1, 3) ~ /^[0-7][0-7][0-7]$/) {
          out = out sprintf("%c", (substr(s, i + 1, 1) * 64) + (substr(s, i + 2, 1) * 8) + substr(s, i + 3, 1))
          i += 3
        } else out = out c
      }
      return out
    }
    {
      m = dec($2); fuse = ($3 ~ /^fuse/)
      if (kind == "fuse" && !fuse) next
      if (kind == "other" && fuse) next
      if (m == d || index(m, d "/") == 1) print length(m) "\t" m
    }' /proc/self/mounts | sort -rn | cut -f2-
}

# True while process $1 is the one recorded: same start time (field 22 of /proc/PID/stat) when
# $2 has one ("name starttime"), else same command name.
bench_pid_alive_as() {
  local pid=$1 rec=$2 name start stat rest comm
  name=${rec%% *}
  start=
  [ "$rec" != "$name" ] && start=${rec#* }
  [ -r "/proc/$pid/stat" ] || return 1
  if [ -n "$start" ] && [ "$start" != "?" ]; then
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    [ "${20:-}" = "$start" ]
    return
  fi
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  # comm is truncated to 15 characters
  [ "$comm" = "${name:0:15}" ]
}

bench_stop_pid() {
  local pid=$1 name=$2 i
  bench_pid_alive_as "$pid" "$name" || return 0
  bench_log "stopping leftover ${name%% *} (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 60); do
    bench_pid_alive_as "$pid" "$name" || return 0
    sleep 0.25
  done
  kill -KILL "$pid" 2>/dev/null || true
}

bench_cleanup_work() {
  local work=$1 m dev f pid name dom i
  [ -n "$work" ] && [ -d "$work" ] || return 0
  work=$(realpath "$work")
  # 1. filesystems on loop devices (and anything else that is not FUSE), deepest first
  while IFS= read -r m; do
    [ -n "$m" ] || continue
    bench_log "unmounting leftover $m"
    for i in 1 2 3 4 5 6 7 8 9 10; do umount "$m" 2>/dev/null && break; sleep 0.5; done
    mountpoint -q "$m" && umount -l "$m" 2>/dev/null
  done < <(bench_mounts_under "$work" other)
  while IFS= read -r dev; do
    [ -n "$dev" ] || continue
    bench_log "detaching leftover $dev"
    for i in 1 2 3 4 5 6 7 8 9 10; do losetup -d "$dev" 2>/dev/null && break; sleep 0.5; done
  done < <(losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v d="$work/" 'index($2, d) == 1 { print $1 }')
  # 2. FUSE mounts (their daemons exit once unmounted)
  while IFS= read -r m; do
    [ -n "$m" ] || continue
    bench_log "unmounting leftover FUSE mount $m"
    for i in 1 2 3 4 5 6 7 8 9 10; do fusermount3 -u "$m" 2>/dev/null && break; sleep 0.5; done
    mountpoint -q "$m" && fusermount3 -u -z "$m" 2>/dev/null
  done < <(bench_mounts_under "$work" fuse)
  # 3. libvirt domains
  for f in "$work"/domains/* "$work"/*/domains/*; do
    [ -f "$f" ] || continue
    dom=$(cat "$f")
    bench_log "removing leftover libvirt domain $dom"
    virsh -q -c qemu:///system destroy "$dom" >/dev/null 2>&1
    virsh -q -c qemu:///system undefine "$dom" --checkpoints-metadata >/dev/null 2>&1
    rm -f "$f"
  done
  # 4. processes
  for f in "$work"/pids/* "$work"/*/pids/*; do
    [ -f "$f" ] || continue
    pid=$(basename "$f")
    name=$(head -1 "$f")
    bench_stop_pid "$pid" "$name"
    rm -f "$f"
  done
  # loop devices on files a FUSE daemon served are only free now
  while IFS= read -r dev; do
    [ -n "$dev" ] || continue
    losetup -d "$dev" 2>/dev/null
  done < <(losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v d="$work/" 'index($2, d) == 1 { print $1 }')
  return 0
}
