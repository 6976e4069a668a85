"""Writes the starting corpus for the snapshot fuzz target: small snapshots cut from the real
traces and the recorded fixtures, pickled as torch writes them (protocol 4, shared frame dicts
kept where the source has them), plus one gzipped and one protocol-2 variant.

Run from the repository root: python3 fuzz/make_corpus.py fuzz/seeds
"""

import copy
import gzip
import pickle
import sys
from pathlib import Path

SOURCES = [
    ("resnet", "traces/resnet50_train.pkl.gz"),
    ("gpt2", "traces/gpt2_train.pkl.gz"),
    ("stacks", "crates/trace/tests/fixtures/stacks_small.pkl.gz"),
    ("expandable", "crates/trace/tests/fixtures/expandable_small.pkl.gz"),
]


def cut(snap, segments, blocks, events, frames):
    """A prefix of `snap`: its first segments (each with its first blocks) and events."""
    out = dict(snap)
    segs = []
    for s in snap["segments"][:segments]:
        s = dict(s)
        s["blocks"] = [dict(b) for b in s["blocks"][:blocks]]
        if not frames:
            s.pop("frames", None)
            for b in s["blocks"]:
                b.pop("frames", None)
        segs.append(s)
    out["segments"] = segs
    traces = []
    for t in snap["device_traces"]:
        t = [dict(e) for e in t[:events]]
        if not frames:
            for e in t:
                e.pop("frames", None)
        traces.append(t)
    out["device_traces"] = traces
    if "external_annotations" in out:
        out["external_annotations"] = out["external_annotations"][:2]
    return out


def main(dest):
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, path in SOURCES:
        snap = pickle.loads(gzip.open(path).read())
        shapes = [(0, 0, 12, False), (2, 3, 40, False), (1, 2, 8, True), (4, 8, 150, False)]
        for segments, blocks, events, frames in shapes:
            if frames and name not in ("stacks", "expandable"):
                continue
            small = cut(snap, segments, blocks, events, frames)
            data = pickle.dumps(small, protocol=4)
            f = dest / f"{name}-s{segments}-b{blocks}-e{events}{'-frames' if frames else ''}.pkl"
            f.write_bytes(data)
            written += 1
    small = cut(pickle.loads(gzip.open(SOURCES[0][1]).read()), 1, 2, 10, False)
    (dest / "resnet-gzip.pkl.gz").write_bytes(gzip.compress(pickle.dumps(small, protocol=4)))
    (dest / "resnet-protocol2.pkl").write_bytes(pickle.dumps(small, protocol=2))
    (dest / "resnet-protocol5.pkl").write_bytes(pickle.dumps(copy.deepcopy(small), protocol=5))
    print(f"{written + 3} seeds in {dest}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/seeds")
