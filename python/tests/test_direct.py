"""The direct front's Python side against its C++ source (no torch, no GPU)."""

import re

from bufferheap import _direct, _ffi


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


def test_every_pluggable_hook_is_set_by_the_direct_front_too():
    assert sorted(_direct._HOOKS) == sorted(_ffi.TORCH_HOOKS)


def test_the_calls_it_makes_are_bound_by_the_loader():
    for name in _direct._CALLS:
        assert name in _ffi._SIGNATURES
