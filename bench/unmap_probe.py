"""What the CUDA virtual-memory calls cost, through ctypes on libcuda (PyTorch only makes the
context and the work). Prints one JSON object:

- "calls_us": microseconds spent in each driver function (create, map, access, unmap, release)
  to map and unmap 32 MiB as 16 allocations of one 2 MiB page or as one allocation;
- "idle"/"busy": do the calls wait for the device? cuMemUnmap, cuMemRelease and a map (create +
  map + access) of one 2 MiB page timed on an idle GPU and while ~0.4 s of matmuls are queued,
  with how much queued work was left after them;
- "device": what they cost the device. The same 400 queued matmuls (the host kept ahead of the
  GPU) timed on the GPU with CUDA events, with no page calls and with a page call every 4
  matmuls: map (create + map + access), unmap (unmap + release) or both. Three rounds in turn;
  per-call cost = (GPU time with calls - without) / calls, from the rounds' medians.

    python3 bench/unmap_probe.py
"""
import ctypes, time, json
import torch

cu = ctypes.CDLL("libcuda.so.1")
torch.cuda.init()
x = torch.randn(8192, 8192, device="cuda")
torch.cuda.synchronize()

class Loc(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]
class Flags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]
class Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", Loc),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", Flags)]
class Access(ctypes.Structure):
    _fields_ = [("location", Loc), ("flags", ctypes.c_int)]

def ok(r, what):
    assert r == 0, f"{what} -> {r}"

G = 2 << 20
prop = Prop(); prop.type = 1; prop.location = Loc(1, 0)
acc = Access(Loc(1, 0), 3)
base = ctypes.c_uint64()
ok(cu.cuMemAddressReserve(ctypes.byref(base), ctypes.c_size_t(256 * G), ctypes.c_size_t(G), ctypes.c_uint64(0), ctypes.c_ulonglong(0)), "reserve")

def map_page(i):
    h = ctypes.c_uint64()
    ok(cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(G), ctypes.byref(prop), ctypes.c_ulonglong(0)), "create")
    ok(cu.cuMemMap(ctypes.c_uint64(base.value + i * G), ctypes.c_size_t(G), ctypes.c_size_t(0), h, ctypes.c_ulonglong(0)), "map")
    ok(cu.cuMemSetAccess(ctypes.c_uint64(base.value + i * G), ctypes.c_size_t(G), ctypes.byref(acc), ctypes.c_size_t(1)), "access")
    return h

out = {}
for busy in (False, True, False, True):
    hs = [map_page(i) for i in range(4)]
    torch.cuda.synchronize()
    if busy:
        for _ in range(20):
            y = x @ x
    t0 = time.perf_counter()
    ok(cu.cuMemUnmap(ctypes.c_uint64(base.value), ctypes.c_size_t(G)), "unmap")
    t1 = time.perf_counter()
    ok(cu.cuMemRelease(hs[0]), "release")
    t2 = time.perf_counter()
    # a map while busy too
    h = map_page(10)
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    key = "busy" if busy else "idle"
    out.setdefault(key, []).append(dict(unmap_us=round((t1 - t0) * 1e6, 1), release_us=round((t2 - t1) * 1e6, 1),
                                        map_us=round((t3 - t2) * 1e6, 1), left_after_ms=round((t4 - t3) * 1e3, 2)))
    for i, hh in enumerate(hs[1:], 1):
        ok(cu.cuMemUnmap(ctypes.c_uint64(base.value + i * G), ctypes.c_size_t(G)), "unmap")
        ok(cu.cuMemRelease(hh), "release")
    ok(cu.cuMemUnmap(ctypes.c_uint64(base.value + 10 * G), ctypes.c_size_t(G)), "unmap")
    ok(cu.cuMemRelease(h), "release")

# ---- each driver call on its own, per 2 MiB page and for one 32 MiB allocation -------------------
def timed_calls(pages, per_page):
    """Microseconds per driver function to map and unmap `pages` pages: one allocation per page
    (per_page) or one allocation of them all."""
    t = dict(create=0.0, map=0.0, access=0.0, unmap=0.0, release=0.0)
    hs = []
    sizes = [G] * pages if per_page else [pages * G]
    off = 0
    for sz in sizes:
        h = ctypes.c_uint64()
        t0 = time.perf_counter()
        ok(cu.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(sz), ctypes.byref(prop), ctypes.c_ulonglong(0)), "create")
        t1 = time.perf_counter()
        ok(cu.cuMemMap(ctypes.c_uint64(base.value + 100 * G + off), ctypes.c_size_t(sz), ctypes.c_size_t(0), h, ctypes.c_ulonglong(0)), "map")
        t2 = time.perf_counter()
        t["create"] += t1 - t0
        t["map"] += t2 - t1
        hs.append((h, off, sz))
        off += sz
    t0 = time.perf_counter()
    ok(cu.cuMemSetAccess(ctypes.c_uint64(base.value + 100 * G), ctypes.c_size_t(pages * G), ctypes.byref(acc), ctypes.c_size_t(1)), "access")
    t["access"] += time.perf_counter() - t0
    for h, off, sz in hs:
        t0 = time.perf_counter()
        ok(cu.cuMemUnmap(ctypes.c_uint64(base.value + 100 * G + off), ctypes.c_size_t(sz)), "unmap")
        t1 = time.perf_counter()
        ok(cu.cuMemRelease(h), "release")
        t["unmap"] += t1 - t0
        t["release"] += time.perf_counter() - t1
    return {k: round(v * 1e6, 1) for k, v in t.items()}


torch.cuda.synchronize()
out["calls_us"] = {
    "16 pages, one allocation each": [timed_calls(16, True) for _ in range(3)],
    "16 pages, one allocation": [timed_calls(16, False) for _ in range(3)],
}

# ---- what the calls cost the device ---------------------------------------------------------
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
N, EVERY, PAGES = 400, 4, 100


def release_all(handles, first):
    for i, hh in enumerate(handles):
        ok(cu.cuMemUnmap(ctypes.c_uint64(base.value + (first + i) * G), ctypes.c_size_t(G)), "unmap")
        ok(cu.cuMemRelease(hh), "release")


def timed(kind):
    """GPU milliseconds of N matmuls with page calls of `kind` every EVERY matmuls, and the calls."""
    # Pages for the unmap-only run are mapped before timing; maps go to slots 0..PAGES-1.
    pre = [map_page(i) for i in range(PAGES)] if kind == "unmap" else []
    made, calls = [], 0
    torch.cuda.synchronize()
    for _ in range(8):
        x @ x  # ~0.1 s of work ahead of the host, so the GPU never waits for it
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(N):
        a @ a
        if kind == "none" or i % EVERY:
            continue
        k = i // EVERY
        if kind in ("map", "both"):
            made.append(map_page(k % PAGES if kind == "map" else 0))
            calls += 1
        if kind == "unmap":
            release_all([pre[k]], k)
            calls += 1
        if kind == "both":
            release_all([made.pop()], 0)
            calls += 1
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    if kind == "map":
        release_all(made, 0)
    if kind == "unmap":
        release_all(pre[N // EVERY:], N // EVERY)
    return ms, calls


rounds = {k: [] for k in ("none", "map", "unmap", "both")}
calls = {}
for _ in range(3):
    for kind in rounds:
        ms, calls[kind] = timed(kind)
        rounds[kind].append(ms)
med = {k: sorted(v)[1] for k, v in rounds.items()}
out["device"] = dict(
    gpu_ms=rounds,
    calls=calls,
    device_us_per_call={k: round((med[k] - med["none"]) * 1e3 / calls[k], 1) for k in rounds if calls[k]},
)
print(json.dumps(out))
