#!/usr/bin/python3
"""NBD extent helper for bench/run (libnbd, the library nbdcopy and nbdinfo are built on).

  nbd-extents.py dirty URI CONTEXT            print the ranges a meta context flags (bit 0) as JSON
                                              [{"offset":..,"length":..}], e.g. the dirty ranges of
                                              qemu:dirty-bitmap:NAME exported by `qemu-nbd -B NAME`
  nbd-extents.py copy SRC_URI DST_URI FILE    copy the ranges listed in FILE (JSON list of
                                              {"offset","length","zero"?}) from SRC to DST; ranges
                                              that read as zeros (or say zero) become WRITE_ZEROES.
                                              Prints {"bytes":..,"zeroBytes":..}.

Used to replay the recorded disk history onto each tool's working image (through qemu-nbd, so that
persistent dirty bitmaps record the writes) and as the copy step of the qemu backing-chain peer.
"""
import json
import sys

import nbd

MAX_REQ = 4 * 1024 * 1024
IN_FLIGHT = 8


def connect(uri, context=None):
    h = nbd.NBD()
    if context:
        h.add_meta_context(context)
    h.connect_uri(uri)
    return h


def flagged(uri, context):
    h = connect(uri, context)
    size = h.get_size()
    out = []
    off = 0
    while off < size:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext == context:
                got.append((offset, list(entries)))
            return 0

        h.block_status(min(size - off, 1 << 30), off, cb)
        if not got:
            raise RuntimeError(f"server sent no {context} extents at {off}")
        start, entries = got[0]
        pos = start
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            if flags & 1:
                if out and out[-1]["offset"] + out[-1]["length"] == pos:
                    out[-1]["length"] += length
                else:
                    out.append({"offset": pos, "length": length})
            pos += length
        if pos <= off:
            raise RuntimeError("block status made no progress")
        off = pos
    h.shutdown()
    print(json.dumps(out))


def pieces(extents):
    for e in sorted(extents, key=lambda x: x["offset"]):
        off, end = e["offset"], e["offset"] + e["length"]
        while off < end:
            n = min(MAX_REQ, end - off)
            yield off, n, bool(e.get("zero", False))
            off += n


def copy(src_uri, dst_uri, path):
    with open(path, "rb") as f:
        extents = json.load(f)
    src = connect(src_uri)
    dst = connect(dst_uri)
    stats = {"bytes": 0, "zeroBytes": 0}
    zero_buf = {}
    cookies = []

    def drain(limit):
        while len(cookies) > limit:
            for c in list(cookies):
                if dst.aio_command_completed(c):  # raises if the write failed
                    cookies.remove(c)
            if len(cookies) > limit:
                dst.poll(-1)

    for off, n, is_zero in pieces(extents):
        if not is_zero:
            buf = src.pread(n, off)
            z = zero_buf.get(n)
            if z is None:
                z = zero_buf[n] = bytes(n)
            is_zero = buf == z
        if is_zero:
            drain(0)
            dst.zero(n, off)
            stats["zeroBytes"] += n
        else:
            # keep several writes in flight, as nbdcopy does
            drain(IN_FLIGHT - 1)
            cookies.append(dst.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(buf)), off))
            stats["bytes"] += n
    drain(0)
    dst.flush()
    dst.shutdown()
    src.shutdown()
    print(json.dumps(stats))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "dirty":
        flagged(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "copy":
        copy(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.stderr.write(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
