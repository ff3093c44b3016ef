//! Leveled, structured logs on stderr (or stdout, `--log-outputs stdout`), shaped as etcd's zap
//! logger writes them.
//!
//! JSON (etcd 3.5's default `--log-format json`, and 3.4's `--logger zap`) is one object per
//! line: `{"level":"info","ts":"2024-01-02T03:04:05.678Z","caller":"node/recovery.rs:164",
//! "msg":"...", fields...}`; console is zap's tab-separated `ts LEVEL caller msg {fields}`.
//! Field keys are written as etcd's, in kebab case: `data_dir = ..` becomes `"data-dir"`.
//!
//! The level and format are process-wide atomics set once by [`init`]; a disabled level costs
//! one atomic load and builds nothing. A line is formatted whole and written with one call so
//! that lines from different cores never interleave.

pub use serde_json::Value;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// etcd's `--log-level` values, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
    Panic,
    Fatal,
}

const LEVELS: [Level; 6] = [
    Level::Debug,
    Level::Info,
    Level::Warn,
    Level::Error,
    Level::Panic,
    Level::Fatal,
];

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
            Level::Panic => "panic",
            Level::Fatal => "fatal",
        }
    }

    pub fn parse(text: &str) -> Result<Level, String> {
        LEVELS
            .into_iter()
            .find(|level| level.name() == text)
            .ok_or_else(|| {
                format!("--log-level {text}: expected debug, info, warn, error, panic or fatal")
            })
    }
}

/// etcd 3.5's `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Format {
    Json,
    Console,
}

impl Format {
    pub fn parse(text: &str) -> Result<Format, String> {
        match text {
            "json" => Ok(Format::Json),
            "console" => Ok(Format::Console),
            _ => Err(format!("--log-format {text}: expected json or console")),
        }
    }
}

/// etcd's `--log-outputs` targets ferrocd has: `default` and `stderr` are stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Output {
    Stderr,
    Stdout,
}

impl Output {
    pub fn parse(text: &str) -> Result<Output, String> {
        match text {
            "default" | "stderr" => Ok(Output::Stderr),
            "stdout" => Ok(Output::Stdout),
            _ => Err(format!(
                "--log-outputs {text}: expected default, stderr or stdout (no log files)"
            )),
        }
    }
}

static MIN_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static FORMAT: AtomicU8 = AtomicU8::new(Format::Json as u8);
static OUTPUT: AtomicU8 = AtomicU8::new(Output::Stderr as u8);

/// Sets the process's level and format, routes the storage engine's notices here, and makes a
/// panic a log line too (so that every stderr line is one), with zap's `stacktrace` field.
pub fn init(level: Level, format: Format, output: Output) {
    MIN_LEVEL.store(level as u8, Ordering::Relaxed);
    FORMAT.store(format as u8, Ordering::Relaxed);
    OUTPUT.store(output as u8, Ordering::Relaxed);
    ferrocd_engine::notice::set_hook(engine_notice);
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        let stacktrace = std::backtrace::Backtrace::capture().to_string();
        crate::log_at!(
            Level::Panic,
            "panic",
            error = info.to_string(),
            thread = thread,
            stacktrace = stacktrace,
        );
    }));
}

pub fn enabled(level: Level) -> bool {
    level as u8 >= MIN_LEVEL.load(Ordering::Relaxed)
}

fn engine_notice(notice: &ferrocd_engine::notice::Notice<'_>) {
    use ferrocd_engine::notice::Severity;
    let level = match notice.severity {
        Severity::Info => Level::Info,
        Severity::Warn => Level::Warn,
        Severity::Error => Level::Error,
    };
    if enabled(level) {
        let fields: Vec<(&str, Value)> = notice
            .fields
            .iter()
            .map(|(key, value)| (*key, Value::from(value.as_str())))
            .collect();
        emit(level, "engine", 0, notice.message, &fields);
    }
}

/// Writes one line. Called by the macros, which check [`enabled`] first.
pub fn emit(level: Level, file: &str, line: u32, msg: &str, fields: &[(&str, Value)]) {
    let ts = rfc3339_utc_ms(SystemTime::now());
    let caller = match line {
        0 => file.to_string(),
        _ => format!("{}:{line}", short_caller(file)),
    };
    let text = match FORMAT.load(Ordering::Relaxed) {
        f if f == Format::Console as u8 => console_line(level, &ts, &caller, msg, fields),
        _ => json_line(level, &ts, &caller, msg, fields),
    };
    // stderr is unbuffered and stdout flushes at each newline: one write per line. A failed
    // write has nowhere to be reported.
    let _ = match OUTPUT.load(Ordering::Relaxed) {
        o if o == Output::Stdout as u8 => std::io::stdout().lock().write_all(text.as_bytes()),
        _ => std::io::stderr().lock().write_all(text.as_bytes()),
    };
}

/// Keys in zap's order (level, ts, caller, msg, then the fields as given), which a JSON map
/// would sort.
fn json_line(level: Level, ts: &str, caller: &str, msg: &str, fields: &[(&str, Value)]) -> String {
    let fixed = [
        ("level", level.name()),
        ("ts", ts),
        ("caller", caller),
        ("msg", msg),
    ];
    let fixed = fixed.map(|(key, text)| (key.to_string(), Value::from(text)));
    let kebab = fields
        .iter()
        .map(|(key, value)| (key.replace('_', "-"), value.clone()));
    let members: Vec<String> = fixed
        .into_iter()
        .chain(kebab)
        .map(|(key, value)| format!("{}:{value}", Value::from(key)))
        .collect();
    format!("{{{}}}\n", members.join(","))
}

fn console_line(
    level: Level,
    ts: &str,
    caller: &str,
    msg: &str,
    fields: &[(&str, Value)],
) -> String {
    let level = level.name().to_uppercase();
    let mut line = format!("{ts}\t{level}\t{caller}\t{msg}");
    if !fields.is_empty() {
        let object: serde_json::Map<String, Value> = fields
            .iter()
            .map(|(key, value)| (key.replace('_', "-"), value.clone()))
            .collect();
        line.push('\t');
        line.push_str(&Value::Object(object).to_string());
    }
    line.push('\n');
    line
}

/// `net/src/node/recovery.rs` -> `node/recovery.rs`, as zap's short caller keeps the package.
fn short_caller(file: &str) -> &str {
    file.rsplit_once("src/").map_or(file, |(_, rest)| rest)
}

/// `2024-01-02T03:04:05.678Z`: zap's ISO 8601 time as etcd configures it (UTC, milliseconds).
fn rfc3339_utc_ms(now: SystemTime) -> String {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        since_epoch.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `log_at!(Level::Info, "msg", key = value, ...)`: a line at `level` with `key`s (kebab-cased)
/// and values (anything `serde_json::Value: From` takes: numbers, strings, bools, vectors).
#[macro_export]
macro_rules! log_at {
    ($level:expr, $msg:expr $(, $key:ident = $value:expr)* $(,)?) => {
        if $crate::log::enabled($level) {
            $crate::log::emit(
                $level,
                file!(),
                line!(),
                &$msg,
                &[$((stringify!($key), $crate::log::Value::from($value))),*],
            );
        }
    };
}

#[macro_export]
macro_rules! debug {
    ($($args:tt)*) => { $crate::log_at!($crate::log::Level::Debug, $($args)*) };
}

#[macro_export]
macro_rules! info {
    ($($args:tt)*) => { $crate::log_at!($crate::log::Level::Info, $($args)*) };
}

#[macro_export]
macro_rules! warn {
    ($($args:tt)*) => { $crate::log_at!($crate::log::Level::Warn, $($args)*) };
}

#[macro_export]
macro_rules! error {
    ($($args:tt)*) => { $crate::log_at!($crate::log::Level::Error, $($args)*) };
}

#[macro_export]
macro_rules! fatal {
    ($($args:tt)*) => { $crate::log_at!($crate::log::Level::Fatal, $($args)*) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let at = |secs: u64, ms: u64| {
            rfc3339_utc_ms(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_704_164_645, 678), "2024-01-02T03:04:05.678Z");
        assert_eq!(at(4_102_444_799, 999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn json_lines_carry_zap_keys_and_kebab_case_fields() {
        let fields = [("data_dir", Value::from("/d")), ("shards", Value::from(4))];
        let line = json_line(Level::Warn, "T", "server.rs:1", "m \"q\"", &fields);
        assert!(line.ends_with('\n'));
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["level"], "warn");
        assert_eq!(parsed["ts"], "T");
        assert_eq!(parsed["caller"], "server.rs:1");
        assert_eq!(parsed["msg"], "m \"q\"");
        assert_eq!(parsed["data-dir"], "/d");
        assert_eq!(parsed["shards"], 4);
        assert!(
            line.starts_with(r#"{"level":"warn","ts":"T","caller""#),
            "{line}"
        );
    }

    #[test]
    fn levels_parse_as_etcd_names_them() {
        for level in LEVELS {
            assert_eq!(Level::parse(level.name()), Ok(level));
        }
        assert!(Level::parse("verbose").is_err());
        assert!(Format::parse("text").is_err());
        assert_eq!(short_caller("net/src/node/shard.rs"), "node/shard.rs");
    }
}
