"""Turning bufferheap_snapshot_json output into the dict torch.cuda.memory._snapshot() returns.

The result pickles into a file that PyTorch's viewers (``python -m torch.cuda._memory_viz``,
https://pytorch.org/memory_viz) and ``bufferheap replay`` read like a native snapshot.
Pure Python: no library, no torch.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

# The protocol PyTorch's own snapshots are written with (pickle.dump's default since 3.8).
PICKLE_PROTOCOL = 4

# The native allocator's settings block, with the values that mean "not in use": tools that
# read a snapshot's allocator_settings find every key they expect.
_NATIVE_SETTINGS: Dict[str, Any] = {
    "PYTORCH_CUDA_ALLOC_CONF": "",
    "max_split_size": -1,
    "garbage_collection_threshold": 0.0,
    "expandable_segments": False,
    "pinned_num_register_threads": 1,
    "release_lock_on_cudamalloc": False,
    "pinned_use_cuda_host_register": False,
    "graph_capture_record_stream_reuse": False,
    "roundup_power2_divisions": {str(1 << i): 0 for i in range(16)},
}

_ALLOCATED = "active_allocated"
_ACTIVE = ("active_allocated", "active_pending_free", "active_awaiting_free")


def _block(b: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(b)
    out.setdefault("requested_size", out.get("size", 0))
    out.setdefault("state", "inactive")
    out.setdefault("frames", [])
    return out


def _segment(s: Mapping[str, Any], device: int) -> Dict[str, Any]:
    out = dict(s)
    blocks = [_block(b) for b in out.get("blocks", [])]
    out["blocks"] = blocks
    out.setdefault("device", device)
    out.setdefault("address", blocks[0]["address"] if blocks else 0)
    out.setdefault("total_size", sum(b.get("size", 0) for b in blocks))
    out.setdefault("allocated_size", sum(b["size"] for b in blocks if b["state"] == _ALLOCATED))
    out.setdefault("active_size", sum(b["size"] for b in blocks if b["state"] in _ACTIVE))
    out.setdefault("requested_size", sum(b["requested_size"] for b in blocks if b["state"] == _ALLOCATED))
    out.setdefault("stream", 0)
    out.setdefault("segment_type", "large")
    out["segment_pool_id"] = tuple(out.get("segment_pool_id", (0, 0)))
    out.setdefault("is_expandable", False)
    out.setdefault("frames", [])
    return out


def _trace_entry(e: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(e)
    if out.get("action") == "oom":
        out.setdefault("device_free", out.pop("addr", 0))
    else:
        out.setdefault("addr", 0)
    out.setdefault("size", 0)
    out.setdefault("stream", 0)
    out.setdefault("time_us", 0)
    out.setdefault("compile_context", "N/A")
    out.setdefault("user_metadata", "")
    return out


def _device_trace(traces: List[List[Mapping[str, Any]]], device: int) -> List[Mapping[str, Any]]:
    """This device's trace from one bufferheap_snapshot_json(device) answer.

    The answer holds either one list (this device's) or one list per device index.
    """
    if len(traces) == 1:
        return traces[0]
    if device < len(traces):
        return traces[device]
    return [e for t in traces for e in t]


def allocator_settings(bufferheap_settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _NATIVE_SETTINGS.items()}
    settings["bufferheap"] = dict(bufferheap_settings or {})
    return settings


def build(per_device: Iterable[Tuple[int, Mapping[str, Any]]], settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The PyTorch snapshot dict from (device, parsed bufferheap_snapshot_json(device)) pairs."""
    segments: List[Dict[str, Any]] = []
    traces: Dict[int, List[Dict[str, Any]]] = {}
    extra_settings: Dict[str, Any] = dict(settings or {})
    for device, answer in per_device:
        segments.extend(_segment(s, device) for s in answer.get("segments", []))
        raw = answer.get("device_traces") or [[]]
        traces[device] = [_trace_entry(e) for e in _device_trace(raw, device)]
        if isinstance(answer.get("allocator_settings"), Mapping):
            extra_settings.update(answer["allocator_settings"])
    n = max(traces) + 1 if traces else 1
    segments.sort(key=lambda s: (s["device"], s["address"]))
    return {
        "segments": segments,
        "device_traces": [traces.get(d, []) for d in range(n)],
        "allocator_settings": allocator_settings(extra_settings),
        "external_annotations": [],
    }


def build_from_json(per_device_json: Iterable[Tuple[int, str]], settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    return build(((d, json.loads(text)) for d, text in per_device_json), settings)


def write(snapshot: Mapping[str, Any], path: "os.PathLike[str] | str") -> None:
    """Pickle the snapshot to path (gzip-compressed when the name ends in .gz), atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(tmp, "wb") as f:
            pickle.dump(dict(snapshot), f, protocol=PICKLE_PROTOCOL)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read(path: "os.PathLike[str] | str") -> Dict[str, Any]:
    """Load a pickled snapshot (gzip-compressed or not, told apart by its first bytes)."""
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return pickle.load(f)
