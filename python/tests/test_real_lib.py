"""The module-level API against the real libbufferheap_ffi (host backend, no torch, no GPU).

Runs when BUFFERHEAP_LIB names a build of the library:

    cargo build -p bufferheap-ffi
    BUFFERHEAP_LIB=target/debug/libbufferheap_ffi.so BUFFERHEAP_BACKEND=host python3 -m pytest python/tests

Each test gets its own copy of the library (see conftest.real_lib), so its state is fresh.
"""

import ctypes
import os
import subprocess
import sys
import threading

import pytest

import bufferheap
from bufferheap import _ffi, _snapshot
from conftest import PYTHON_DIR

ALIGN = 512


def _malloc(lib, size, device=0, stream=None):
    return lib.fn("bufferheap_malloc")(size, device, stream)


def _free(lib, ptr, device=0):
    lib.fn("bufferheap_free")(ptr, 0, device, None)


def _rounded(n):
    return -(-n // ALIGN) * ALIGN


def _host_only():
    if os.environ.get("BUFFERHEAP_BACKEND", "host") != "host":
        pytest.skip("writes through the pointers: host backend only")


def test_stats_follow_allocations(real_lib):
    assert not bufferheap.initialized()
    assert bufferheap.memory_allocated() == 0
    assert not bufferheap.initialized(), "looking at the figures does not start the allocator"
    p = _malloc(real_lib, 3000)
    q = _malloc(real_lib, 3 << 20)
    assert p and q, real_lib.last_error()
    assert bufferheap.initialized()
    stats = bufferheap.memory_stats()
    assert stats["allocated_bytes.all.current"] == _rounded(3000) + (3 << 20)
    assert stats["requested_bytes.all.current"] == 3000 + (3 << 20)
    assert stats["policy"] == "default" and stats["device"] == 0
    _free(real_lib, q)
    assert bufferheap.memory_allocated() == _rounded(3000)
    assert bufferheap.max_memory_allocated("cuda:0") == _rounded(3000) + (3 << 20)
    reserved = bufferheap.memory_reserved()
    assert reserved >= bufferheap.memory_allocated()
    bufferheap.empty_cache()
    assert bufferheap.memory_reserved() < reserved
    bufferheap.reset_peak_memory_stats()
    assert bufferheap.max_memory_allocated() == _rounded(3000)
    assert bufferheap.memory_stats()["allocation.all.allocated"] >= 2
    bufferheap.reset_accumulated_memory_stats()
    stats = bufferheap.memory_stats()
    assert stats["allocation.all.allocated"] == 0 and stats["allocation.all.current"] == 1
    _free(real_lib, p)


def test_memory_is_usable(real_lib):
    _host_only()
    n = 1 << 20
    p = _malloc(real_lib, n)
    ctypes.memset(p, 0x5A, n)
    assert ctypes.string_at(p + n - 4, 4) == b"\x5a" * 4
    size = ctypes.c_size_t(0)
    base = real_lib.fn("bufferheap_base_alloc")(p + 100, ctypes.byref(size))
    assert base and base <= p and p + n <= base + size.value
    _free(real_lib, p)


def test_failures_return_null_with_a_reason(real_lib):
    assert _malloc(real_lib, 0) is None
    assert _malloc(real_lib, -7) is None
    assert "negative size -7" in real_lib.last_error()
    assert _malloc(real_lib, 512, device=5) is None
    assert "invalid device 5" in real_lib.last_error() and "2 host devices" in real_lib.last_error()
    bufferheap.set_watermarks(0.0, 1e-9)
    assert _malloc(real_lib, 64 << 20) is None
    msg = real_lib.last_error()
    assert "out of memory" in msg and "Tried to allocate 64.00 MiB" in msg
    assert bufferheap.memory_stats()["num_ooms"] == 1


def test_bad_frees_do_not_crash(real_lib, capfd):
    p = _malloc(real_lib, 4096)
    _free(real_lib, p)
    _free(real_lib, p)
    assert "freed twice" in real_lib.last_error()
    _free(real_lib, 0x1234)
    assert "not allocated by bufferheap" in real_lib.last_error()
    _free(real_lib, None)
    err = capfd.readouterr().err
    assert hex(p) in err and "0x1234" in err


def test_free_with_the_wrong_device_finds_the_owner(real_lib):
    p = _malloc(real_lib, 4096, device=1)
    assert bufferheap.memory_allocated(1) == 4096
    _free(real_lib, p, device=0)
    assert bufferheap.memory_allocated(1) == 0


def test_errors_carry_the_library_message(real_lib):
    with pytest.raises(bufferheap.BufferheapError, match="invalid device 99"):
        bufferheap.memory_stats(99)
    with pytest.raises(bufferheap.BufferheapError, match=r"bufferheap_set_watermarks\(42, 0.5, 1.0\) failed: .*invalid device 42"):
        bufferheap.set_watermarks(0.5, 1.0, device=42)
    with pytest.raises(bufferheap.BufferheapError, match="invalid device 77"):
        bufferheap.empty_cache(device=77)
    with pytest.raises(ValueError, match="not a device index"):
        bufferheap.reset_peak_memory_stats(device=-5)
    with pytest.raises(ValueError, match="between 0 .disables the limit. and 2.0"):
        bufferheap.set_watermarks(1.0, 2.5)


def test_set_watermarks(real_lib):
    bufferheap.set_watermarks(0.5, 1.0)
    stats = bufferheap.memory_stats()
    assert 0 < stats["low_watermark_limit"] < stats["high_watermark_limit"]
    bufferheap.set_watermarks(0, 0)
    stats = bufferheap.memory_stats()
    assert stats["low_watermark_limit"] is None and stats["high_watermark_limit"] is None


def test_configure_once(real_lib):
    sent = bufferheap.configure("mps", low_watermark_ratio=1.0, high_watermark_ratio=1.7, debug=0)
    assert sent["policy"] == "mps"
    p = _malloc(real_lib, 512)
    assert bufferheap.memory_stats()["policy"] == "mps"
    _free(real_lib, p)


def test_configure_after_first_allocation_reports_the_library_error(real_lib):
    _malloc(real_lib, 512)
    with pytest.raises(bufferheap.BufferheapError, match="must come before the first allocation"):
        bufferheap.configure("mps")
    assert bufferheap._applied is None
    assert bufferheap.memory_stats()["policy"] == "default"


def test_last_error_is_per_thread(real_lib):
    with pytest.raises(bufferheap.BufferheapError):
        bufferheap.memory_stats(99)
    seen = []
    t = threading.Thread(target=lambda: seen.append(real_lib.last_error()))
    t.start()
    t.join()
    assert seen == [""]
    assert "invalid device 99" in real_lib.last_error()


def test_snapshot(real_lib, tmp_path):
    bufferheap.configure("default", high_watermark_ratio=1.5)
    live = _malloc(real_lib, 1000)
    big = _malloc(real_lib, 3 << 20)
    gone = _malloc(real_lib, 5000)
    _free(real_lib, gone)
    path = tmp_path / "snap.pkl.gz"
    snap = bufferheap.snapshot(str(path))
    assert _snapshot.read(path) == snap
    blocks = {b["address"]: b for s in snap["segments"] for b in s["blocks"]}
    assert blocks[live]["state"] == "active_allocated" and blocks[live]["requested_size"] == 1000
    assert blocks[big]["size"] == 3 << 20
    for seg in snap["segments"]:
        assert seg["device"] == 0 and seg["segment_pool_id"] == (0, 0)
        assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"]
        assert seg["allocated_size"] == sum(b["size"] for b in seg["blocks"] if b["state"] == "active_allocated")
    assert snap["device_traces"] == [[], []], "one (empty) trace per device"
    # Segments are what is reserved: a page-mapped range shows its mapped runs only.
    assert sum(seg["total_size"] for seg in snap["segments"]) == bufferheap.memory_reserved()
    settings = snap["allocator_settings"]["bufferheap"]
    assert settings["policy"] == "default" and settings["high_watermark_ratio"] == 1.5
    assert settings["memory_backend"] == os.environ.get("BUFFERHEAP_BACKEND", "host")
    assert bufferheap.snapshot(device=0)["segments"] == snap["segments"]
    assert bufferheap.snapshot(device=1)["segments"] == []
    with pytest.raises(bufferheap.BufferheapError, match="invalid device"):
        bufferheap.snapshot(device=99)


def test_a_snapshot_of_every_device_holds_each_devices_segments(real_lib):
    # Without torch there is no device count to ask: the library's own view decides.
    on_1 = _malloc(real_lib, 1 << 20, device=1)
    on_0 = _malloc(real_lib, 1000)
    snap = bufferheap.snapshot()
    where = {b["address"]: s["device"] for s in snap["segments"] for b in s["blocks"]}
    assert where[on_0] == 0 and where[on_1] == 1
    assert len(snap["device_traces"]) == 2
    assert [s for s in snap["segments"] if s["device"] == 1] == bufferheap.snapshot(device=1)["segments"]
    # -1 names every device, as it does for the resets.
    bufferheap.record_memory_history(max_entries=100)
    _malloc(real_lib, 4096, device=1)
    every = bufferheap.snapshot(device=-1)
    assert every["segments"] == bufferheap.snapshot()["segments"]
    assert every["device_traces"] == bufferheap.snapshot()["device_traces"]
    assert len(every["device_traces"]) == 2 and every["device_traces"][1]


def test_record_memory_history_fills_the_snapshots_traces(real_lib):
    before = _malloc(real_lib, 2 << 20)
    bufferheap.record_memory_history(max_entries=1000)
    assert real_lib.history_limit() == 1000
    live = _malloc(real_lib, 3 << 20)
    gone = _malloc(real_lib, 5000)
    _free(real_lib, gone)
    trace = bufferheap.snapshot(device=0)["device_traces"][0]
    buffer_actions = [(e["action"], e["addr"]) for e in trace if not e["action"].startswith("segment")]
    assert buffer_actions == [("alloc", live), ("alloc", gone), ("free_requested", gone), ("free_completed", gone)]
    assert before not in [e.get("addr") for e in trace], "nothing from before recording began"
    # Going on keeps the entries, a smaller limit keeps the newest, stopping drops them.
    bufferheap.record_memory_history(max_entries=2)
    kept = bufferheap.snapshot(device=0)["device_traces"][0]
    assert [e["action"] for e in kept] == ["free_requested", "free_completed"]
    bufferheap.record_memory_history(enabled=False)
    assert real_lib.history_limit() == 0
    assert bufferheap.snapshot(device=0)["device_traces"] == [[]]
    bufferheap.record_memory_history(clear_history=True)
    assert real_lib.history_limit() == sys.maxsize
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_entries"):
            bufferheap.record_memory_history(max_entries=bad)
    with pytest.raises(TypeError, match="enabled"):
        bufferheap.record_memory_history(enabled="all")
    _free(real_lib, live)
    _free(real_lib, before)


def test_torch_hooks_through_raw_addresses(real_lib):
    init = ctypes.CFUNCTYPE(None, ctypes.c_int)(real_lib.address("bufferheap_init"))
    init(2)
    assert bufferheap.initialized()
    p = _malloc(real_lib, 4096)
    frac = ctypes.CFUNCTYPE(None, ctypes.c_double, ctypes.c_int)(real_lib.address("bufferheap_set_memory_fraction"))
    frac(0.25, 0)
    stats = bufferheap.memory_stats()
    assert stats["high_watermark_limit"] is not None
    record = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(real_lib.address("bufferheap_record_stream"))
    record(p, 7)
    _free(real_lib, p)
    reset = ctypes.CFUNCTYPE(None)(real_lib.address("bufferheap_reset"))
    reset()
    assert bufferheap.memory_reserved() == 0


def _run_isolated(code, **env):
    """Runs code in a fresh interpreter with the real library and extra environment."""
    full = dict(os.environ, PYTHONPATH=str(PYTHON_DIR), **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_bad_environment_is_reported_at_the_first_call(real_lib):
    code = (
        "import bufferheap\n"
        "from bufferheap import _ffi\n"
        "lib = _ffi.lib()\n"
        "print(lib.fn('bufferheap_malloc')(512, 0, None))\n"
        "print(lib.last_error())\n"
    )
    out = _run_isolated(code, BUFFERHEAP_POLICY="fastest")
    assert out.returncode == 0, out.stderr
    none, error = out.stdout.splitlines()
    assert none == "None"
    assert "BUFFERHEAP_POLICY" in error and "fastest" in error
    assert "BUFFERHEAP_POLICY" in out.stderr and "returning NULL" in out.stderr


def test_no_cuda_driver_says_how_to_use_host_memory(real_lib):
    probe = _run_isolated("import ctypes; ctypes.CDLL('libcuda.so.1')")
    if probe.returncode == 0:
        pytest.skip("a CUDA driver is installed here")
    code = "import bufferheap\ntry:\n    bufferheap.memory_stats(0)\nexcept bufferheap.BufferheapError as e:\n    print(e)\n"
    out = _run_isolated(code, BUFFERHEAP_BACKEND="auto")
    assert out.returncode == 0, out.stderr
    assert "no CUDA driver found" in out.stdout and "BUFFERHEAP_BACKEND=host" in out.stdout


def test_debug_output_names_the_owner_of_a_pointer_freed_with_another_device(real_lib, capfd):
    bufferheap.configure("default", debug=1)
    p = _malloc(real_lib, 4096, device=1)
    _free(real_lib, p, device=0)
    err = capfd.readouterr().err
    assert f"free of {hex(p)} named device 0, but the pointer belongs to device 1; freed there" in err
    assert "bufferheap: Initializing heap allocator" in err


def test_configure_is_checked_whole_before_anything_is_applied(real_lib):
    # A low ratio above the default high would stop the allocator at its first allocation;
    # it is refused at once, and nothing of the call is applied.
    with pytest.raises(ValueError, match="must not exceed"):
        bufferheap.configure(low_watermark_ratio=1.8)
    with pytest.raises(ValueError, match="32 flag bits"):
        bufferheap.configure(policy="mps", high_watermark_ratio=1.0, debug=1 << 40)
    assert bufferheap.configure() == {"policy": "default"}
    p = _malloc(real_lib, 4096)
    assert p, real_lib.last_error()
    assert bufferheap.memory_stats()["high_watermark_limit"] is not None
    _free(real_lib, p)


def test_library_path_names_the_library_in_use(real_lib, monkeypatch):
    loaded = bufferheap.library_path()
    monkeypatch.setenv("BUFFERHEAP_LIB", "/nonexistent/other.so")
    assert bufferheap.library_path() == loaded


def test_configure_from_two_threads_applies_one_setting(real_lib):
    results = []
    start = threading.Barrier(2)

    def configure(policy):
        start.wait()
        try:
            results.append(("ok", bufferheap.configure(policy=policy)["policy"]))
        except bufferheap.BufferheapError:
            results.append(("refused", policy))

    threads = [threading.Thread(target=configure, args=(p,)) for p in ("default", "mps")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(kind for kind, _ in results) == ["ok", "refused"], results
    applied = [p for kind, p in results if kind == "ok"][0]
    assert bufferheap.memory_stats()["policy"] == applied


def test_try_malloc_reports_a_bad_environment_without_writing_to_stderr(lib_with_env, capfd):
    # bufferheap.h: bufferheap_try_malloc "never throws, never writes to stderr" (its caller,
    # the direct front, raises the reason); bufferheap_malloc writes it once.
    lib = lib_with_env(BUFFERHEAP_POLICY="bogus")
    out = ctypes.c_void_p()
    capfd.readouterr()
    assert lib.fn("bufferheap_try_malloc")(4096, 0, None, ctypes.byref(out)) == -1
    assert "BUFFERHEAP_POLICY" in lib.last_error()
    assert capfd.readouterr().err == ""
    assert lib.fn("bufferheap_malloc")(4096, 0, None) is None
    assert "BUFFERHEAP_POLICY" in capfd.readouterr().err


def test_a_configure_the_library_refuses_applies_nothing(lib_with_env):
    # Python's own checks pass; the library refuses the low ratio against the environment's
    # high one. Nothing of the call may stay applied (policy included).
    lib_with_env(BUFFERHEAP_HIGH_WATERMARK_RATIO="0.5")
    with pytest.raises(bufferheap.BufferheapError, match="must not exceed"):
        bufferheap.configure(policy="mps", low_watermark_ratio=1.0)
    assert bufferheap.memory_stats(0)["policy"] == "default"


def test_configure_all_refuses_lines_that_are_not_settings(real_lib):
    configure_all = real_lib.fn("bufferheap_configure_all")
    assert configure_all(b"policy=mps\nhistory") == -1
    assert "line 2" in real_lib.last_error()
    assert configure_all(b"policy=mps\nno_such_key=1") == -1
    assert bufferheap.memory_stats(0)["policy"] == "default"
    assert configure_all(b"policy=mps\n\nhistory=10\n") == 0
    assert bufferheap.memory_stats(0)["policy"] == "mps"


def test_a_snapshot_taken_while_another_thread_allocates_is_consistent(real_lib):
    # As PyTorch's _snapshot(): segments and traces are read together, so the last event of
    # every address agrees with the state of the block there.
    import random

    malloc, free = real_lib.fn("bufferheap_malloc"), real_lib.fn("bufferheap_free")
    bufferheap.record_memory_history(max_entries=5000)
    stop = threading.Event()

    def churn():
        r, mine = random.Random(1), []
        while not stop.is_set():
            if len(mine) > 64 or (mine and r.random() < 0.5):
                free(mine.pop(r.randrange(len(mine))), 0, 0, None)
            else:
                mine.append(malloc(r.choice([4096, 100000, 3 << 20]), 0, None))
        for p in mine:
            free(p, 0, 0, None)

    worker = threading.Thread(target=churn)
    worker.start()
    disagreements = []
    try:
        for _ in range(60):
            snap = bufferheap.snapshot(device=0)
            last = {}
            for e in snap["device_traces"][0]:
                if e["action"] in ("alloc", "free_completed"):
                    last[e["addr"]] = e["action"]
            allocated = {b["address"] for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated"}
            disagreements = [(hex(a), action) for a, action in last.items() if (action == "alloc") != (a in allocated)]
            if disagreements:
                break
    finally:
        stop.set()
        worker.join()
    assert disagreements == []
