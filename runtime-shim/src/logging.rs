//! runc-style logging: `--log FILE` and `--log-format text|json`. Engines (conmon,
//! containerd-shim-runc-v2) read the last error from the log file, so errors are written there
//! as well as to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

struct Sink {
    path: Option<PathBuf>,
    format: LogFormat,
    debug: bool,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Sets where log lines go (call once, from `main`).
pub fn init(path: Option<PathBuf>, format: LogFormat, debug: bool) {
    *SINK.lock().unwrap_or_else(|p| p.into_inner()) = Some(Sink {
        path,
        format,
        debug,
    });
}

/// Formats one log line.
pub fn format_line(format: LogFormat, level: &str, msg: &str, time: &str) -> String {
    match format {
        LogFormat::Json => {
            serde_json::json!({"level": level, "msg": msg, "time": time}).to_string()
        }
        LogFormat::Text => format!("time=\"{time}\" level={level} msg={msg:?}"),
    }
}

/// Logs a message at `level` (`debug`, `info`, `warning`, `error`); `debug` lines only with
/// `--debug`. Without `--log`, warnings and errors go to stderr.
pub fn log(level: &str, msg: &str) {
    let guard = SINK.lock().unwrap_or_else(|p| p.into_inner());
    let (path, format, debug) = match guard.as_ref() {
        Some(s) => (s.path.clone(), s.format, s.debug),
        None => (None, LogFormat::Text, false),
    };
    drop(guard);
    if level == "debug" && !debug {
        return;
    }
    match path {
        Some(path) => {
            let line = format_line(format, level, msg, &crate::state::now_rfc3339());
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
        None if level != "info" => eprintln!("husk: {level}: {msg}"),
        None => {}
    }
}

pub fn warn(msg: &str) {
    log("warning", msg);
}

pub fn debug(msg: &str) {
    log("debug", msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_runc_shapes() {
        assert_eq!(
            format_line(LogFormat::Json, "error", "boom", "T"),
            r#"{"level":"error","msg":"boom","time":"T"}"#
        );
        assert_eq!(
            format_line(LogFormat::Text, "warning", "a \"b\"", "T"),
            r#"time="T" level=warning msg="a \"b\"""#
        );
    }
}
