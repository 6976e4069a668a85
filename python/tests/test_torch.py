"""PyTorch integration; needs torch with a CUDA device and the real library (else skipped).

Each case runs in its own process: an allocator can be installed once per process.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import PYTHON_DIR

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)


def _run(code: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", autouse=True)
def _library_present():
    import bufferheap

    try:
        bufferheap.library_path()
    except bufferheap.LibraryNotFoundError as e:
        pytest.skip(str(e))


def test_install_allocate_and_stats():
    r = _run(
        """
        import json, torch, bufferheap
        info = bufferheap.torch.install()
        assert bufferheap.torch.install() == info          # same settings: no-op
        try:
            bufferheap.torch.install(policy="mps")
            raise SystemExit("a different configuration was accepted")
        except RuntimeError as e:
            other = str(e)
        x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
        s = float(x.sum())
        stats = bufferheap.memory_stats()
        print(json.dumps(dict(info=info, other=other, sum=s, allocated=bufferheap.memory_allocated(),
                              keys=sorted(stats))))
        """
    )
    assert r["sum"] == float(sum(range(1 << 20)))
    assert r["allocated"] >= 4 << 20
    assert "set_init_fn" in r["info"]["hooks"]
    assert "already PyTorch's allocator" in r["other"]
    for key in ("allocated_bytes.all.current", "reserved_bytes.all.peak", "num_alloc_retries", "num_ooms"):
        assert key in r["keys"]


def test_a_failed_malloc_through_ctypes_in_a_torch_process_returns_null():
    # Only PyTorch's own calls (after its init hook) get PyTorch's exception; a C++ exception
    # thrown into ctypes would abort the process.
    r = _run(
        """
        import ctypes, json, torch, bufferheap
        lib = bufferheap.lib()
        p = lib.fn("bufferheap_malloc")(-7, 0, None)
        print(json.dumps(dict(ptr=p, error=lib.last_error())))
        """
    )
    assert r["ptr"] is None
    assert "negative size -7" in r["error"]


def test_install_after_cuda_started_is_refused():
    r = _run(
        """
        import json, torch, bufferheap
        torch.zeros(1, device="cuda")
        try:
            bufferheap.torch.install()
            msg = None
        except RuntimeError as e:
            msg = str(e)
        print(json.dumps(dict(msg=msg)))
        """
    )
    assert r["msg"] and "before any CUDA tensor is created" in r["msg"]


def test_direct_front_allocates_frees_and_raises_out_of_memory():
    r = _run(
        """
        import json, torch, bufferheap
        info = bufferheap.torch.install(direct=True)
        x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
        s = float(x.sum())
        allocated = bufferheap.memory_allocated()
        theirs = torch.cuda.memory_allocated(), torch.cuda.memory_stats()["allocation.all.current"]
        del x
        seen = []  # what an out-of-memory observer is told: device, request, total, free
        torch._C._cuda_attach_out_of_memory_observer(lambda *args: seen.append(list(args)))
        free, total = torch.cuda.mem_get_info()
        try:
            torch.empty(2 * free, dtype=torch.uint8, device="cuda")
            raised = None
        except torch.OutOfMemoryError as e:
            raised = str(e)
        y = torch.ones(1 << 20, device="cuda")  # the process goes on working
        after = bufferheap.memory_allocated()
        torch.backends.cudnn.benchmark = True  # asks the allocator for its largest block
        conv = torch.nn.Conv2d(8, 8, 3).cuda()
        conv(torch.randn(4, 8, 32, 32, device="cuda")).sum().backward()
        print(json.dumps(dict(info=info, sum=s, allocated=allocated, theirs=theirs, after=after,
                              raised=raised, ones=float(y.sum()), conv_grad=float(conv.weight.grad.abs().sum()),
                              seen=seen, free=free, total=total)))
        """
    )
    assert r["info"]["settings"]["front"] == "direct"
    assert "set_init_fn" in r["info"]["hooks"] and "set_record_stream_fn" in r["info"]["hooks"]
    assert r["sum"] == float(sum(range(1 << 20)))
    assert r["allocated"] >= 4 << 20
    assert r["theirs"] == [r["allocated"], 1]  # PyTorch's own statistics are bufferheap's
    assert r["after"] == 4 << 20  # only y is live
    assert r["raised"] and "out of memory" in r["raised"]
    assert r["ones"] == float(1 << 20)
    assert r["conv_grad"] > 0  # cuDNN's benchmark mode ran
    assert r["seen"], "the out-of-memory observer was called"
    device, request, total, free = r["seen"][0]  # (cuDNN's benchmark may add its own later)
    assert (device, request, total) == (0, 2 * r["free"], r["total"])
    assert 0 < free <= total


def test_direct_front_answers_pytorchs_memory_snapshot_and_history(tmp_path):
    dump = tmp_path / "dump.pickle"
    r = _run(
        f"""
        import json, pickle, torch, bufferheap
        bufferheap.torch.install(direct=True)
        before = torch.empty(1 << 20, device="cuda")
        torch.cuda.memory._record_memory_history(max_entries=1000, stacks="python")
        on = torch._C._cuda_isHistoryEnabled() if hasattr(torch._C, "_cuda_isHistoryEnabled") else None
        def make_x():
            return torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
        def drop(t):
            del t[:]
        x = make_x()
        y = torch.empty(1000, dtype=torch.uint8, device="cuda")
        gone = [torch.empty(5 << 20, dtype=torch.uint8, device="cuda")]
        gone_ptr = gone[0].data_ptr()
        drop(gone)
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._dump_snapshot({str(dump)!r})
        blocks, frames = {{}}, {{}}
        for seg in snap["segments"]:
            assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"], seg
            for b in seg["blocks"]:
                blocks[b["address"]] = (b["state"], b["requested_size"], seg["segment_type"])
                frames[b["address"]] = [f["name"] for f in b.get("frames", [])]
        trace = snap["device_traces"][0]
        stacks = {{(e["action"], e["addr"]): [f["name"] for f in e.get("frames", [])] for e in trace}}
        actions = [(e["action"], e["addr"]) for e in trace if not e["action"].startswith("segment")]
        segs_only = torch.cuda.memory_snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        after = torch.cuda.memory._snapshot()
        print(json.dumps(dict(
            x=blocks.get(x.data_ptr()), y=blocks.get(y.data_ptr()), gone=blocks.get(gone_ptr),
            before=before.data_ptr(), x_ptr=x.data_ptr(), y_ptr=y.data_ptr(), gone_ptr=gone_ptr,
            actions=actions, on=on, times=all(e["time_us"] > 0 for e in trace),
            x_frames=frames.get(x.data_ptr()), x_alloc=stacks.get(("alloc", x.data_ptr())),
            gone_free=stacks.get(("free_requested", gone_ptr)), gone_done=stacks.get(("free_completed", gone_ptr)),
            before_frames=frames.get(before.data_ptr()),
            segments=len(snap["segments"]), segs_only=len(segs_only),
            traces_after=[len(t) for t in after["device_traces"]],
            dumped=len(pickle.load(open({str(dump)!r}, "rb"))["segments"]))))
        """
    )
    assert r["x"] == ["active_allocated", 3 << 20, "large"]
    assert r["y"][0] == "active_allocated" and r["y"][1] == 1000
    assert r["gone"][0] == "inactive"
    assert r["actions"][:2] == [["alloc", r["x_ptr"]], ["alloc", r["y_ptr"]]]
    assert r["actions"][2:] == [["alloc", r["gone_ptr"]], ["free_requested", r["gone_ptr"]], ["free_completed", r["gone_ptr"]]]
    assert r["before"] not in [a for _, a in r["actions"]], "recording began after it"
    assert r["on"] in (True, None)
    assert r["times"]
    assert r["segments"] == r["segs_only"] == r["dumped"] > 0
    assert set(r["traces_after"]) == {0}
    # PyTorch's recorder gathered the Python stacks: the block and its allocation name the
    # function that made it, the free the function that dropped it.
    assert "make_x" in r["x_frames"] and "make_x" in r["x_alloc"], (r["x_frames"], r["x_alloc"])
    assert "drop" in r["gone_free"] and "drop" in r["gone_done"], (r["gone_free"], r["gone_done"])
    assert r["before_frames"] == [], "made before recording began"


def test_direct_front_stacks_follow_a_change_of_what_is_recorded():
    # Stacks on trace entries (context="all"), then on blocks only (context="state") without
    # clearing: the later entries get no stacks, not older ones' stacks.
    r = _run(
        """
        import json, torch, bufferheap
        bufferheap.torch.install(direct=True)
        torch.cuda.memory._record_memory_history(max_entries=1000, context="all", stacks="python")
        def first():
            return torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
        t = first()
        ptr = t.data_ptr()
        del t
        torch.cuda.memory._record_memory_history(max_entries=1000, context="state", stacks="python")
        def second():
            return torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
        u = second()
        snap = torch.cuda.memory._snapshot()
        entries = [(e["action"], [f["name"] for f in e.get("frames", [])])
                   for e in snap["device_traces"][0] if e["addr"] == u.data_ptr()]
        block = [[f["name"] for f in b.get("frames", [])]
                 for s in snap["segments"] for b in s["blocks"] if b["address"] == u.data_ptr()]
        print(json.dumps(dict(same=u.data_ptr() == ptr, entries=entries, block=block)))
        """
    )
    allocs = [frames for action, frames in r["entries"] if action == "alloc"]
    assert allocs, r
    assert all("first" not in frames for frames in allocs[1:]), r
    if r["same"]:
        assert "first" not in allocs[-1], r
    assert r["block"] and "second" in r["block"][0] and "first" not in r["block"][0], r


def test_direct_front_forgets_blocks_stacks_while_no_stacks_are_recorded():
    # Blocks' stacks are kept while PyTorch records them; with context=None nothing is kept,
    # so a block made then (at an address an earlier block had) shows no old stack later.
    r = _run(
        """
        import json, torch, bufferheap
        bufferheap.torch.install(direct=True)
        torch.cuda.memory._record_memory_history(max_entries=1000, context="all", stacks="python")
        def first():
            return torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
        t = first()
        ptr = t.data_ptr()
        torch.cuda.memory._record_memory_history(max_entries=1000, context=None, stacks="python")
        del t
        u = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
        torch.cuda.memory._record_memory_history(max_entries=1000, context="state", stacks="python")
        snap = torch.cuda.memory._snapshot()
        block = [[f["name"] for f in b.get("frames", [])]
                 for s in snap["segments"] for b in s["blocks"] if b["address"] == u.data_ptr()]
        print(json.dumps(dict(same=u.data_ptr() == ptr, block=block)))
        """
    )
    assert r["block"], r
    assert "first" not in r["block"][0], r


def test_direct_front_stacks_stay_with_their_allocations_under_threads():
    # Two threads allocate and free while snapshots are taken: every recorded allocation must
    # carry the stack of the thread that made it (the front files stacks and reads snapshots
    # under one lock).
    r = _run(
        """
        import json, threading, time, torch, bufferheap
        bufferheap.torch.install(direct=True)
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
        stop = False
        def churn_small():
            while not stop:
                t = torch.empty(3 << 20, dtype=torch.uint8, device="cuda"); del t
        def churn_large():
            while not stop:
                t = torch.empty(5 << 20, dtype=torch.uint8, device="cuda"); del t
        threads = [threading.Thread(target=f) for f in (churn_small, churn_large)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        checked = wrong = 0
        for _ in range(10):
            for e in torch.cuda.memory._snapshot()["device_traces"][0]:
                want = {3 << 20: "churn_small", 5 << 20: "churn_large"}.get(e["size"])
                if e["action"] == "alloc" and want:
                    checked += 1
                    wrong += want not in [f["name"] for f in e["frames"]]
            time.sleep(0.01)
        stop = True
        for t in threads:
            t.join()
        print(json.dumps(dict(checked=checked, wrong=wrong)))
        """
    )
    assert r["checked"] > 1000, r
    assert r["wrong"] == 0, r


def test_direct_front_installs_where_no_gpu_architecture_is_named():
    # Building the front must not start CUDA (PyTorch asks the device for its architecture
    # when none is named), or PyTorch's own allocator is in place before bufferheap's.
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env["PYTHONPATH"] = os.pathsep.join([str(PYTHON_DIR), os.environ.get("PYTHONPATH", "")])
    code = "import json, torch, bufferheap; info = bufferheap.torch.install(direct=True); print(json.dumps(info['settings']))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["front"] == "direct"


def test_direct_front_refuses_cuda_graph_capture_and_keeps_the_memory_fraction():
    r = _run(
        """
        import json, torch, bufferheap
        bufferheap.torch.install(direct=True)
        default_fraction = torch.cuda.get_per_process_memory_fraction()
        torch.cuda.set_per_process_memory_fraction(0.5)
        fraction = torch.cuda.get_per_process_memory_fraction()
        x = torch.ones(1 << 20, device="cuda")
        side = torch.cuda.Stream()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, stream=side):
                y = x * 2
            refused = None
        except RuntimeError as e:
            refused = str(e)
        z = torch.zeros(1 << 20, device="cuda")   # the process goes on working
        print(json.dumps(dict(default_fraction=default_fraction, fraction=fraction, refused=refused,
                              zeros=float(z.sum()))))
        """
    )
    assert r["default_fraction"] == 1.0 and r["fraction"] == 0.5
    assert r["refused"] and "does not support CUDA graph capture" in r["refused"]
    assert r["zeros"] == 0.0


def test_direct_front_empty_tensors_do_not_push_stacks_out_of_the_history():
    r = _run(
        """
        import json, torch, bufferheap
        bufferheap.torch.install(direct=True)
        torch.cuda.memory._record_memory_history(max_entries=100)
        def make_a():
            return torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
        a = make_a()
        empties = [torch.empty(0, device="cuda") for _ in range(200)]
        snap = torch.cuda.memory._snapshot()
        allocs = [e for e in snap["device_traces"][0] if e["action"] == "alloc" and e["addr"] == a.data_ptr()]
        names = [f["name"] for e in allocs for f in e["frames"]]
        print(json.dumps(dict(allocs=len(allocs), named=names.count("make_a"))))
        """
    )
    assert r["allocs"] == 1
    assert r["named"] >= 1, "the allocation's stack names the function that made it"
