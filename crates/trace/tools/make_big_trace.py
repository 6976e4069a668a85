#!/usr/bin/env python3
"""Writes a large synthetic memory snapshot for timing the decoder.

The events of the example traces are repeated (each copy shifted in time) until there are
--events of them, with the segments of the first trace. The result is a plain pickle
(protocol 4, as torch.cuda.memory._dump_snapshot writes), gzipped with --gzip.
It is for timing only: its facts are not meaningful. Do not commit the output.

    python3 crates/trace/tools/make_big_trace.py -o /tmp/big.pkl --events 900000
"""
import argparse
import gzip
import os
import pickle

HERE = os.path.dirname(os.path.abspath(__file__))
TRACES = os.path.join(HERE, "..", "..", "..", "traces")


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return pickle.loads(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--events", type=int, default=900_000)
    ap.add_argument("--gzip", action="store_true", help="gzip the output")
    ap.add_argument("inputs", nargs="*", help="snapshots to take events from (default: traces/*.pkl.gz)")
    args = ap.parse_args()
    inputs = args.inputs or sorted(
        os.path.join(TRACES, n) for n in os.listdir(TRACES) if n.endswith((".pkl", ".pkl.gz", ".pickle"))
    )
    snaps = [load(p) for p in inputs]
    source = [e for s in snaps for e in s["device_traces"][0]]
    span = source[-1]["time_us"] - source[0]["time_us"] + 1 if source else 0
    events, copy = [], 0
    while len(events) < args.events and source:
        for e in source[: args.events - len(events)]:
            e = dict(e)  # a fresh dict per event: pickle must not share them
            e["time_us"] += copy * span
            events.append(e)
        copy += 1
    out = dict(snaps[0])
    out["device_traces"] = [events]
    opener = gzip.open if args.gzip else open
    with opener(args.output, "wb") as f:
        pickle.dump(out, f, protocol=4)
    print(f"{args.output}: {len(events)} events, {os.path.getsize(args.output)} bytes")


if __name__ == "__main__":
    main()
