//! The process-global registry: configuration, the backend, and one allocator per device.
//!
//! Invariants:
//! - there is one [`Registry`] per loaded copy of the library, created at the first call of
//!   any entry point; it reads the configuration from the environment then
//!   ([`Config::from_env`]); an unparsable variable is kept as an error that every call which
//!   needs the configuration returns, and that is written to stderr once;
//! - the configuration can change (`bufferheap_configure`) until it is *frozen*: by
//!   `bufferheap_init` or by the creation of the first allocator. After that it never changes,
//!   so every device's allocator runs with the same settings;
//! - the backend (kind and device count) is resolved once, at the first call that names a
//!   device; a failure (no CUDA driver, bad variable) is kept and returned by every such call;
//! - the history limit is the one setting that changes at run time (PyTorch turns recording
//!   on and off while a process runs): `bufferheap_record_history` applies it to every
//!   allocator that exists and to those created later;
//! - a device's allocator is created at most once, on first use, under a creation lock; a
//!   failed creation is not kept, so a later call tries again. Reading an existing allocator
//!   takes no lock of the registry's.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use bufferheap_core::{Allocator, Config, MAX_RATIO};
use parking_lot::Mutex;

use crate::backend::{AnyBackend, BackendChoice, BackendKind};
use crate::error::{FfiError, FfiResult, eprint_lines};

/// An allocator of one device, over the backend chosen at run time.
pub type DeviceAllocator = Allocator<AnyBackend>;

#[derive(Debug)]
struct ConfigState {
    config: Result<Config, String>,
    /// Why the configuration can no longer change; `None` while it can.
    frozen: Option<String>,
}

#[derive(Debug, Default)]
struct ChoiceState {
    preset: Option<BackendChoice>,
    taken: bool,
}

/// Everything the C ABI shares between calls and threads.
#[derive(Debug)]
pub struct Registry {
    config: Mutex<ConfigState>,
    choice: Mutex<ChoiceState>,
    system: OnceLock<Result<System, String>>,
    debug: AtomicU32,
    config_error_shown: AtomicBool,
    system_error_shown: AtomicBool,
    /// The history limit set at run time (`bufferheap_record_history`), which replaces the
    /// configuration's `history` for allocators created from then on.
    history_limit: Mutex<Option<usize>>,
}

/// The resolved backend and the device slots.
#[derive(Debug)]
pub struct System {
    pub kind: BackendKind,
    choice: BackendChoice,
    devices: Vec<OnceLock<DeviceAllocator>>,
    create: Mutex<()>,
    /// Per device, the low watermark ratio chosen by configuration or
    /// `bufferheap_set_watermarks`, once a memory fraction lowered the one in force: a
    /// fraction caps the low watermark for as long as it holds, not for good.
    chosen_low: Vec<Mutex<Option<f64>>>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// The registry of this process (created on first use).
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(Registry::from_env)
}

thread_local! {
    /// Set while a caller that reports errors itself (`bufferheap_try_malloc`) runs.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with setup errors returned but not written to stderr.
pub fn quietly<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            QUIET.with(|q| q.set(self.0));
        }
    }
    let _restore = Restore(QUIET.with(|q| q.replace(true)));
    f()
}

/// Chooses the backend from Rust before the first call that uses a device, instead of the
/// environment (`BUFFERHEAP_BACKEND`, `BUFFERHEAP_HOST_DEVICES`, `BUFFERHEAP_HOST_MEMORY`).
/// An error once the backend has been resolved.
pub fn select_backend(choice: BackendChoice) -> Result<(), String> {
    let reg = registry();
    let mut state = reg.choice.lock();
    if state.taken {
        return Err(
            "bufferheap: the backend is already chosen; select_backend must come \
                    before the first call that uses a device"
                .into(),
        );
    }
    state.preset = Some(choice);
    Ok(())
}

fn check_ratio(key: &str, value: Option<f64>) -> FfiResult<()> {
    match value {
        Some(r) if r > MAX_RATIO => Err(FfiError::new(format!(
            "bufferheap_configure: invalid value {r} for {key}: must be between 0.0 (disabled) \
             and {MAX_RATIO}"
        ))),
        _ => Ok(()),
    }
}

impl Registry {
    fn from_env() -> Registry {
        Registry::new(Config::from_env().map_err(|e| {
            format!(
                "bufferheap: {e}; fix or unset the variable (the allocator cannot start until \
                 then)"
            )
        }))
    }

    fn new(config: Result<Config, String>) -> Registry {
        Registry {
            config: Mutex::new(ConfigState {
                config,
                frozen: None,
            }),
            choice: Mutex::new(ChoiceState::default()),
            system: OnceLock::new(),
            debug: AtomicU32::new(0),
            config_error_shown: AtomicBool::new(false),
            system_error_shown: AtomicBool::new(false),
            history_limit: Mutex::new(None),
        }
    }

    /// A setup error: written to stderr the first time it is met (and marked so), returned
    /// every time. Not written inside [`quietly`]: such a caller reports it itself.
    fn setup_error(shown: &AtomicBool, message: &str) -> FfiError {
        let error = FfiError::new(message);
        if QUIET.with(Cell::get) || shown.swap(true, Ordering::Relaxed) {
            return error;
        }
        eprint_lines(message);
        error.shown()
    }

    fn env_error(&self, message: &str) -> FfiError {
        Self::setup_error(&self.config_error_shown, message)
    }

    /// Sets one setting (a key of [`Config::set`]); an error once the configuration is frozen.
    pub fn configure(&self, key: &str, value: &str) -> FfiResult<()> {
        self.configure_all(&[(key, value)])
    }

    /// Sets several settings at once: all of them, or none when one is refused.
    pub fn configure_all(&self, settings: &[(&str, &str)]) -> FfiResult<()> {
        let named = settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut state = self.config.lock();
        let current = match &state.config {
            Ok(c) => c.clone(),
            Err(e) => return Err(self.env_error(e)),
        };
        if let Some(reason) = &state.frozen {
            return Err(FfiError::new(format!(
                "bufferheap_configure({named}): settings must come before the first \
                 allocation; the allocator is already initialized ({reason}), so nothing was \
                 applied"
            )));
        }
        let mut next = current;
        for (key, value) in settings {
            next.set(key, value).map_err(|e| {
                FfiError::new(format!(
                    "bufferheap_configure: {e}{}",
                    if settings.len() > 1 {
                        "; none of the settings was applied"
                    } else {
                        ""
                    }
                ))
            })?;
        }
        check_ratio("low_watermark_ratio", next.low_watermark_ratio)?;
        check_ratio("high_watermark_ratio", next.high_watermark_ratio)?;
        // Against the high ratio in force: the one set, or the default it would start with.
        let high = next
            .high_watermark_ratio
            .unwrap_or(bufferheap_core::DEFAULT_HIGH);
        if let Some(low) = next.low_watermark_ratio
            && high > 0.0
            && low > high
        {
            return Err(FfiError::new(format!(
                "bufferheap_configure({named}): the low watermark ratio ({low}) must not \
                 exceed the high watermark ratio ({high}); nothing was applied"
            )));
        }
        state.config = Ok(next);
        Ok(())
    }

    /// True once the configuration is frozen (by `bufferheap_init` or a first allocator).
    pub fn initialized(&self) -> bool {
        self.config.lock().frozen.is_some()
    }

    /// The configuration as it stands (frozen or not).
    pub fn config(&self) -> FfiResult<Config> {
        match &self.config.lock().config {
            Ok(c) => Ok(c.clone()),
            Err(e) => Err(self.env_error(e)),
        }
    }

    /// Freezes the configuration (idempotent) and returns it.
    pub fn freeze(&self, reason: &str) -> FfiResult<Config> {
        let mut state = self.config.lock();
        let config = match &state.config {
            Ok(c) => c.clone(),
            Err(e) => return Err(self.env_error(e)),
        };
        if state.frozen.is_none() {
            state.frozen = Some(reason.to_owned());
            self.debug.store(config.debug, Ordering::Relaxed);
            if config.debug != 0 {
                install_debug_logging();
            }
        }
        Ok(config)
    }

    /// The debug mask in force (0 until the configuration is frozen).
    pub fn debug(&self) -> u32 {
        self.debug.load(Ordering::Relaxed)
    }

    /// The backend and its devices, resolved on first use.
    pub fn system(&self) -> FfiResult<&System> {
        let resolved = self.system.get_or_init(|| {
            let choice = {
                let mut state = self.choice.lock();
                state.taken = true;
                state.preset.clone()
            };
            let choice = match choice {
                Some(c) => c,
                None => BackendChoice::from_env().map_err(|e| format!("bufferheap: {e}"))?,
            };
            let (kind, count) = choice.resolve()?;
            Ok(System {
                kind,
                choice,
                devices: (0..count).map(|_| OnceLock::new()).collect(),
                create: Mutex::new(()),
                chosen_low: (0..count).map(|_| Mutex::new(None)).collect(),
            })
        });
        match resolved {
            Ok(system) => Ok(system),
            Err(e) => Err(Self::setup_error(&self.system_error_shown, e)),
        }
    }
}

impl System {
    /// The low watermark ratio chosen for `device` (see the field), if a fraction ever
    /// changed the one in force. `device` is a checked index.
    pub fn chosen_low(&self, device: usize) -> &Mutex<Option<f64>> {
        &self.chosen_low[device]
    }

    /// Number of devices.
    pub fn count(&self) -> usize {
        self.devices.len()
    }

    /// The index of an existing device, or an error naming the device and the count.
    pub fn check_device(&self, device: i32) -> FfiResult<usize> {
        match usize::try_from(device) {
            Ok(d) if d < self.count() => Ok(d),
            _ => Err(FfiError::new(format!(
                "bufferheap: invalid device {device}: bufferheap sees {} {} device{} \
                 (0..={})",
                self.count(),
                self.kind,
                if self.count() == 1 { "" } else { "s" },
                self.count().saturating_sub(1)
            ))),
        }
    }

    /// Devices named by `device`: one, or every device for -1.
    pub fn devices_of(&self, device: i32) -> FfiResult<std::ops::Range<usize>> {
        if device == -1 {
            Ok(0..self.count())
        } else {
            let d = self.check_device(device)?;
            Ok(d..d + 1)
        }
    }

    /// The allocator of `device` if it was created.
    pub fn existing(&self, device: usize) -> Option<&DeviceAllocator> {
        self.devices.get(device).and_then(OnceLock::get)
    }

    /// Every allocator created so far, with its device index.
    pub fn all_existing(&self) -> impl Iterator<Item = (usize, &DeviceAllocator)> {
        self.devices
            .iter()
            .enumerate()
            .filter_map(|(d, slot)| slot.get().map(|a| (d, a)))
    }

    /// The allocator of `device`, created (and the configuration frozen) on first use.
    pub fn get_or_create(&self, reg: &Registry, device: usize) -> FfiResult<&DeviceAllocator> {
        let slot = self
            .devices
            .get(device)
            .ok_or_else(|| FfiError::new(format!("bufferheap: invalid device {device}")))?;
        if let Some(a) = slot.get() {
            return Ok(a);
        }
        let _creating = self.create.lock();
        if let Some(a) = slot.get() {
            return Ok(a);
        }
        let mut config = reg.freeze(&format!("first use of device {device}"))?;
        if let Some(limit) = *reg.history_limit.lock() {
            config.history = limit;
        }
        let backend = self.choice.create(self.kind, device)?;
        let allocator = Allocator::new(backend, config).map_err(|e| {
            FfiError::new(format!(
                "bufferheap: cannot start the allocator of {} device {device}: {e}",
                self.kind
            ))
        })?;
        Ok(slot.get_or_init(|| allocator))
    }
}

impl System {
    /// Records the last `max_entries` allocator events on every device, those without an
    /// allocator yet included (0 stops and drops the history); with `clear`, a history kept
    /// so far starts afresh. Under the creation lock, so no allocator is created in between
    /// with the old limit.
    pub fn record_history(&self, reg: &Registry, max_entries: usize, clear: bool) {
        let _creating = self.create.lock();
        *reg.history_limit.lock() = Some(max_entries);
        for (_, a) in self.all_existing() {
            a.record_history(max_entries, clear);
        }
    }

    /// The history limit in force: the last one recorded at run time, else the configured.
    pub fn history_limit(&self, reg: &Registry) -> FfiResult<usize> {
        let set = *reg.history_limit.lock();
        match set {
            Some(limit) => Ok(limit),
            None => Ok(reg.config()?.history),
        }
    }
}

/// Sends the engine's log lines (target `bufferheap`) to stderr, when the debug mask asks for
/// them. Leaves an application's own subscriber in place if it has one. The engine's warning
/// on an out-of-memory failure is left out: the C ABI prints that text itself, once.
fn install_debug_logging() {
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{Layer, fmt};

    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .without_time()
        .with_level(false)
        .with_ansi(false)
        .with_target(true)
        .with_filter(filter_fn(|meta| {
            let ours = meta.target().starts_with("bufferheap");
            let oom_warning = *meta.level() == tracing::Level::WARN
                && meta.file().is_some_and(|f| f.ends_with("allocator/mod.rs"));
            ours && !oom_warning
        }));
    let subscriber = tracing_subscriber::registry().with(layer);
    let _ = tracing::subscriber::set_global_default(subscriber);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_variable_fails_every_call_that_needs_the_configuration() {
        let reg = Registry::new(Err(
            "bufferheap: invalid value \"x\" for BUFFERHEAP_POLICY".into()
        ));
        let first = reg.freeze("test").unwrap_err();
        assert!(first.shown, "the first failure is written to stderr");
        assert!(first.message.contains("BUFFERHEAP_POLICY"));
        let again = reg.configure("policy", "mps").unwrap_err();
        assert!(!again.shown, "written once only");
        assert_eq!(again.message, first.message);
        assert!(!reg.initialized());
    }

    #[test]
    fn settings_apply_until_frozen() {
        let reg = Registry::new(Ok(Config::default()));
        reg.configure("policy", "mps").unwrap();
        reg.configure("high_watermark_ratio", "1.5").unwrap();
        let e = reg.configure("low_watermark_ratio", "1.6").unwrap_err();
        assert!(e.message.contains("must not exceed"), "{e}");
        let e = reg.configure("high_watermark_ratio", "2.5").unwrap_err();
        assert!(e.message.contains("between 0.0 (disabled) and 2"), "{e}");
        let e = reg.configure("colour", "blue").unwrap_err();
        assert!(e.message.contains("unknown setting"), "{e}");
        reg.configure("debug", "0x0").unwrap();
        let frozen = reg.freeze("first use of device 0").unwrap();
        assert_eq!(frozen.policy, bufferheap_core::Policy::Mps);
        assert_eq!(frozen.high_watermark_ratio, Some(1.5));
        assert!(reg.initialized());
        let e = reg.configure("policy", "default").unwrap_err();
        assert!(
            e.message.contains("must come before the first allocation")
                && e.message.contains("first use of device 0"),
            "{e}"
        );
        assert_eq!(reg.config().unwrap().policy, bufferheap_core::Policy::Mps);
    }
}
