"""Shared fixtures: the package on sys.path, a C stand-in for libbufferheap_ffi, and the real
library when BUFFERHEAP_LIB names a build of it."""

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


# A real build of the library named by BUFFERHEAP_LIB when the tests start, e.g.
#   BUFFERHEAP_LIB=target/debug/libbufferheap_ffi.so BUFFERHEAP_BACKEND=host python3 -m pytest python/tests
# runs test_real_lib.py against it (skipped otherwise). Other tests keep using the C stand-in.
REAL_LIB = os.environ.get(_ffi.ENV_VAR)


@pytest.fixture
def real_lib(tmp_path, monkeypatch):
    """A fresh copy of the real library (own global state: one registry per loaded copy),
    on the host backend with two pretend devices unless BUFFERHEAP_BACKEND says otherwise."""
    if not REAL_LIB:
        pytest.skip("set BUFFERHEAP_LIB to a built libbufferheap_ffi.so to test the real library")
    src = Path(REAL_LIB).expanduser()
    if not src.is_file():
        pytest.fail(f"BUFFERHEAP_LIB={REAL_LIB!r} does not name a file")
    copy = tmp_path / "libbufferheap_ffi.so"
    shutil.copy(src, copy)
    monkeypatch.setenv(_ffi.ENV_VAR, str(copy))
    monkeypatch.setenv("BUFFERHEAP_BACKEND", os.environ.get("BUFFERHEAP_BACKEND", "host"))
    monkeypatch.setenv("BUFFERHEAP_HOST_DEVICES", "2")
    for var in ("BUFFERHEAP_POLICY", "BUFFERHEAP_DEBUG", "BUFFERHEAP_LOW_WATERMARK_RATIO", "BUFFERHEAP_HIGH_WATERMARK_RATIO"):
        monkeypatch.delenv(var, raising=False)
    _ffi._reset_for_tests()
    monkeypatch.setattr(bufferheap, "_applied", None)
    library = _ffi.lib()
    if "fake.policy" in bufferheap.memory_stats(0):
        pytest.skip("BUFFERHEAP_LIB names the C stand-in, not the real library")
    yield library
    _ffi._reset_for_tests()


@pytest.fixture
def lib_with_env(tmp_path, monkeypatch):
    """A function that loads a fresh copy of the real library (host backend) after setting the
    environment variables it is given: for settings read when the library starts."""
    if not REAL_LIB:
        pytest.skip("set BUFFERHEAP_LIB to a built libbufferheap_ffi.so to test the real library")

    def load(**env):
        copy = tmp_path / "libbufferheap_ffi.so"
        shutil.copy(Path(REAL_LIB).expanduser(), copy)
        monkeypatch.setenv(_ffi.ENV_VAR, str(copy))
        monkeypatch.setenv("BUFFERHEAP_BACKEND", "host")
        for var in ("BUFFERHEAP_POLICY", "BUFFERHEAP_DEBUG", "BUFFERHEAP_LOW_WATERMARK_RATIO",
                    "BUFFERHEAP_HIGH_WATERMARK_RATIO", "BUFFERHEAP_HOST_DEVICES"):
            monkeypatch.delenv(var, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        _ffi._reset_for_tests()
        monkeypatch.setattr(bufferheap, "_applied", None)
        return _ffi.lib()

    yield load
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
