"""Quick functional check of bufferheap as PyTorch's CUDA allocator on one GPU.

usage: PYTHONPATH=python BUFFERHEAP_LIB=dist/libbufferheap_ffi.so python3 bench/gpu_smoke.py [--policy default|mps] [--direct]

Installs bufferheap, then: tensors of many sizes on cuda:0 with results checked against the
CPU; frees; memory_stats keys present and consistent; empty_cache lowers reserved memory;
snapshot() writes a pickle that loads back with segments and device_traces (and that PyTorch's
memory viewer renders); a tensor made on a side stream and used on the main stream while the
side stream reuses memory keeps its data when record_stream is called; and what PyTorch
shows for an impossible (1 PiB) allocation. `--direct` installs the C++ front
(install(direct=True)), whose full device must raise torch.OutOfMemoryError and which must answer
PyTorch's own statistics, cuDNN's benchmark mode and memory snapshot calls. Prints one JSON object; exit status 1 if a check failed.
"""

import argparse
import json
import os
import pickle
import sys
import tempfile
import traceback

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--policy", default="default", choices=["default", "mps"])
ap.add_argument("--direct", action="store_true", help="install through the C++ front")
a = ap.parse_args()
DIRECT = a.direct  # checks below name their tensors `a`

for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
    os.environ.pop(var, None)

import torch  # noqa: E402

import bufferheap  # noqa: E402

report = {"torch": torch.__version__, "checks": {}, "info": {}}
checks, info = report["checks"], report["info"]


def check(name):
    """Run one check; record True/False, or the exception as a failure."""

    def wrap(fn):
        try:
            ok = fn()
            checks[name] = bool(ok) if ok is not None else True
        except Exception as e:  # noqa: BLE001 - every failure goes into the report
            checks[name] = False
            info[name + ".error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
        return fn

    return wrap


@check("install")
def _():
    info["install"] = bufferheap.torch.install(policy=a.policy, direct=a.direct)
    info["install_again_same"] = bufferheap.torch.install(policy=a.policy, direct=a.direct) == info["install"]
    return info["install_again_same"]


@check("install_refuses_other_settings")
def _():
    other = "mps" if a.policy == "default" else "default"
    try:
        bufferheap.torch.install(policy=other, direct=a.direct)
    except RuntimeError as e:
        info["install_other_settings"] = str(e)
        return True
    return False


dev = torch.device("cuda:0")
MiB = 1 << 20
SIZES = [0, 1, 511, 512, 4097, MiB - 1, MiB + 1, 10 * MiB - 512, 20 * MiB + 7, 100 * MiB, 1 << 30]


@check("tensors_of_many_sizes")
def _():
    tensors = []
    for n in SIZES:
        t = torch.empty(n, dtype=torch.uint8, device=dev)
        t.copy_(torch.arange(n, dtype=torch.int32, device=dev).remainder_(251))
        tensors.append(t)
    torch.cuda.synchronize()
    ok = True
    # every live tensor has its own memory, and its bytes survived everything written since
    pointers = [t.data_ptr() for t in tensors if t.numel()]
    ok &= len(set(pointers)) == len(pointers)
    for n, t in zip(SIZES, tensors):
        if n:
            k = min(n, 4096)
            idx = torch.cat([torch.arange(k), n - 1 - torch.arange(k), torch.randint(0, n, (4096,))])
            ok &= torch.equal(t.cpu()[idx] if n <= MiB else t[idx.to(dev)].cpu(), idx.remainder(251).to(torch.uint8))
    info["allocated_with_tensors"] = bufferheap.memory_allocated()
    info["min_alignment_bytes"] = min(p & -p for p in pointers)
    ok &= info["allocated_with_tensors"] >= sum(SIZES)
    del tensors, t
    torch.cuda.synchronize()
    info["allocated_after_free"] = bufferheap.memory_allocated()
    return ok


@check("compute_matches_cpu")
def _():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1024, generator=g)
    y = torch.randn(1024, 1024, generator=g)
    got = (x.to(dev) @ y.to(dev)).relu().sum(dim=0).cpu()
    want = (x.double() @ y.double()).relu().sum(dim=0).float()
    err = float((got - want).abs().max() / want.abs().max())
    info["matmul_rel_err"] = err
    return err < 1e-2  # TF32 may be on


REQUIRED_KEYS = ["allocated_bytes.all.current", "allocated_bytes.all.peak", "reserved_bytes.all.current",
                 "reserved_bytes.all.peak", "num_alloc_retries", "num_ooms"]


@check("memory_stats")
def _():
    st = bufferheap.memory_stats()
    info["memory_stats_keys"] = len(st)
    missing = [k for k in REQUIRED_KEYS if k not in st]
    info["memory_stats_missing"] = missing
    cur_a, peak_a = st.get("allocated_bytes.all.current", -1), st.get("allocated_bytes.all.peak", -1)
    cur_r, peak_r = st.get("reserved_bytes.all.current", -1), st.get("reserved_bytes.all.peak", -1)
    info["memory_stats_sample"] = {k: st.get(k) for k in REQUIRED_KEYS + ["num_device_alloc", "num_device_free"]}
    return not missing and 0 <= cur_a <= peak_a and cur_a <= cur_r <= peak_r and peak_a >= (1 << 30)


@check("torch_stats")
def _():
    # Through the pluggable path PyTorch has no statistics (show what it says); the direct
    # front answers PyTorch's own calls with bufferheap's counters.
    x = torch.ones(5 * MiB, device=dev)
    try:
        theirs = torch.cuda.memory_allocated()
        info["torch.cuda.memory_allocated"] = theirs
    except RuntimeError as e:
        info["torch.cuda.memory_allocated"] = str(e).splitlines()[0]
        return not DIRECT
    ours = bufferheap.memory_stats()
    torch_stats = torch.cuda.memory_stats()
    same = [k for k in REQUIRED_KEYS + ["active_bytes.all.current", "requested_bytes.large_pool.peak"]
            if torch_stats.get(k) != ours.get(k)]
    info["torch_stats_differing"] = same
    r = info["torch_stats"] = {"same_allocated": theirs == ours["allocated_bytes.all.current"], "same_keys": not same}
    torch.cuda.reset_peak_memory_stats()
    r["peak_reset"] = torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
    torch.cuda.reset_accumulated_memory_stats()
    r["counts_reset"] = torch.cuda.memory_stats()["allocation.all.allocated"] == 0
    info["torch_memory_summary_lines"] = len(torch.cuda.memory_summary().splitlines())
    del x
    return DIRECT and all(r.values())


@check("torch_snapshot")
def _():
    # PyTorch's own memory history and snapshot: the wrapper raises, the direct front answers
    # with bufferheap's segments and events (what PyTorch's memory viewer reads).
    try:
        torch.cuda.memory._record_memory_history(max_entries=10_000)
    except RuntimeError as e:
        info["torch_snapshot"] = str(e).splitlines()[0]
        return not DIRECT
    x = torch.empty(3 * MiB, dtype=torch.uint8, device=dev)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    blocks = {b["address"]: b for s in snap["segments"] for b in s["blocks"]}
    allocs = [e for e in snap["device_traces"][0] if e["action"] == "alloc" and e["addr"] == x.data_ptr()]
    tiled = all(sum(b["size"] for b in s["blocks"]) == s["total_size"] for s in snap["segments"])
    r = info["torch_snapshot"] = {
        "segments": len(snap["segments"]),
        "block_of_x": blocks.get(x.data_ptr(), {}).get("state"),
        "alloc_recorded": len(allocs) == 1,
        "blocks_tile_segments": tiled,
    }
    del x
    return DIRECT and r["block_of_x"] == "active_allocated" and r["alloc_recorded"] and tiled


@check("cudnn_benchmark")
def _():
    # cuDNN's benchmark mode asks the allocator for its largest available block (cacheInfo);
    # PyTorch's pluggable wrapper raises there, the direct front answers.
    torch.backends.cudnn.benchmark = True
    try:
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(dev)
        x = torch.randn(32, 64, 56, 56, device=dev, requires_grad=True)
        conv(x).sum().backward()
        torch.cuda.synchronize()
        info["cudnn_benchmark"] = "worked"
        return True
    except RuntimeError as e:
        info["cudnn_benchmark"] = str(e).splitlines()[0]
        return not DIRECT
    finally:
        torch.backends.cudnn.benchmark = False


@check("empty_cache_lowers_reserved")
def _():
    keep = torch.ones(8 * MiB, device=dev)
    for n in (64 * MiB, 256 * MiB, 3 * MiB):
        torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
    torch.cuda.synchronize()
    before = bufferheap.memory_reserved()
    torch.cuda.empty_cache()  # through the reset hook
    via_torch = bufferheap.memory_reserved()
    bufferheap.empty_cache()
    after = bufferheap.memory_reserved()
    info["reserved_before_after_torch_after_ours"] = [before, via_torch, after]
    ok = after < before and after >= bufferheap.memory_allocated() and float(keep.sum()) == 8 * MiB
    return ok


@check("snapshot_pickle")
def _():
    x = torch.ones(3 * MiB, device=dev)  # something live to show
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "snap.pkl.gz")
        snap = bufferheap.snapshot(path)
        import gzip

        with gzip.open(path, "rb") as f:
            loaded = pickle.load(f)
        info["snapshot"] = {"segments": len(loaded["segments"]), "trace_entries": [len(t) for t in loaded["device_traces"]],
                            "bytes": os.path.getsize(path)}
        ok = loaded == snap and loaded["segments"] and isinstance(loaded["device_traces"], list)
        ok = ok and any(b["state"] == "active_allocated" and b["address"] <= x.data_ptr() < b["address"] + b["size"]
                        for s in loaded["segments"] for b in s["blocks"])
        try:
            from torch.cuda import _memory_viz

            html = _memory_viz.segment_plot(loaded)
            info["memory_viz_segment_plot_chars"] = len(html)
            html = _memory_viz.trace_plot(loaded)
            info["memory_viz_trace_plot_chars"] = len(html)
            info["memory_viz_segsum_lines"] = len(_memory_viz.segsum(loaded).splitlines())
        except Exception as e:  # noqa: BLE001
            info["memory_viz_error"] = f"{type(e).__name__}: {e}"
            ok = False
    del x
    return ok


@check("record_stream_cross_stream")
def _():
    side, main = torch.cuda.Stream(), torch.cuda.current_stream()

    def attempt(n, cycles):
        with torch.cuda.stream(side):
            a = torch.ones(n, device=dev)
        main.wait_stream(side)
        torch.cuda._sleep(cycles)  # keep the main stream busy
        out = a * 3  # queued on main, runs after the sleep
        done = torch.cuda.Event()
        done.record(main)
        a.record_stream(main)
        old = a.data_ptr()
        del a
        with torch.cuda.stream(side):  # runs at once on the idle side stream
            b = torch.full((n,), 7.0, device=dev)
        busy = not done.query()  # main still sleeping: a reuse without waiting would corrupt out
        reused = b.data_ptr() == old
        torch.cuda.synchronize()
        return {"main_busy_at_reuse": busy, "reused_address": reused, "data_intact": bool((out == 3).all())}

    attempt(1024, 1000)  # loads every kernel first: a lazy module load can synchronize the device
    torch.cuda.synchronize()
    r = attempt(16 * MiB, 500_000_000)
    info["record_stream"] = r
    if not r["main_busy_at_reuse"]:
        info["record_stream"]["note"] = "inconclusive: the main stream had finished before the reuse"
    return r["data_intact"] and r["main_busy_at_reuse"]


@check("memory_fraction_hook")
def _():
    torch.cuda.set_per_process_memory_fraction(0.9, 0)
    return True


@check("device_full_raises_out_of_memory")
def _():
    # Two 45 GiB tensors do not fit on an 80 GB device: the second must raise with the
    # allocator's figures, and the process must go on working afterwards.
    free, _total = torch.cuda.mem_get_info()
    n = int(free * 0.6)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    # The usual hook for dumping a snapshot on out-of-memory: the wrapper raises here.
    observed = []
    try:
        torch._C._cuda_attach_out_of_memory_observer(lambda *args: observed.append(list(args)))
        attached = True
    except RuntimeError as e:
        attached = str(e).splitlines()[0]
    try:
        b = torch.empty(n, dtype=torch.uint8, device=dev)
        info["device_full"] = {"raised": None, "data_ptr": b.data_ptr()}
        del b
        ok = False
    except Exception as e:  # noqa: BLE001
        info["device_full"] = {"raised": type(e).__name__, "message": str(e)[:2000]}
        ok = "out of memory" in str(e)
        if DIRECT:  # the direct front raises PyTorch's own out-of-memory error, observed
            ok &= isinstance(e, torch.OutOfMemoryError) and len(observed) == 1 and observed[0][1] == n
    info["device_full"]["oom_observer"] = {"attached": attached, "calls": observed}
    del a
    bufferheap.empty_cache()
    y = torch.ones(MiB, device=dev)
    return ok and float(y.sum()) == MiB


@check("impossible_allocation")
def _():
    before = bufferheap.memory_stats().get("num_ooms")
    try:
        t = torch.empty(1 << 50, dtype=torch.uint8, device=dev)
        info["alloc_1PiB"] = {"raised": None, "data_ptr": t.data_ptr()}
        del t
    except Exception as e:  # noqa: BLE001
        info["alloc_1PiB"] = {"raised": type(e).__name__, "message": str(e)[:2000]}
    info["alloc_1PiB"]["num_ooms_before_after"] = [before, bufferheap.memory_stats().get("num_ooms")]
    raised = info["alloc_1PiB"]["raised"] is not None
    # the process must go on working afterwards
    y = torch.ones(MiB, device=dev)
    return raised and float(y.sum()) == MiB


@check("zero_size_and_reuse_loop")
def _():
    torch.empty(0, device=dev)
    for i in range(2000):
        t = torch.empty((i * 7919) % (4 * MiB) + 1, dtype=torch.uint8, device=dev)
        t.fill_(i % 256)
    torch.cuda.synchronize()
    return True


report["ok"] = all(checks.values())
print(json.dumps(report, indent=1, default=str), flush=True)
sys.exit(0 if report["ok"] else 1)
