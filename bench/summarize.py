"""Markdown tables comparing allocators, from the JSON lines of workloads.py and microbench.py.

usage: python3 bench/summarize.py [out/results.jsonl]

Where a (workload, mode) or (size range, mode) appears more than once, the last line counts.
Lines carry the id of the run_all.sh invocation that wrote them ("run"); a ratio to native is
given only between lines of one invocation (timings are compared only inside one run).
Losses are compared with native's step by step (max relative difference); PyTorch's own
expandable_segments and cudaMallocAsync show how far apart runs differing only in the
allocator land through nondeterministic kernels (bf16 noise).
"""

import json
import math
import sys
from collections import OrderedDict

MODE_NAMES = {"native": "native", "expandable": "expandable_segments", "async": "cudaMallocAsync"}
MODE_ORDER = ["native", "expandable", "async"]
WORKLOAD_NAMES = {
    "gpt2": "GPT-2 124M, AdamW, bf16 autocast, batch 8, seq 128..1024 varying",
    "resnet50": "ResNet-50, SGD, bf16 autocast, batch 32/48/64 varying",
}
# Loss sequences count as matching native's if no step differs by more than this, or by
# more than 1.5x the largest difference of PyTorch's own modes from native in the same run.
LOSS_RTOL = 1e-2


def label(rec):
    mode = rec.get("mode", "?")
    if mode.startswith("bufferheap"):
        return f"{mode} ({rec.get('policy') or 'default'})"
    return MODE_NAMES.get(mode, mode)


def mode_key(lbl):
    for i, m in enumerate(MODE_ORDER):
        if lbl == MODE_NAMES[m]:
            return (i, lbl)
    return (len(MODE_ORDER), lbl)


def size(n):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def max_rel_diff(a, b):
    if not a or not b or len(a) != len(b):
        return None
    diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    # A loss that went NaN (a diverged run) differs without bound; max() would skip it.
    return math.inf if any(math.isnan(d) for d in diffs) else max(diffs)


def load(path):
    workloads, micro, errors = OrderedDict(), OrderedDict(), OrderedDict()
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            # a failure stays listed until a later line of the same run succeeds
            run = (rec.get("workload") or "microbench", label(rec))
            if "error" in rec:
                errors[run] = rec
                continue
            errors.pop(run, None)
            if "workload" in rec:
                workloads[(rec["workload"], label(rec))] = rec
            elif "lo" in rec:
                micro[((rec["lo"], rec["hi"], rec["live"]), label(rec))] = rec
    return workloads, micro, list(errors.values())


def workload_table(workloads):
    out = ["## Training steps (GiB)", "",
           "| workload | allocator | s/step | peak GPU used | max reserved | max allocated | reserved/allocated "
           "| loss max rel diff vs native | losses match |",
           "|---|---|---|---|---|---|---|---|---|"]
    for w in sorted({k[0] for k in workloads}):
        rows = sorted((k[1] for k in workloads if k[0] == w), key=mode_key)
        native = workloads.get((w, "native"))
        base = native.get("losses") if native else None
        diffs = {lbl: max_rel_diff(workloads[(w, lbl)].get("losses"), base) for lbl in rows}
        torch_noise = max([d for lbl, d in diffs.items() if d is not None and math.isfinite(d) and lbl in MODE_NAMES.values()] + [0.0])
        tol = max(LOSS_RTOL, 1.5 * torch_noise)
        first = True
        for lbl in rows:
            r = workloads[(w, lbl)]
            res, alloc = r.get("max_reserved_gib"), r.get("max_allocated_gib")
            ratio = res / alloc if res is not None and alloc else None
            d = diffs[lbl]
            if lbl == "native":
                match = "(reference)"
            elif d is None:
                match = "–"
            else:
                match = "yes" if d <= tol else f"**no** (tolerance {tol:.3g})"
            name = WORKLOAD_NAMES.get(w, w) if first else ""
            first = False
            out.append(f"| {name} | {lbl} | {fmt(r.get('sec_per_step'), 4)} | {fmt(r.get('peak_used_gib'))} "
                       f"| {fmt(res)} | {fmt(alloc)} | {fmt(ratio, 3)} | {'–' if d is None else f'{d:.2e}'} | {match} |")
    return out


def micro_table(micro):
    labels = sorted({k[1] for k in micro}, key=mode_key)
    ours = [lbl for lbl in labels if lbl.startswith("bufferheap")]
    head = "| sizes, live blocks | " + " | ".join(labels) + "".join(f" | {o} / native" for o in ours) + " |"
    out = ["## Latency: one alloc + one free through raw_alloc/raw_delete (ns per pair, best of runs)", "",
           head, "|---" * (1 + len(labels) + len(ours)) + "|"]
    for rng in sorted({k[0] for k in micro}, key=lambda r: (r[0], r[1])):
        lo, hi, live = rng
        cells = []
        for lbl in labels:
            r = micro.get((rng, lbl))
            cells.append("–" if r is None else f"{r['ns_per_pair']:,.0f}")
        native = micro.get((rng, "native"))
        for o in ours:
            r = micro.get((rng, o))
            if r is None or native is None:
                cells.append("–")
            elif r.get("run") != native.get("run"):
                cells.append("(other run)")
            else:
                cells.append(f"{r['ns_per_pair'] / native['ns_per_pair']:.2f}")
        out.append(f"| {size(lo)} .. {size(hi)}, {live} | " + " | ".join(cells) + " |")
    return out


def error_list(errors):
    out = ["## Failed runs", ""]
    for e in errors:
        what = e.get("workload") or "microbench"
        out.append(f"- {what} / {label(e)}: {e['error']}")
        for line in e.get("stderr_tail", [])[-5:]:
            out.append(f"    {line}")
    return out


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "out/results.jsonl"
    workloads, micro, errors = load(path)
    parts = []
    if workloads:
        parts.append(workload_table(workloads))
    if micro:
        parts.append(micro_table(micro))
    if errors:
        parts.append(error_list(errors))
    if not parts:
        parts.append([f"no results in {path}"])
    print("\n\n".join("\n".join(p) for p in parts))


if __name__ == "__main__":
    main()
