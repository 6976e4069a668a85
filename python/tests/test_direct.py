"""The direct front's Python side against its C++ source (no torch, no GPU)."""

import re
import sys
import types
from pathlib import Path

import pytest

from bufferheap import _direct, _ffi
from conftest import PYTHON_DIR


def _entry_parameters():
    src = _direct.SOURCE.read_text()
    m = re.search(r"int bufferheap_direct_install\(([^)]*)\)", src)
    assert m, "bufferheap_direct_install not found in " + str(_direct.SOURCE)
    return [p.split()[-1].lstrip("*") for p in m.group(1).split(",")]


def test_addresses_are_passed_in_the_order_the_cpp_entry_takes_them():
    names = _entry_parameters()
    assert len(names) == len(_direct._CALLS) + len(_direct._HOOKS) + 2
    k = len(_direct._CALLS)
    calls, hooks, rest = names[:k], names[k:k + len(_direct._HOOKS)], names[k + len(_direct._HOOKS):]
    assert calls == [c.removeprefix("bufferheap_") for c in _direct._CALLS]
    assert hooks == [h.removeprefix("set_").removesuffix("_fn") for h in _direct._HOOKS]
    assert rest == ["error", "error_len"]


def _fields(body):
    """A C struct body's fields as "type name" strings, comments and spacing dropped."""
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return [" ".join(f.split()) for f in body.split(";") if f.strip()]


def test_the_snapshot_records_are_declared_as_in_the_c_header():
    header = (PYTHON_DIR.parent / "crates" / "ffi" / "include" / "bufferheap.h").read_text()
    cpp = _direct.SOURCE.read_text()
    in_header = {m.group(1): _fields(m.group(2)) for m in re.finditer(r"typedef struct (\w+) \{(.*?)\} \1;", header, re.S)}
    in_cpp = {m.group(1): _fields(m.group(2)) for m in re.finditer(r"^struct (bufferheap_\w+) \{(.*?)\};", cpp, re.S | re.M)}
    assert sorted(in_cpp) == ["bufferheap_block", "bufferheap_segment", "bufferheap_trace_entry"]
    for name, fields in in_cpp.items():
        assert fields == in_header[name], name


def test_every_pluggable_hook_is_set_by_the_direct_front_too():
    assert sorted(_direct._HOOKS) == sorted(_ffi.TORCH_HOOKS)


def test_the_calls_it_makes_are_bound_by_the_loader():
    for name in _direct._CALLS:
        assert name in _ffi._SIGNATURES


class _FakeCppExtension:
    """Stands in for torch.utils.cpp_extension: records the call, then fails or leaves a build."""

    def __init__(self, root, error=None):
        self.root, self.error, self.calls = root, error, []

    def get_default_build_root(self):
        return str(self.root)

    def load(self, **kw):
        self.calls.append(kw)
        if self.error:
            raise self.error
        Path(kw["build_directory"], kw["name"] + ".so").write_bytes(b"")


def _fake_torch(monkeypatch, ext, cuda_started=False):
    torch = types.ModuleType("torch")
    torch.__version__ = "2.11.0+cu130"
    torch.cuda = types.SimpleNamespace(is_initialized=lambda: cuda_started)
    utils = types.ModuleType("torch.utils")
    utils.cpp_extension = ext
    torch.utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch.utils", utils)
    monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", ext)


def test_build_goes_to_one_folder_per_torch_version(monkeypatch, tmp_path):
    ext = _FakeCppExtension(tmp_path)
    _fake_torch(monkeypatch, ext)
    built = _direct.build()
    assert built == tmp_path / "bufferheap_direct-torch2.11.0_cu130" / "bufferheap_direct.so"
    (call,) = ext.calls
    assert call["sources"] == [str(_direct.SOURCE)] and call["with_cuda"] and not call["is_python_module"]
    # An architecture is named, so that PyTorch does not ask the device (which starts CUDA).
    assert any("arch" in flag for flag in call["extra_cuda_cflags"])


def test_a_build_that_started_cuda_is_reported(monkeypatch, tmp_path):
    _fake_torch(monkeypatch, _FakeCppExtension(tmp_path), cuda_started=True)
    with pytest.raises(RuntimeError, match="started CUDA"):
        _direct.build()


def test_a_failed_build_says_what_is_missing_and_what_works_without_it(monkeypatch, tmp_path):
    _fake_torch(monkeypatch, _FakeCppExtension(tmp_path, RuntimeError("Ninja is required to load C++ extensions")))
    with pytest.raises(RuntimeError) as e:
        _direct.build()
    msg = str(e.value)
    assert "Ninja is required" in msg and "2.11.0+cu130" in msg
    assert "needs a C++ compiler, ninja" in msg and "install(direct=False)" in msg
