//! Errors at the C boundary: the thread-local last error, messages on stderr, and the guard
//! that keeps panics from crossing `extern "C"`.
//!
//! Invariants:
//! - every exported function runs its body inside [`guard`]; a panic becomes the function's
//!   failure value (NULL, -1 or nothing) plus a last error, never an unwind into C (which
//!   would abort the host process, Python included);
//! - the last error ([`set_last_error`]) is per thread; a failing call replaces it, a
//!   succeeding call leaves it alone (errno-like: read it only after a call reported
//!   failure). The pointer [`last_error_ptr`] returns stays valid until the next failing call
//!   on the same thread;
//! - writing to stderr never panics (write errors are ignored).

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// An error to report across the C ABI: the text stored as last error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfiError {
    pub message: String,
    /// Already written to stderr (setup errors are written once, where first met).
    pub shown: bool,
    /// The device's memory is exhausted (as opposed to a bad argument or a broken backend):
    /// callers that raise their own errors raise PyTorch's `OutOfMemoryError` for it.
    pub out_of_memory: bool,
}

impl FfiError {
    pub fn new(message: impl Into<String>) -> Self {
        FfiError {
            message: message.into(),
            shown: false,
            out_of_memory: false,
        }
    }

    /// An allocation that failed because the device is full.
    pub fn out_of_memory(message: impl Into<String>) -> Self {
        FfiError {
            out_of_memory: true,
            ..FfiError::new(message)
        }
    }

    /// The same error, marked as already written to stderr.
    pub fn shown(mut self) -> Self {
        self.shown = true;
        self
    }
}

impl std::fmt::Display for FfiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for FfiError {
    fn from(s: String) -> Self {
        FfiError::new(s)
    }
}

/// Result of the C ABI's internals.
pub type FfiResult<T> = Result<T, FfiError>;

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

const EMPTY: &CStr = c"";

/// Stores `message` as this thread's last error.
pub fn set_last_error(message: &str) {
    // Interior NULs cannot travel in a C string: show them as U+FFFD.
    let c = CString::new(message.replace('\0', "\u{fffd}")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = Some(c));
}

/// This thread's last error as a C string; `""` if there was none.
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| match &*slot.borrow() {
            // The CString's buffer lives in the thread-local slot until it is replaced.
            Some(c) => c.as_ptr(),
            None => EMPTY.as_ptr(),
        })
        .unwrap_or(EMPTY.as_ptr())
}

/// This thread's last error as a Rust string (for tests and Rust callers).
pub fn last_error() -> String {
    LAST_ERROR
        .try_with(|slot| {
            slot.borrow()
                .as_ref()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// Writes one or more lines to stderr; failures to write are ignored.
pub fn eprint_lines(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
    let _ = err.flush();
}

/// Sets the last error and writes it to stderr (unless it was written already): for calls
/// whose failure C cannot see in the return value (void functions, NULL from malloc).
pub fn report(error: &FfiError) {
    set_last_error(&error.message);
    if !error.shown {
        eprint_lines(&error.message);
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}

/// Runs `f`; if it panics, reports the panic (last error and stderr) and returns `on_panic`.
pub fn guard<T>(name: &str, on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(payload) => {
            report(&FfiError::new(format!(
                "bufferheap: internal error in {name}: {}; the call failed (please report this)",
                panic_text(payload.as_ref())
            )));
            on_panic
        }
    }
}

/// Runs a status-returning body: 0 on success, -1 with the last error set on failure or panic.
pub fn status(name: &str, f: impl FnOnce() -> FfiResult<()>) -> i32 {
    guard(name, -1, || match f() {
        Ok(()) => 0,
        Err(e) => {
            set_last_error(&e.message);
            -1
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_turns_a_panic_into_the_failure_value() {
        let v = guard("test_fn", -1, || -> i32 { panic!("boom") });
        assert_eq!(v, -1);
        let e = last_error();
        assert!(
            e.contains("internal error in test_fn") && e.contains("boom"),
            "{e}"
        );
    }

    #[test]
    fn last_error_is_per_thread_and_nul_safe() {
        set_last_error("a\0b");
        assert_eq!(last_error(), "a\u{fffd}b");
        let other = std::thread::spawn(last_error).join().unwrap();
        assert_eq!(other, "");
        assert_eq!(status("s", || Err(FfiError::new("bad"))), -1);
        assert_eq!(last_error(), "bad");
        assert_eq!(status("s", || Ok(())), 0);
        assert_eq!(last_error(), "bad");
    }
}
