"""The module-level API against a C stand-in of libbufferheap_ffi (no torch, no GPU)."""

import ctypes
import threading

import pytest

import bufferheap
from bufferheap import _snapshot


def _malloc(lib, size, device=0):
    return lib.fn("bufferheap_malloc")(size, device, None)


def _free(lib, ptr, device=0):
    lib.fn("bufferheap_free")(ptr, 0, device, None)


def test_stats_follow_allocations(fake_lib):
    assert not bufferheap.initialized()
    assert bufferheap.memory_allocated() == 0
    p = _malloc(fake_lib, 3000)
    q = _malloc(fake_lib, 1 << 20)
    assert p and q
    assert bufferheap.initialized()
    stats = bufferheap.memory_stats()
    assert list(stats) == sorted(stats)
    assert stats["allocated_bytes.all.current"] == 4096 + (1 << 20)
    assert bufferheap.memory_allocated(0) == bufferheap.max_memory_allocated("cuda:0") == 4096 + (1 << 20)
    _free(fake_lib, q)
    assert bufferheap.memory_allocated() == 4096
    assert bufferheap.max_memory_allocated() == 4096 + (1 << 20)
    assert bufferheap.memory_reserved() == bufferheap.max_memory_reserved() == 4096 + (1 << 20)
    bufferheap.empty_cache()
    assert bufferheap.memory_reserved() == 4096
    bufferheap.reset_peak_memory_stats()
    assert bufferheap.max_memory_reserved() == 4096 and bufferheap.max_memory_allocated() == 4096
    _free(fake_lib, p)


def test_devices_are_resolved(fake_lib):
    _malloc(fake_lib, 512, device=1)

    class FakeTorchDevice:
        type = "cuda"
        index = 1

    assert bufferheap.memory_allocated(1) == 512
    assert bufferheap.memory_allocated("cuda:1") == 512
    assert bufferheap.memory_allocated(FakeTorchDevice()) == 512
    assert bufferheap.memory_allocated("cuda") == 0  # current device: 0 without torch
    with pytest.raises(ValueError, match="not a CUDA device"):
        bufferheap.memory_allocated("cpu")
    with pytest.raises(TypeError):
        bufferheap.memory_allocated(True)


def test_errors_carry_the_library_message(fake_lib):
    with pytest.raises(bufferheap.BufferheapError, match="invalid device 99"):
        bufferheap.memory_stats(99)
    with pytest.raises(bufferheap.BufferheapError, match=r"bufferheap_set_watermarks\(42, 0.5, 1.0\) failed: invalid device 42"):
        bufferheap.set_watermarks(0.5, 1.0, device=42)
    with pytest.raises(bufferheap.BufferheapError, match="invalid device"):
        bufferheap.empty_cache(device=77)
    with pytest.raises(ValueError, match="not a device index"):
        bufferheap.reset_peak_memory_stats(device=-5)
    with pytest.raises(ValueError, match="not a device index"):
        bufferheap.memory_stats((1 << 32) + 1)  # would wrap to device 1
    for bad in ("cuda:", "0:", "cpu"):
        with pytest.raises(ValueError, match="not a CUDA device"):
            bufferheap.memory_stats(bad)


def test_set_watermarks(fake_lib):
    bufferheap.set_watermarks(1.0, 1.5)
    stats = bufferheap.memory_stats()
    assert stats["fake.low_watermark_ratio"] == 1.0 and stats["fake.high_watermark_ratio"] == 1.5
    with pytest.raises(ValueError):
        bufferheap.set_watermarks(2.0, 1.0)
    with pytest.raises(TypeError):
        bufferheap.set_watermarks(None, 1.0)


def test_configure_once(fake_lib):
    sent = bufferheap.configure("mps", low_watermark_ratio=1.0, high_watermark_ratio=1.7, debug=2)
    assert sent == {"policy": "mps", "high_watermark_ratio": "1.7", "low_watermark_ratio": "1.0", "debug": "2"}
    stats = bufferheap.memory_stats()
    assert stats["fake.policy"] == "mps" and stats["fake.debug"] == 2
    assert stats["fake.high_watermark_ratio"] == 1.7
    assert bufferheap.configure("mps", low_watermark_ratio=1, high_watermark_ratio=1.7, debug=2) == sent
    with pytest.raises(bufferheap.BufferheapError, match="already configured"):
        bufferheap.configure("default")


def test_configure_after_first_allocation_reports_the_library_error(fake_lib):
    _malloc(fake_lib, 512)
    with pytest.raises(bufferheap.BufferheapError, match="must come before the first allocation"):
        bufferheap.configure("mps")
    assert bufferheap._applied is None


def test_last_error_is_per_thread(fake_lib):
    with pytest.raises(bufferheap.BufferheapError):
        bufferheap.memory_stats(99)
    seen = []
    t = threading.Thread(target=lambda: seen.append(fake_lib.last_error()))
    t.start()
    t.join()
    assert seen == [""]
    assert "invalid device 99" in fake_lib.last_error()


def test_string_results_are_freed_by_the_library(fake_lib, monkeypatch):
    freed = []
    real = fake_lib.fn("bufferheap_string_free")

    class Spy:
        def __call__(self, ptr):
            freed.append(ptr)
            real(ptr)

    monkeypatch.setattr(fake_lib, "fn", lambda name, _orig=type(fake_lib).fn: Spy() if name == "bufferheap_string_free" else _orig(fake_lib, name))
    bufferheap.memory_stats()
    bufferheap.snapshot()
    assert len(freed) == 2 and all(isinstance(p, int) and p for p in freed)


def test_snapshot(fake_lib, tmp_path):
    bufferheap.configure("default", high_watermark_ratio=1.5)
    live = _malloc(fake_lib, 1000)
    gone = _malloc(fake_lib, 3 << 20)
    _free(fake_lib, gone)
    _malloc(fake_lib, 5000)  # 8 KiB class: a segment of its own
    assert _malloc(fake_lib, 1 << 60) is None  # recorded as an oom
    path = tmp_path / "snap.pkl.gz"
    snap = bufferheap.snapshot(str(path))
    assert _snapshot.read(path) == snap
    segs = snap["segments"]
    assert len(segs) == 3
    by_addr = {s["address"]: s for s in segs}
    assert by_addr[live]["allocated_size"] == 1024 and by_addr[live]["requested_size"] == 1000
    assert by_addr[gone]["blocks"][0]["state"] == "inactive" and by_addr[gone]["allocated_size"] == 0
    assert all(isinstance(s["segment_pool_id"], tuple) for s in segs)
    actions = [e["action"] for e in snap["device_traces"][0]]
    assert actions[:2] == ["segment_alloc", "alloc"]
    assert "free_completed" in actions and actions[-1] == "oom"
    assert snap["allocator_settings"]["bufferheap"]["policy"] == "default"
    assert snap["allocator_settings"]["bufferheap"]["high_watermark_ratio"] == 1.5
    # one device only
    assert bufferheap.snapshot(device=0)["segments"] == segs
    with pytest.raises(bufferheap.BufferheapError, match="invalid device"):
        bufferheap.snapshot(device=99)


def test_torch_hook_addresses(fake_lib):
    from bufferheap import _ffi

    for symbol in ["bufferheap_malloc", "bufferheap_free", *_ffi.TORCH_HOOKS.values()]:
        addr = fake_lib.address(symbol)
        assert addr == ctypes.cast(getattr(fake_lib.cdll, symbol), ctypes.c_void_p).value
    # the hooks are callable through their raw addresses, as PyTorch calls them
    init = ctypes.CFUNCTYPE(None, ctypes.c_int)(fake_lib.address("bufferheap_init"))
    init(1)
    reset = ctypes.CFUNCTYPE(None)(fake_lib.address("bufferheap_reset"))
    reset()
    frac = ctypes.CFUNCTYPE(None, ctypes.c_double, ctypes.c_int)(fake_lib.address("bufferheap_set_memory_fraction"))
    frac(0.5, 0)
    p = _malloc(fake_lib, 4096)
    size = ctypes.c_size_t(0)
    base = fake_lib.fn("bufferheap_base_alloc")(p + 100, ctypes.byref(size))
    assert base == p and size.value == 4096
    stats = bufferheap.memory_stats()
    assert stats["fake.init_calls"] == 1 and stats["fake.reset_calls"] == 1 and stats["fake.memory_fraction"] == 0.5
