"""bufferheap: a caching allocator for accelerator memory.

Use it as PyTorch's CUDA allocator (call before any CUDA tensor exists)::

    import bufferheap
    bufferheap.torch.install()

then read its figures with ``bufferheap.memory_stats()``, ``bufferheap.max_memory_reserved()``,
``bufferheap.record_memory_history()`` with ``bufferheap.snapshot("snap.pickle")`` and the like:
PyTorch's own ``torch.cuda.memory_stats()``, ``_record_memory_history()`` and ``_snapshot()`` do not
work through PyTorch's pluggable wrapper (``install(direct=True)`` makes them work).

``import bufferheap`` needs neither torch nor a GPU; ``bufferheap.torch`` imports torch.
The native library is found as described in ``bufferheap._ffi`` (``BUFFERHEAP_LIB`` overrides).
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
from typing import Any, Dict, Optional, Union

from . import _config, _ffi, _snapshot
from ._ffi import BufferheapError, LibraryNotFoundError, find_library, lib

__version__ = "0.1.0"

__all__ = [
    "BufferheapError",
    "LibraryNotFoundError",
    "configure",
    "empty_cache",
    "initialized",
    "library_path",
    "max_memory_allocated",
    "max_memory_reserved",
    "memory_allocated",
    "memory_reserved",
    "memory_stats",
    "record_memory_history",
    "reset_accumulated_memory_stats",
    "reset_peak_memory_stats",
    "set_watermarks",
    "snapshot",
    "torch",
]

Device = Union[None, int, str, Any]

# The settings applied through bufferheap_configure in this process (None: none yet).
_applied: Optional[Dict[str, str]] = None
# Held from the check of `_applied` to its update, so that two threads cannot both apply.
_configure_lock = threading.Lock()


def __getattr__(name: str):
    # `bufferheap.torch` is imported on first use, so that `import bufferheap` never imports torch.
    if name == "torch":
        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def library_path() -> str:
    """The path of the native library this process uses (or would load)."""
    loaded = _ffi._library
    return str(loaded.path if loaded is not None else find_library())


def initialized() -> bool:
    """True once the library's settings are frozen: an allocator exists, or CUDA started (init hook)."""
    return lib().initialized()


def configure(
    policy: str = "default",
    low_watermark_ratio: Optional[float] = None,
    high_watermark_ratio: Optional[float] = None,
    debug: Union[None, bool, int] = None,
    history: Optional[int] = None,
    front_cache_bytes: Optional[int] = None,
    idle_page_fraction: Optional[float] = None,
    unmap_rate_limit: Optional[float] = None,
) -> Dict[str, str]:
    """Apply allocator settings; they take effect only before the first allocation.

    Calling again with the same settings does nothing; other settings once some are applied
    raise BufferheapError. Returns the settings as sent to the library.
    """
    global _applied
    wanted = _config.as_dict(
        _config.configuration(policy, low_watermark_ratio, high_watermark_ratio, debug, history, front_cache_bytes, idle_page_fraction, unmap_rate_limit)
    )
    with _configure_lock:
        if _applied is not None:
            if wanted == _applied:
                return dict(_applied)
            raise BufferheapError(f"bufferheap is already configured with {_applied}; cannot change it to {wanted}")
        # All or nothing: a key the library refuses leaves none of the others applied.
        lib().configure_all(wanted)
        _applied = wanted
        return dict(wanted)


def _current_device() -> int:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_device())
    return 0


def _device_index(device: Device) -> int:
    """A device index from None (current device), an int, 'cuda', 'cuda:N' or a torch.device."""
    if device is None:
        return _current_device()
    if isinstance(device, bool):
        raise TypeError("device must be an int, a string or a torch.device, not a bool")
    if isinstance(device, int):
        # A C int on the way down: anything else would wrap to another device (-1: every one).
        if not -1 <= device < 1 << 31:
            raise ValueError(f"not a device index: {device!r}")
        return device
    if isinstance(device, str):
        kind, colon, index = device.partition(":")
        if kind.isdigit() and not colon:
            return int(kind)
        if kind != "cuda" or (colon and not index.isdigit()):
            raise ValueError(f"not a CUDA device: {device!r}")
        return int(index) if index else _current_device()
    kind = getattr(device, "type", None)
    if kind is not None:
        if kind != "cuda":
            raise ValueError(f"not a CUDA device: {device!r}")
        index = getattr(device, "index", None)
        return _current_device() if index is None else int(index)
    raise TypeError(f"cannot make a device index of {device!r}")


def memory_stats(device: Device = None) -> Dict[str, Any]:
    """The allocator's statistics for a device, with torch.cuda.memory_stats()'s key names."""
    d = _device_index(device)
    stats = json.loads(lib().stats_json(d))
    if not isinstance(stats, dict):
        raise BufferheapError(f"bufferheap_stats_json({d}) returned {type(stats).__name__}, not an object")
    return dict(sorted(stats.items()))


def _stat(key: str, device: Device) -> int:
    return int(memory_stats(device).get(key, 0))


def memory_allocated(device: Device = None) -> int:
    """Bytes of buffers in use on a device."""
    return _stat("allocated_bytes.all.current", device)


def max_memory_allocated(device: Device = None) -> int:
    """Peak of memory_allocated since the start or the last reset_peak_memory_stats."""
    return _stat("allocated_bytes.all.peak", device)


def memory_reserved(device: Device = None) -> int:
    """Bytes the allocator holds from the device (in use plus cached)."""
    return _stat("reserved_bytes.all.current", device)


def max_memory_reserved(device: Device = None) -> int:
    """Peak of memory_reserved since the start or the last reset_peak_memory_stats."""
    return _stat("reserved_bytes.all.peak", device)


def reset_peak_memory_stats(device: Device = None) -> None:
    """Reset the peak figures of a device (the current one by default; -1: every device)."""
    d = -1 if device == -1 else _device_index(device)
    lib().reset_peak(d)


def reset_accumulated_memory_stats(device: Device = None) -> None:
    """Zero the cumulative figures of a device (the current one by default; -1: every device):
    every ``.allocated`` and ``.freed`` and counts such as ``num_ooms``; current values and
    peaks stay, as with ``torch.cuda.reset_accumulated_memory_stats()``."""
    d = -1 if device == -1 else _device_index(device)
    lib().reset_accumulated(d)


def empty_cache(device: Device = None) -> None:
    """Give every cached, unused buffer back to the device (all devices by default)."""
    lib().empty_cache(-1 if device is None else _device_index(device))


def set_watermarks(low: float, high: float, device: Device = None) -> None:
    """Set the low and high watermark ratios of a device's allocator; 0 disables a limit."""
    if low is None or high is None:
        raise TypeError("set_watermarks needs both ratios (0 disables a limit)")
    low_f, high_f = _config.check_watermarks(low, high)
    lib().set_watermarks(_device_index(device), low_f, high_f)


def record_memory_history(enabled: bool = True, max_entries: int = sys.maxsize, clear_history: bool = False) -> None:
    """Record the allocator's events for snapshots, as torch.cuda.memory._record_memory_history().

    From now on every device (those not used yet too) keeps its last ``max_entries`` allocations,
    frees and page maps; ``snapshot()`` writes them as ``device_traces``, which PyTorch's memory
    viewer draws and ``bufferheap replay`` replays. A history already recorded goes on unless
    ``clear_history``; ``enabled=False`` stops recording and drops it. No stack frames are kept.
    While recording, every allocation goes through the allocator's lock (threads' caches of
    small buffers are off), so the hot path is slower.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False; got {enabled!r}")
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError(f"max_entries must be a positive int (events kept per device); got {max_entries!r}")
    limit = min(max_entries, (1 << 64) - 1) if enabled else 0
    lib().record_history(limit, bool(clear_history))


def _settings() -> Dict[str, Any]:
    """What a snapshot's allocator_settings["bufferheap"] says: the applied settings, typed."""
    settings: Dict[str, Any] = {"backend": "bufferheap", "version": __version__}
    for key, value in (_applied or {}).items():
        settings[key] = float(value) if key.endswith("_ratio") else int(value) if key == "debug" else value
    return settings


def snapshot(path: Optional[str] = None, device: Device = None) -> Dict[str, Any]:
    """The allocator's state in torch.cuda.memory._snapshot()'s format.

    device None (or -1) takes every device the process uses. With a path, the dict is also
    pickled there (gzip-compressed if the name ends in .gz) for PyTorch's memory viewer and
    ``bufferheap replay``. Returns the dict.
    """
    library = lib()
    if device is None or _device_index(device) == -1:
        # One answer for every device the library sees (each device's segments and trace).
        every = json.loads(library.snapshot_json(-1))
        answers = [
            (d, {**every, "segments": [s for s in every.get("segments", []) if s.get("device", 0) == d],
                 "device_traces": [trace]})
            for d, trace in enumerate(every.get("device_traces") or [[]])
        ]
    else:
        answers = [(_device_index(device), json.loads(library.snapshot_json(_device_index(device))))]
    snap = _snapshot.build(answers, _settings())
    if path is not None:
        _snapshot.write(snap, path)
    return snap
