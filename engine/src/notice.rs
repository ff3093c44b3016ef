//! What the engine has to tell an operator: a file it removed, a fallback to buffered I/O, a
//! failure just before it aborts. A library does not print; the process that embeds it installs
//! one hook (its logger) with [`set_hook`]. Without a hook notices are dropped.
//!
//! Facts a caller gets back anyway (a torn WAL tail in [`crate::wal::Recovered`]) are not
//! notices: the caller logs them.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warn,
    Error,
}

/// One notice: a fixed message and named facts (a file, an error), as a structured log line.
#[derive(Debug)]
pub struct Notice<'a> {
    pub severity: Severity,
    pub message: &'static str,
    pub fields: &'a [(&'static str, String)],
}

pub type Hook = fn(&Notice<'_>);

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Installs the process's hook. The first one stays: a process has one logger.
pub fn set_hook(hook: Hook) {
    let _ = HOOK.set(hook);
}

pub(crate) fn notify(severity: Severity, message: &'static str, fields: &[(&'static str, String)]) {
    if let Some(hook) = HOOK.get() {
        hook(&Notice {
            severity,
            message,
            fields,
        });
    }
}
