#!/usr/bin/env bash
# A throw-away single-node Ceph cluster with a RADOS Gateway: a real S3 endpoint on 127.0.0.1 for
# bkfs's object-storage tests and benchmarks (no fake S3). Needs root and Debian's ceph-mon,
# ceph-osd, radosgw, ceph-common and curl (scripts/setup.sh installs them). No systemd: the
# daemons run in the foreground of background shells, their PIDs in DIR/*.pid, and `down` stops
# exactly those.
#
#   scripts/ceph-s3.sh up DIR [RGW_PORT]   prints S3_ENDPOINT=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
#   scripts/ceph-s3.sh down DIR            stops the daemons and removes DIR
#
# One monitor (msgr v2 on 127.0.0.1:MON_PORT), one bluestore OSD on a sparse 10 GiB file in DIR
# (ext4 or xfs: bluestore opens it O_DIRECT, so not tmpfs), one radosgw (beast on 127.0.0.1).
# Pools are sized for one OSD (size 1, 8 PGs). Nothing is read from or written to /etc/ceph.
set -euo pipefail

cmd=${1:-}
D=${2:-}
if [ -z "$cmd" ] || [ -z "$D" ]; then
  echo "usage: $0 up|down DIR [RGW_PORT]" >&2
  exit 2
fi

# A zombie (state Z) counts as stopped: PID 1 here may reap orphans only every few seconds.
alive() {
  local s
  s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ "$s" != Z ]
}

down() {
  for d in rgw osd mon; do
    [ -f "$D/$d.pid" ] || continue
    local p
    p=$(cat "$D/$d.pid")
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 250); do alive "$p" || break; sleep 0.02; done
    if alive "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  rm -rf "$D"
}

if [ "$cmd" = down ]; then
  down
  exit 0
fi
[ "$cmd" = up ] || { echo "unknown command $cmd (up|down)" >&2; exit 2; }

for bin in ceph-mon ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool curl; do
  command -v "$bin" >/dev/null || {
    echo "$bin is missing: apt-get install ceph-mon ceph-osd radosgw ceph-common curl" >&2
    exit 3
  }
done

RGW_PORT=${3:-${RGW_PORT:-7480}}
MON_PORT=${MON_PORT:-$((RGW_PORT + 10000))}
AK=${S3_ACCESS_KEY:-BKFSTESTACCESSKEY000}
SK=${S3_SECRET_KEY:-bkfstestsecretkey00000000000000000000000}
C=$D/ceph.conf
K=$D/keyring
MONADDR="[v2:127.0.0.1:$MON_PORT]"

rm -rf "$D"
mkdir -p "$D"/{mon,osd/ceph-0,rgw,run,log}
chmod 0700 "$D"
trap 'echo "ceph-s3: start failed; logs in $D/log" >&2; down_on_fail' ERR
down_on_fail() {
  for f in "$D"/log/*; do echo "== $f" >&2; tail -5 "$f" >&2 || true; done
  for d in rgw osd mon; do [ -f "$D/$d.pid" ] && kill -KILL "$(cat "$D/$d.pid")" 2>/dev/null || true; done
}

FSID=$(cat /proc/sys/kernel/random/uuid)
cat >"$C" <<CONF
[global]
fsid = $FSID
mon_host = $MONADDR
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
keyring = $K
run_dir = $D/run
log_file = $D/log/\$cluster-\$name.log
mon_cluster_log_file = $D/log/\$cluster.\$channel.log
mon_data = $D/mon/\$cluster-\$id
osd_data = $D/osd/\$cluster-\$id
rgw_data = $D/rgw/\$cluster-\$id
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
mon_data_avail_warn = 2
mon_data_avail_crit = 1
# One monitor: propose at once (the default 1 s per command makes start-up twice as slow).
paxos_propose_interval = 0.05
[osd]
osd_objectstore = bluestore
bluestore_block_size = 10737418240
bluestore_fsck_on_mkfs = false
osd_memory_target = 1073741824
[client]
# radosgw may start before the OSD is up; a short tick avoids a 5 s stall.
objecter_tick_interval = 0.5
[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT
CONF

ceph-authtool "$K" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n client.rgw.a --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw' >/dev/null
monmaptool --create --fsid "$FSID" --addv a "$MONADDR" "$D/monmap" >/dev/null
ceph-mon -c "$C" --mkfs -i a --monmap "$D/monmap" --keyring "$K" >"$D/log/mon-mkfs.out" 2>&1
ceph-mon -c "$C" -i a -f >"$D/log/mon.out" 2>&1 &
echo $! >"$D/mon.pid"
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
timeout 60 ceph -c "$C" osd new "$OSD_UUID" 0 >/dev/null
ceph-osd -c "$C" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$D/log/osd-mkfs.out" 2>&1
ceph-osd -c "$C" -i 0 -f >"$D/log/osd.out" 2>&1 &
echo $! >"$D/osd.pid"
radosgw -c "$C" -n client.rgw.a -f >"$D/log/rgw.out" 2>&1 &
echo $! >"$D/rgw.pid"
# radosgw creates its pools before it listens.
for _ in $(seq 900); do
  curl -sf -o /dev/null "http://127.0.0.1:$RGW_PORT/" && break
  alive "$(cat "$D/rgw.pid")" || { echo "radosgw exited" >&2; false; }
  sleep 0.2
done
curl -sf -o /dev/null "http://127.0.0.1:$RGW_PORT/" || { echo "radosgw did not listen in 180 s" >&2; false; }
radosgw-admin -c "$C" user create --uid=bkfs-test --display-name=bkfs-test \
  --access-key="$AK" --secret-key="$SK" >/dev/null
trap - ERR
echo "S3_ENDPOINT=http://127.0.0.1:$RGW_PORT AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK"
