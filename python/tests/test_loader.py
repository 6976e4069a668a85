"""Finding and loading the native library (no torch, no GPU)."""

import os
import shutil
import subprocess
import sys

import pytest

import bufferheap
from bufferheap import _ffi
from conftest import PYTHON_DIR, compile_shared


def test_env_var_pointing_nowhere(monkeypatch, tmp_path):
    missing = tmp_path / "nope" / "libbufferheap_ffi.so"
    monkeypatch.setenv("BUFFERHEAP_LIB", str(missing))
    with pytest.raises(bufferheap.LibraryNotFoundError) as e:
        _ffi.find_library()
    assert "BUFFERHEAP_LIB" in str(e.value) and str(missing) in str(e.value)


def test_not_found_message_says_how_to_fix(no_lib_env, monkeypatch, tmp_path):
    monkeypatch.setattr(_ffi, "_PKG_DIR", tmp_path / "pkg")
    monkeypatch.setattr(_ffi, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(bufferheap.LibraryNotFoundError) as e:
        bufferheap.memory_stats()
    msg = str(e.value)
    assert "pip install ." in msg
    assert "BUFFERHEAP_LIB" in msg
    assert str(tmp_path / "repo" / "target" / "release") in msg
    assert isinstance(e.value, RuntimeError)


def test_shipped_library_is_found_first(no_lib_env, monkeypatch, tmp_path, fake_lib_build, ext_suffix):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    shipped = pkg / f"_bufferheap_ffi{ext_suffix}"
    shutil.copy(fake_lib_build, shipped)
    repo_build = tmp_path / "repo" / "target" / "release"
    repo_build.mkdir(parents=True)
    shutil.copy(fake_lib_build, repo_build / _ffi._CARGO_NAME)
    monkeypatch.setattr(_ffi, "_PKG_DIR", pkg)
    monkeypatch.setattr(_ffi, "_REPO_ROOT", tmp_path / "repo")
    assert _ffi.find_library() == shipped.resolve()
    shipped.unlink()
    assert _ffi.find_library() == (repo_build / _ffi._CARGO_NAME).resolve()


def test_env_var_wins(monkeypatch, tmp_path, fake_lib_build):
    chosen = tmp_path / "mine.so"
    shutil.copy(fake_lib_build, chosen)
    monkeypatch.setenv("BUFFERHEAP_LIB", str(chosen))
    assert bufferheap.library_path() == str(chosen.resolve())


def test_not_a_library(monkeypatch, tmp_path):
    bogus = tmp_path / "libbufferheap_ffi.so"
    bogus.write_text("not an ELF file")
    monkeypatch.setenv("BUFFERHEAP_LIB", str(bogus))
    _ffi._reset_for_tests()
    with pytest.raises(bufferheap.LibraryNotFoundError, match="could not load"):
        _ffi.lib()
    _ffi._reset_for_tests()


def test_library_without_the_abi(monkeypatch, tmp_path):
    other = compile_shared("int something_else(void) { return 1; }\n", tmp_path / "libother.so")
    monkeypatch.setenv("BUFFERHEAP_LIB", str(other))
    _ffi._reset_for_tests()
    with pytest.raises(bufferheap.LibraryNotFoundError, match="does not export bufferheap_malloc"):
        _ffi.lib()
    _ffi._reset_for_tests()


def test_partial_library_fails_only_when_the_missing_call_is_made(monkeypatch, tmp_path):
    src = """
    #include <stddef.h>
    #include <sys/types.h>
    void *bufferheap_malloc(ssize_t s, int d, void *st) { return NULL; }
    void bufferheap_free(void *p, ssize_t s, int d, void *st) {}
    const char *bufferheap_last_error(void) { return ""; }
    void bufferheap_string_free(char *s) {}
    """
    partial = compile_shared(src, tmp_path / "libpartial.so")
    monkeypatch.setenv("BUFFERHEAP_LIB", str(partial))
    _ffi._reset_for_tests()
    lib = _ffi.lib()
    assert "bufferheap_stats_json" in lib.missing
    with pytest.raises(bufferheap.BufferheapError, match="does not export bufferheap_stats_json"):
        bufferheap.memory_stats(0)
    _ffi._reset_for_tests()


def test_import_does_not_need_torch():
    code = "import sys, bufferheap; assert 'torch' not in sys.modules; print(bufferheap.__version__)"
    env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR))
    env.pop("BUFFERHEAP_LIB", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == bufferheap.__version__


def test_torch_submodule_without_torch_says_so():
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch is installed here")
    code = "import bufferheap\ntry:\n    bufferheap.torch\nexcept ImportError as e:\n    print(e)\n"
    env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "bufferheap.torch needs PyTorch" in out.stdout


def test_unknown_attribute():
    with pytest.raises(AttributeError):
        bufferheap.no_such_thing
