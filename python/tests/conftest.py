"""Shared fixtures: the package on sys.path, and a C stand-in for libbufferheap_ffi."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

PYTHON_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PYTHON_DIR))

import bufferheap  # noqa: E402
from bufferheap import _ffi  # noqa: E402

FAKE_SRC = Path(__file__).with_name("fake_ffi.c")


def compile_shared(src_text_or_path, out: Path, extra=()):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build the test library")
    if isinstance(src_text_or_path, Path):
        src = src_text_or_path
    else:
        src = out.with_suffix(".c")
        src.write_text(src_text_or_path)
    cmd = [cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(src), "-lpthread", "-lm", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def fake_lib_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake") / "libfake_ffi.so"
    return compile_shared(FAKE_SRC, out)


@pytest.fixture
def fake_lib(fake_lib_build, tmp_path, monkeypatch):
    """A fresh copy of the stand-in library (own global state), selected via BUFFERHEAP_LIB."""
    copy = tmp_path / "libbufferheap_ffi.so"
    shutil.copy(fake_lib_build, copy)
    monkeypatch.setenv(_ffi.ENV_VAR, str(copy))
    _ffi._reset_for_tests()
    monkeypatch.setattr(bufferheap, "_applied", None)
    yield _ffi.lib()
    _ffi._reset_for_tests()


@pytest.fixture
def no_lib_env(monkeypatch):
    monkeypatch.delenv(_ffi.ENV_VAR, raising=False)
    _ffi._reset_for_tests()
    yield
    _ffi._reset_for_tests()


@pytest.fixture
def ext_suffix():
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"
