"""Do the CUDA virtual-memory calls wait for the device? Times cuMemUnmap, cuMemRelease and a
map (create + map + access) of one 2 MiB page on an idle GPU and while ~0.4 s of matmuls are
queued, through ctypes on libcuda (PyTorch only makes the context and the work). Prints JSON:
for each state, the call times and how much queued work was left after them.

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
ok(cu.cuMemAddressReserve(ctypes.byref(base), ctypes.c_size_t(64 * G), ctypes.c_size_t(G), ctypes.c_uint64(0), ctypes.c_ulonglong(0)), "reserve")

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
print(json.dumps(out))
