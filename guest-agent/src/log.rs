//! Minimal logging for PID 1: records go to `/dev/kmsg` (the kernel log, visible on the debug
//! console and in `dmesg`) once it is open, to standard error before that or outside a guest.
//!
//! Logging never fails the caller: a record that cannot be written is dropped.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::OnceLock;

static KMSG: OnceLock<File> = OnceLock::new();

/// Severity of a record, with its syslog priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
}

impl Level {
    fn priority(self) -> u8 {
        match self {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
        }
    }
}

/// Sends later records to `/dev/kmsg` (call once `/dev` is mounted). Returns whether it is open.
pub fn use_kmsg() -> bool {
    if KMSG.get().is_some() {
        return true;
    }
    match OpenOptions::new().write(true).open("/dev/kmsg") {
        Ok(file) => {
            // A concurrent caller may have won; either file is fine.
            let _ = KMSG.set(file);
            true
        }
        Err(err) => {
            write(
                Level::Warn,
                format_args!("cannot open /dev/kmsg, logging to stderr: {err}"),
            );
            false
        }
    }
}

/// Writes one record.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    match KMSG.get() {
        // One write(2) per record: /dev/kmsg takes each write as one record.
        Some(mut kmsg) => {
            let record = format!("<{}>husk-agent: {args}\n", level.priority());
            let _ = kmsg.write_all(record.as_bytes());
        }
        None => {
            let record = format!("husk-agent: {}: {args}\n", level.name());
            let _ = std::io::stderr().lock().write_all(record.as_bytes());
        }
    }
}

/// Logs an error: `log_error!("mount {} failed: {err}", path)`.
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($arg)*)) };
}

/// Logs a warning.
#[macro_export]
macro_rules! log_warn {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($arg)*)) };
}

/// Logs an informational record.
#[macro_export]
macro_rules! log_info {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($arg)*)) };
}
