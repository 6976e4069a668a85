"""Finding and binding the C ABI of bufferheap (libbufferheap_ffi) with ctypes.

Where the library is looked for, in order:

1. the file named by the environment variable ``BUFFERHEAP_LIB`` (a build carried to a
   machine that has no Rust toolchain);
2. the copy shipped inside the package by ``pip install .``
   (``bufferheap/_bufferheap_ffi<EXT_SUFFIX>``, built by cargo through setuptools-rust);
3. a cargo build in the source checkout the package is imported from
   (``target/release`` then ``target/debug``), for ``PYTHONPATH=python`` use.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

ENV_VAR = "BUFFERHEAP_LIB"

_PKG_DIR = Path(__file__).resolve().parent
# python/bufferheap/_ffi.py -> repository root
_REPO_ROOT = _PKG_DIR.parent.parent

if sys.platform == "darwin":
    _CARGO_NAME = "libbufferheap_ffi.dylib"
elif sys.platform == "win32":
    _CARGO_NAME = "bufferheap_ffi.dll"
else:
    _CARGO_NAME = "libbufferheap_ffi.so"


class BufferheapError(RuntimeError):
    """An error reported by the bufferheap library (the message is bufferheap_last_error())."""


class LibraryNotFoundError(BufferheapError):
    """libbufferheap_ffi could not be found or loaded."""


# name -> (restype, argtypes). Pointers that the caller must free come back as c_void_p,
# so that they can be handed to bufferheap_string_free unchanged.
_c = ctypes
_SIGNATURES = {
    "bufferheap_malloc": (_c.c_void_p, [_c.c_ssize_t, _c.c_int, _c.c_void_p]),
    "bufferheap_try_malloc": (_c.c_int, [_c.c_size_t, _c.c_int, _c.c_void_p, _c.POINTER(_c.c_void_p)]),
    "bufferheap_free": (None, [_c.c_void_p, _c.c_ssize_t, _c.c_int, _c.c_void_p]),
    "bufferheap_init": (None, [_c.c_int]),
    "bufferheap_reset": (None, []),
    "bufferheap_set_memory_fraction": (None, [_c.c_double, _c.c_int]),
    "bufferheap_record_stream": (None, [_c.c_void_p, _c.c_void_p]),
    "bufferheap_base_alloc": (_c.c_void_p, [_c.c_void_p, _c.POINTER(_c.c_size_t)]),
    "bufferheap_configure": (_c.c_int, [_c.c_char_p, _c.c_char_p]),
    "bufferheap_configure_all": (_c.c_int, [_c.c_char_p]),
    "bufferheap_initialized": (_c.c_int, []),
    "bufferheap_stats_json": (_c.c_void_p, [_c.c_int]),
    "bufferheap_snapshot_json": (_c.c_void_p, [_c.c_int]),
    "bufferheap_string_free": (None, [_c.c_void_p]),
    "bufferheap_empty_cache": (_c.c_int, [_c.c_int]),
    "bufferheap_reset_peak": (_c.c_int, [_c.c_int]),
    "bufferheap_reset_accumulated": (_c.c_int, [_c.c_int]),
    "bufferheap_largest_available": (_c.c_int, [_c.c_int, _c.POINTER(_c.c_size_t)]),
    "bufferheap_stats_values": (_c.c_int, [_c.c_int, _c.POINTER(_c.c_char_p), _c.c_size_t, _c.POINTER(_c.c_int64)]),
    "bufferheap_set_watermarks": (_c.c_int, [_c.c_int, _c.c_double, _c.c_double]),
    # Arrays of the header's structs, which only the C++ front reads: opaque pointers here.
    "bufferheap_memory_snapshot": (_c.c_int, [_c.c_int, _c.c_int, _c.c_void_p, _c.c_size_t, _c.c_void_p, _c.c_size_t,
                                              _c.c_void_p, _c.c_size_t, _c.POINTER(_c.c_size_t)]),
    "bufferheap_record_history": (_c.c_int, [_c.c_size_t, _c.c_int]),
    "bufferheap_history_limit": (_c.c_int, [_c.POINTER(_c.c_size_t)]),
    "bufferheap_last_error": (_c.c_char_p, []),
}

# Without these the library is of no use at all; the rest fail only when called.
_REQUIRED = ("bufferheap_malloc", "bufferheap_free", "bufferheap_last_error", "bufferheap_string_free")

# The entry points handed to PyTorch's CUDAPluggableAllocator, by setter name.
TORCH_HOOKS = {
    "set_init_fn": "bufferheap_init",
    "set_reset_fn": "bufferheap_reset",
    "set_memory_fraction_fn": "bufferheap_set_memory_fraction",
    "set_record_stream_fn": "bufferheap_record_stream",
    "set_base_alloc_fn": "bufferheap_base_alloc",
}


def candidate_paths() -> List[Path]:
    """Every place the library is looked for when BUFFERHEAP_LIB is unset, in order."""
    shipped = sorted(p for p in _PKG_DIR.glob("_bufferheap_ffi*") if p.suffix in (".so", ".dylib", ".pyd", ".dll"))
    shipped.append(_PKG_DIR / _CARGO_NAME)
    built = [_REPO_ROOT / "target" / profile / _CARGO_NAME for profile in ("release", "debug")]
    return shipped + built


def find_library() -> Path:
    """The path of libbufferheap_ffi; LibraryNotFoundError says where it looked."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise LibraryNotFoundError(
                f"{ENV_VAR}={override!r} does not name a file; point it at a built "
                f"{_CARGO_NAME} (cargo build --release -p bufferheap-ffi) or unset it"
            )
        return path.resolve()
    tried = candidate_paths()
    for path in tried:
        if path.is_file():
            return path.resolve()
    raise LibraryNotFoundError(
        "the bufferheap native library was not found. Install the package with cargo available "
        "(`pip install .` at the root of the bufferheap repository), or build it with "
        f"`cargo build --release -p bufferheap-ffi` and set {ENV_VAR}=/path/to/{_CARGO_NAME}. "
        "Looked in: " + ", ".join(str(p) for p in tried)
    )


class Library:
    """The loaded C library with typed entry points.

    Every call that can fail goes through check_status / take_string, which turn the C
    side's error report into a BufferheapError carrying bufferheap_last_error().
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.cdll = ctypes.CDLL(str(self.path))
        except OSError as e:
            raise LibraryNotFoundError(f"could not load {self.path}: {e}") from e
        self.missing = []
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(self.cdll, name)
            except AttributeError:
                self.missing.append(name)
                continue
            fn.restype = restype
            fn.argtypes = argtypes
        absent = [n for n in _REQUIRED if n in self.missing]
        if absent:
            raise LibraryNotFoundError(
                f"{self.path} is not a bufferheap library (or an old build): it does not export {', '.join(absent)}"
            )

    def fn(self, name: str):
        if name in self.missing:
            raise BufferheapError(f"{self.path} does not export {name} (the library is older than this package)")
        return getattr(self.cdll, name)

    def address(self, name: str) -> int:
        """The raw address of an exported function, as PyTorch's allocator setters take it."""
        value = ctypes.cast(self.fn(name), ctypes.c_void_p).value
        if not value:
            raise BufferheapError(f"{name} has a null address in {self.path}")
        return value

    def last_error(self) -> str:
        msg = self.fn("bufferheap_last_error")()
        return msg.decode("utf-8", "replace") if msg else ""

    def error(self, what: str) -> BufferheapError:
        detail = self.last_error()
        return BufferheapError(f"{what} failed: {detail}" if detail else f"{what} failed (no error message)")

    def check_status(self, what: str, status: int) -> None:
        if status != 0:
            raise self.error(what)

    def take_string(self, what: str, ptr: Optional[int]) -> str:
        """Copy a string the library allocated, then give it back to the library."""
        if not ptr:
            raise self.error(what)
        try:
            return ctypes.string_at(ptr).decode("utf-8")
        finally:
            self.fn("bufferheap_string_free")(ptr)

    # Thin, typed wrappers of the control and observability calls.

    def configure(self, key: str, value: str) -> None:
        status = self.fn("bufferheap_configure")(key.encode(), value.encode())
        self.check_status(f"bufferheap_configure({key!r}, {value!r})", status)

    def configure_all(self, settings: Dict[str, str]) -> None:
        """Applies every setting or none (one key=value per line to the library)."""
        text = "\n".join(f"{k}={v}" for k, v in settings.items())
        status = self.fn("bufferheap_configure_all")(text.encode())
        self.check_status(f"bufferheap_configure_all({text!r})", status)

    def initialized(self) -> bool:
        return bool(self.fn("bufferheap_initialized")())

    def stats_json(self, device: int) -> str:
        return self.take_string(f"bufferheap_stats_json({device})", self.fn("bufferheap_stats_json")(device))

    def snapshot_json(self, device: int) -> str:
        return self.take_string(f"bufferheap_snapshot_json({device})", self.fn("bufferheap_snapshot_json")(device))

    def empty_cache(self, device: int) -> None:
        self.check_status(f"bufferheap_empty_cache({device})", self.fn("bufferheap_empty_cache")(device))

    def reset_peak(self, device: int) -> None:
        self.check_status(f"bufferheap_reset_peak({device})", self.fn("bufferheap_reset_peak")(device))

    def reset_accumulated(self, device: int) -> None:
        status = self.fn("bufferheap_reset_accumulated")(device)
        self.check_status(f"bufferheap_reset_accumulated({device})", status)

    def record_history(self, max_entries: int, clear: bool) -> None:
        status = self.fn("bufferheap_record_history")(max_entries, int(clear))
        self.check_status(f"bufferheap_record_history({max_entries}, {int(clear)})", status)

    def history_limit(self) -> int:
        out = ctypes.c_size_t(0)
        self.check_status("bufferheap_history_limit", self.fn("bufferheap_history_limit")(ctypes.byref(out)))
        return out.value

    def set_watermarks(self, device: int, low: float, high: float) -> None:
        status = self.fn("bufferheap_set_watermarks")(device, low, high)
        self.check_status(f"bufferheap_set_watermarks({device}, {low}, {high})", status)


_lock = threading.Lock()
_library: Optional[Library] = None


def lib() -> Library:
    """The process-wide library, loaded on first use."""
    global _library
    with _lock:
        if _library is None:
            _library = Library(find_library())
        return _library


def _reset_for_tests() -> None:
    global _library
    with _lock:
        _library = None
