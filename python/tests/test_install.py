"""bufferheap.torch.install()'s Python side with a stand-in torch (no torch, no GPU)."""

import importlib
import sys
import types

import pytest

import bufferheap
from bufferheap import _ffi


def _stand_in_torch():
    """Just what install() touches on the pluggable route."""
    torch = types.ModuleType("torch")
    torch._C = types.SimpleNamespace(_cuda_customAllocator=object())

    class Raw:
        def __getattr__(self, name):
            if name.startswith("set_"):
                return lambda address: None
            raise AttributeError(name)

    class CUDAPluggableAllocator:
        def __init__(self, path, malloc, free):
            pass

        def allocator(self):
            return Raw()

    memory = types.SimpleNamespace(CUDAPluggableAllocator=CUDAPluggableAllocator, change_current_allocator=lambda a: None)
    torch.cuda = types.SimpleNamespace(is_initialized=lambda: False, memory=memory)
    return torch


@pytest.fixture
def install(monkeypatch):
    """install() over a stand-in torch and a library that records what it is sent."""
    monkeypatch.setitem(sys.modules, "torch", _stand_in_torch())
    monkeypatch.delitem(sys.modules, "bufferheap.torch", raising=False)
    monkeypatch.setattr(bufferheap, "_applied", None)
    sent = []

    class Library:
        path = "/nonexistent/libbufferheap_ffi.so"
        missing = list(_ffi.TORCH_HOOKS.values())

        def configure_all(self, settings):
            sent.extend(settings.items())

    monkeypatch.setattr(_ffi, "lib", lambda: Library())
    monkeypatch.setattr(bufferheap, "lib", lambda: Library())
    module = importlib.import_module("bufferheap.torch")
    yield module.install, sent
    monkeypatch.delitem(sys.modules, "bufferheap.torch", raising=False)


def test_every_setting_install_reports_reaches_the_library(install):
    install_fn, sent = install
    info = install_fn(history=100, front_cache_bytes=0, idle_page_fraction=0.5, unmap_rate_limit=3.0)
    reported = {k: v for k, v in info["settings"].items() if k != "front"}
    assert dict(sent) == reported
    assert dict(sent)["front_cache_bytes"] == "0" and dict(sent)["idle_page_fraction"] == "0.5"
    assert dict(sent)["unmap_rate_limit"] == "3.0" and dict(sent)["history"] == "100"


def test_install_after_configure_with_the_same_settings_is_accepted(install):
    install_fn, sent = install
    bufferheap.configure(front_cache_bytes=0)
    install_fn(front_cache_bytes=0)
    assert dict(sent)["front_cache_bytes"] == "0"
