"""Building PyTorch's snapshot dict from bufferheap_snapshot_json answers (pure Python)."""

import gzip
import json
import pickle

from bufferheap import _snapshot

MiB = 1 << 20

ANSWER = {
    "segments": [
        {
            "address": 0x7F0000400000,
            "total_size": 4 * MiB,
            "stream": 0,
            "segment_type": "large",
            "segment_pool_id": [0, 0],
            "is_expandable": True,
            "blocks": [
                {"address": 0x7F0000400000, "size": 2 * MiB, "requested_size": 2 * MiB - 100, "state": "active_allocated"},
                {"address": 0x7F0000600000, "size": MiB, "requested_size": MiB, "state": "active_pending_free"},
                {"address": 0x7F0000700000, "size": MiB, "state": "inactive"},
            ],
        },
        {
            "device": 0,
            "address": 0x7F0000000000,
            "total_size": 2 * MiB,
            "allocated_size": 512,
            "active_size": 512,
            "requested_size": 500,
            "stream": 7,
            "segment_type": "small",
            "segment_pool_id": [1, 2],
            "is_expandable": False,
            "frames": [],
            "blocks": [{"address": 0x7F0000000000, "size": 512, "requested_size": 500, "state": "active_allocated", "frames": []}],
        },
    ],
    "device_traces": [
        [
            {"action": "segment_map", "addr": 0x7F0000400000, "size": 4 * MiB, "stream": 0, "time_us": 10},
            {"action": "alloc", "addr": 0x7F0000400000, "size": 2 * MiB, "stream": 0, "time_us": 11},
            {"action": "oom", "addr": 123456, "size": 1 << 50, "stream": 0, "time_us": 12},
        ]
    ],
}


def test_segments_are_completed_and_sorted():
    snap = _snapshot.build([(0, ANSWER)], {"policy": "default"})
    assert set(snap) == {"segments", "device_traces", "allocator_settings", "external_annotations"}
    first, second = snap["segments"]
    assert first["address"] < second["address"]
    # given values are kept
    assert first["stream"] == 7 and first["segment_pool_id"] == (1, 2) and first["requested_size"] == 500
    # missing ones are derived from the blocks
    assert second["device"] == 0
    assert second["segment_pool_id"] == (0, 0) and isinstance(second["segment_pool_id"], tuple)
    assert second["allocated_size"] == 2 * MiB
    assert second["active_size"] == 3 * MiB
    assert second["requested_size"] == 2 * MiB - 100
    assert second["frames"] == []
    inactive = second["blocks"][2]
    assert inactive["requested_size"] == MiB and inactive["frames"] == []
    assert sum(b["size"] for b in second["blocks"]) == second["total_size"]


def test_trace_entries_get_pytorch_keys():
    snap = _snapshot.build([(0, ANSWER)])
    (trace,) = snap["device_traces"]
    assert [e["action"] for e in trace] == ["segment_map", "alloc", "oom"]
    for e in trace:
        assert e["compile_context"] == "N/A" and e["user_metadata"] == ""
        assert {"size", "stream", "time_us"} <= set(e)
    oom = trace[2]
    assert oom["device_free"] == 123456 and "addr" not in oom
    assert trace[1]["addr"] == 0x7F0000400000


def test_allocator_settings_carry_native_keys_and_ours():
    settings = _snapshot.build([(0, {"segments": [], "device_traces": [[]], "allocator_settings": {"heap": "vmm"}})], {"policy": "mps"})["allocator_settings"]
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "max_split_size", "expandable_segments", "roundup_power2_divisions"):
        assert key in settings
    assert settings["bufferheap"] == {"policy": "mps", "heap": "vmm"}
    # the shared default is not modified by a build
    assert "bufferheap" not in _snapshot._NATIVE_SETTINGS


def test_device_traces_are_indexed_by_device():
    one = {"segments": [{"address": 1 << 30, "total_size": 512, "blocks": [{"address": 1 << 30, "size": 512, "state": "inactive"}]}],
           "device_traces": [[{"action": "segment_alloc", "addr": 1 << 30, "size": 512, "stream": 0, "time_us": 1}]]}
    snap = _snapshot.build([(2, one)])
    assert len(snap["device_traces"]) == 3
    assert snap["device_traces"][0] == [] and snap["device_traces"][1] == []
    assert snap["device_traces"][2][0]["action"] == "segment_alloc"
    assert snap["segments"][0]["device"] == 2
    # an answer holding one list per device index
    per_index = {"segments": [], "device_traces": [[], [{"action": "alloc", "addr": 5, "size": 512}]]}
    snap = _snapshot.build([(1, per_index)])
    assert snap["device_traces"][1][0]["addr"] == 5


def test_empty_answer():
    snap = _snapshot.build_from_json([(0, json.dumps({"segments": [], "device_traces": []}))])
    assert snap["segments"] == [] and snap["device_traces"] == [[]]
    assert _snapshot.build([])["device_traces"] == [[]]


def test_write_and_read_back(tmp_path):
    snap = _snapshot.build([(0, ANSWER)])
    for name in ("snap.pickle", "snap.pkl.gz"):
        path = tmp_path / name
        _snapshot.write(snap, path)
        raw = path.read_bytes()
        if name.endswith(".gz"):
            assert raw[:2] == b"\x1f\x8b"
            raw = gzip.decompress(raw)
        assert raw[:2] == b"\x80\x04"  # pickle protocol 4, as PyTorch's snapshots
        assert pickle.loads(raw) == snap
        assert _snapshot.read(path) == snap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.pickle", "snap.pkl.gz"]


def test_reference_trace_shape_matches(tmp_path):
    """Our dict has the same key sets as a snapshot PyTorch wrote, where the shared traces exist."""
    import pathlib

    import pytest

    ref = pathlib.Path(__file__).resolve().parents[3] / "shared" / "traces" / "resnet50_train.pkl.gz"
    if not ref.exists():
        pytest.skip(f"{ref} not present")
    native = _snapshot.read(ref)
    ours = _snapshot.build([(0, ANSWER)])
    assert set(ours) == set(native)
    assert set(ours["segments"][0]) == set(native["segments"][0])
    assert set(ours["segments"][0]["blocks"][0]) == set(native["segments"][0]["blocks"][0])
    alloc = next(e for e in ours["device_traces"][0] if e["action"] == "alloc")
    assert set(alloc) == set(native["device_traces"][0][0])
    assert set(native["allocator_settings"]) <= set(ours["allocator_settings"])
