#!/usr/bin/env python3
"""Record a PyTorch CUDA memory snapshot of your own program.

    python tools/record_snapshot.py -o my.pkl.gz [--max-entries N] [--stacks] -- script.py args...
    python tools/record_snapshot.py -o my.pkl.gz -- -m package.module args...

Runs the script as `python script.py args...` would (as __main__, with sys.argv set), with
torch.cuda.memory._record_memory_history enabled, and writes the snapshot as a gzipped pickle
when the script ends: normally, through sys.exit, or with an exception (which is then re-raised).
The file is what `bufferheap replay` and `torch.cuda.memory._dump_snapshot` read.
"""
import argparse
import gzip
import os
import pickle
import runpy
import sys


def parse(argv):
    if "--" not in argv:
        sys.exit("usage: record_snapshot.py -o OUT [--max-entries N] [--stacks] -- script.py args...")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description="Record a CUDA memory snapshot of a Python program.")
    ap.add_argument("-o", "--output", required=True, help="snapshot file to write (gzipped pickle)")
    ap.add_argument("--max-entries", type=int, default=None,
                    help="keep only the last N trace events (default: all)")
    ap.add_argument("--stacks", action="store_true",
                    help="record Python stack frames for each event (much larger files)")
    opts = ap.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command or command == ["-m"]:
        ap.error("nothing to run after --")
    return opts, command


def dump(torch, path):
    snapshot = torch.cuda.memory._snapshot()
    tmp = path + ".tmp"
    with gzip.open(tmp, "wb") as f:
        pickle.dump(snapshot, f, protocol=4)
    os.replace(tmp, path)
    events = sum(len(t) for t in snapshot.get("device_traces", []))
    print(f"record_snapshot: wrote {path} ({events} events, "
          f"{len(snapshot.get('segments', []))} segments)", file=sys.stderr)


def main(argv):
    opts, command = parse(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("record_snapshot: CUDA is not available; there is no device memory to record")
    history = dict(enabled="all", context="all" if opts.stacks else None, stacks="python")
    if opts.max_entries is not None:
        history["max_entries"] = opts.max_entries
    torch.cuda.memory._record_memory_history(**history)
    try:
        if command[0] == "-m":
            sys.argv = command[1:]
            sys.path[0] = os.getcwd()  # as `python -m` does
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = command
            sys.path[0] = os.path.dirname(os.path.abspath(command[0]))
            runpy.run_path(command[0], run_name="__main__")
    finally:
        try:
            dump(torch, opts.output)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)


if __name__ == "__main__":
    main(sys.argv[1:])
