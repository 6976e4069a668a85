//! Raising a PyTorch error from the allocation entry point.
//!
//! PyTorch's pluggable allocator does not check the pointer `malloc` returns: a NULL becomes
//! a tensor with no memory, and the first kernel that touches it breaks the CUDA context for
//! the rest of the process. Its own allocators report a failure by throwing a C++ exception
//! from `malloc`, and its wrapper calls our `malloc` outside any lock of its own, so an
//! exception is what its callers expect. A C function cannot throw, but inside PyTorch's
//! process `libc10` exports `c10::detail::torchCheckFail`, which throws `c10::Error` (a
//! `RuntimeError` in Python) with our message. When that symbol is present and PyTorch has
//! started bufferheap as its allocator (its init hook, `bufferheap_init`, ran),
//! `bufferheap_malloc` calls it instead of returning NULL. Elsewhere nothing changes: a C
//! program, or a caller through ctypes in a process that merely imported torch, which could
//! not catch a C++ exception (the process would abort). `BUFFERHEAP_OOM=null` keeps the NULL
//! return.
//!
//! Invariant: the throw happens in `bufferheap_malloc`'s own frame (declared `C-unwind`),
//! never inside `catch_unwind` and never across a Rust frame that is not ready for unwinding.

use std::ffi::{CString, c_char, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once PyTorch's init hook ran: from then on `bufferheap_malloc`'s caller is PyTorch.
static STARTED_BY_PYTORCH: AtomicBool = AtomicBool::new(false);

/// Notes that PyTorch started bufferheap as its allocator (`bufferheap_init`).
pub fn started_by_pytorch() {
    STARTED_BY_PYTORCH.store(true, Ordering::Release);
}

/// `c10::detail::torchCheckFail(const char* func, const char* file, uint32_t line, const char* msg)`.
type TorchCheckFail =
    unsafe extern "C-unwind" fn(*const c_char, *const c_char, u32, *const c_char) -> !;

const SYMBOL: &std::ffi::CStr = c"_ZN3c106detail14torchCheckFailEPKcS2_jS2_";

fn torch_check_fail() -> Option<TorchCheckFail> {
    if !STARTED_BY_PYTORCH.load(Ordering::Acquire) {
        return None;
    }
    static FOUND: OnceLock<Option<usize>> = OnceLock::new();
    let addr = *FOUND.get_or_init(|| {
        if std::env::var("BUFFERHEAP_OOM").is_ok_and(|v| v.trim() == "null") {
            return None;
        }
        // PyTorch's libraries are loaded with RTLD_LOCAL, out of reach of RTLD_DEFAULT: ask
        // for the already loaded libc10 by its name (RTLD_NOLOAD never loads anything).
        // SAFETY: dlopen with RTLD_NOLOAD only returns a handle to an object already in the
        // process (or null); the name is a NUL-terminated constant.
        let lib =
            unsafe { libc::dlopen(c"libc10.so".as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        let handle = if lib.is_null() {
            libc::RTLD_DEFAULT
        } else {
            lib
        };
        // SAFETY: dlsym only looks the name up in that object (or the global scope); the
        // name is a NUL-terminated constant. The handle from RTLD_NOLOAD is never closed:
        // the library stays loaded with the process, as PyTorch keeps it.
        let p: *mut c_void = unsafe { libc::dlsym(handle, SYMBOL.as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    });
    // SAFETY: the address is that of `c10::detail::torchCheckFail`'s `const char*` overload
    // (the mangled name fixes the signature), a function that takes exactly these four
    // arguments and never returns normally.
    addr.map(|a| unsafe { std::mem::transmute::<usize, TorchCheckFail>(a) })
}

/// True when a failed allocation will raise in the caller rather than return NULL.
pub fn raises() -> bool {
    torch_check_fail().is_some()
}

/// Throws `c10::Error` with `message` when running inside PyTorch; returns otherwise.
pub fn raise_in_pytorch(message: &str) {
    let Some(fail) = torch_check_fail() else {
        return;
    };
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // SAFETY: `fail` is torchCheckFail (see `torch_check_fail`); all three strings are
    // NUL-terminated and live across the call (`text` is dropped while unwinding). The
    // exception unwinds through this frame and `bufferheap_malloc`, both `C-unwind`, into
    // PyTorch's caller, which expects allocation failures as C++ exceptions.
    unsafe {
        fail(
            c"bufferheap_malloc".as_ptr(),
            c"bufferheap".as_ptr(),
            0,
            text.as_ptr(),
        )
    }
}
