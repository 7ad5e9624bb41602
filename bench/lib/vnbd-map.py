#!/usr/bin/python3
"""virtnbdmap without a kernel NBD device, for bench/run.

virtnbdmap (virtnbdbackup's single-file / instant-recovery tool) parses the backup stream files
into a block map, serves the full backup with nbdkit (its python plugin virtnbd-nbdkit-plugin,
behind the blocksize and cow filters) and, for incrementals, replays the changed blocks onto the
/dev/nbdX device it connected with `qemu-nbd -c`. This kernel has no nbd module, so bench/run
serves the same nbdkit command on a unix socket and reads it through nbdfuse instead. This helper
does the two parts that are virtnbdmap's own code:

  vnbd-map.py blockmap OUT.json FULL.data[,INC.data...]   the block map, by virtnbdmap's own
                                                          getDataRanges (imported from it)
  vnbd-map.py replay URI BLOCKMAP.json                    virtnbdmap's replayChanges: write the
                                                          incremental data frames to the export
"""
import importlib.machinery
import importlib.util
import json
import sys

import nbd

MAX_REQ = 4 * 1024 * 1024


def load_virtnbdmap():
    loader = importlib.machinery.SourceFileLoader("virtnbdmap", "/usr/bin/virtnbdmap")
    spec = importlib.util.spec_from_loader("virtnbdmap", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def blockmap(out, files):
    m = load_virtnbdmap()
    stream = m.streamer.SparseStream(m.types)
    stypes = m.types.SparseStreamTypes()
    ranges = []
    for f in files:
        with open(f, "rb") as reader:
            r, _meta = m.getDataRanges(stream, stypes, reader)
            ranges.extend(r)
    with open(out, "w") as fh:
        json.dump(ranges, fh)


def replay(uri, path):
    with open(path, "rb") as fh:
        ranges = json.load(fh)
    h = nbd.NBD()
    h.connect_uri(uri)
    total = 0
    files = {}
    for e in ranges:
        if e["inc"] is not True:
            continue
        done = 0
        while done < e["length"]:
            n = min(MAX_REQ, e["length"] - done)
            if e["data"]:
                f = files.get(e["file"])
                if f is None:
                    f = files[e["file"]] = open(e["file"], "rb")
                f.seek(e["offset"] + done)
                h.pwrite(f.read(n), e["originalOffset"] + done)
            else:
                h.zero(n, e["originalOffset"] + done)
            done += n
        total += e["length"]
    h.flush()
    h.shutdown()
    for f in files.values():
        f.close()
    print(json.dumps({"bytes": total}))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "blockmap":
        blockmap(sys.argv[2], sys.argv[3].split(","))
    elif len(sys.argv) == 4 and sys.argv[1] == "replay":
        replay(sys.argv[2], sys.argv[3])
    else:
        sys.stderr.write(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
