//! husk's host configuration: `/etc/husk/config.toml` (or `$HUSK_CONFIG`), all optional.
//!
//! Only flat `key = value` lines are read (strings in double quotes, integers, booleans, `#`
//! comments), which is all this file needs:
//!
//! ```toml
//! kernel = "/usr/local/share/husk/vmlinux"
//! initramfs = "/usr/local/share/husk/initramfs.cpio"
//! vmm = "/usr/local/bin/husk-vmm"
//! default_vcpus = 1
//! default_mem_mib = 256
//! agent_timeout_ms = 120000
//! debug = false
//! ```
//!
//! Kernel and initramfs, when not configured: `/usr/local/share/husk/{vmlinux,initramfs.cpio}`
//! if they exist, else `$HUSK_KERNEL` / `$HUSK_INITRAMFS`.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration file read when `$HUSK_CONFIG` is not set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/config.toml";
/// Where an installed kernel and initramfs live.
pub const DEFAULT_SHARE_DIR: &str = "/usr/local/share/husk";

/// Errors of reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum HuskConfigError {
    #[error("{path}: cannot read it")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("no guest kernel: set `kernel` in {DEFAULT_CONFIG_PATH}, install {DEFAULT_SHARE_DIR}/vmlinux, or set HUSK_KERNEL")]
    NoKernel,
    #[error("no guest initramfs: set `initramfs` in {DEFAULT_CONFIG_PATH}, install {DEFAULT_SHARE_DIR}/initramfs.cpio, or set HUSK_INITRAMFS")]
    NoInitramfs,
}

/// The configuration, with defaults for what the file leaves out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HuskConfig {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
    pub default_vcpus: u8,
    pub default_mem_mib: u32,
    pub agent_timeout: Duration,
    pub debug: bool,
}

impl Default for HuskConfig {
    fn default() -> Self {
        HuskConfig {
            kernel: None,
            initramfs: None,
            vmm: None,
            default_vcpus: 1,
            default_mem_mib: 256,
            // Generous: an emulated test rig boots ~20x slower than hardware.
            agent_timeout: Duration::from_secs(120),
            debug: false,
        }
    }
}

impl HuskConfig {
    /// Reads `$HUSK_CONFIG` or [`DEFAULT_CONFIG_PATH`]; a missing file means defaults.
    pub fn load() -> Result<HuskConfig, HuskConfigError> {
        let path = std::env::var_os("HUSK_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        match std::fs::read_to_string(&path) {
            Ok(text) => HuskConfig::parse(&path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HuskConfig::default()),
            Err(source) => Err(HuskConfigError::Read { path, source }),
        }
    }

    /// Parses the file's text.
    pub fn parse(path: &Path, text: &str) -> Result<HuskConfig, HuskConfigError> {
        let mut cfg = HuskConfig::default();
        for (index, raw) in text.lines().enumerate() {
            let err = |message: String| HuskConfigError::Syntax {
                path: path.to_path_buf(),
                line: index + 1,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| err("expected key = value".into()))?;
            let key = key.trim();
            let value = value.trim();
            let value = match value.find(" #") {
                Some(i) if !value.starts_with('"') => value[..i].trim(),
                _ => value,
            };
            let string = || -> Result<String, HuskConfigError> {
                value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .map(str::to_string)
                    .ok_or_else(|| err(format!("{key}: expected a \"quoted string\"")))
            };
            let number = || -> Result<u64, HuskConfigError> {
                value
                    .parse::<u64>()
                    .map_err(|_| err(format!("{key}: expected a number")))
            };
            match key {
                "kernel" => cfg.kernel = Some(string()?.into()),
                "initramfs" => cfg.initramfs = Some(string()?.into()),
                "vmm" => cfg.vmm = Some(string()?.into()),
                "default_vcpus" => {
                    cfg.default_vcpus = u8::try_from(number()?)
                        .map_err(|_| err("default_vcpus: too large".into()))?
                }
                "default_mem_mib" => {
                    cfg.default_mem_mib = u32::try_from(number()?)
                        .map_err(|_| err("default_mem_mib: too large".into()))?
                }
                "agent_timeout_ms" => cfg.agent_timeout = Duration::from_millis(number()?),
                "debug" => {
                    cfg.debug = match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(err("debug: expected true or false".into())),
                    }
                }
                other => return Err(err(format!("unknown key {other:?}"))),
            }
        }
        Ok(cfg)
    }

    /// The guest kernel: configured, installed, or `$HUSK_KERNEL`.
    pub fn kernel_path(&self) -> Result<PathBuf, HuskConfigError> {
        pick(&self.kernel, "vmlinux", "HUSK_KERNEL").ok_or(HuskConfigError::NoKernel)
    }

    /// The guest initramfs: configured, installed, or `$HUSK_INITRAMFS`.
    pub fn initramfs_path(&self) -> Result<PathBuf, HuskConfigError> {
        pick(&self.initramfs, "initramfs.cpio", "HUSK_INITRAMFS")
            .ok_or(HuskConfigError::NoInitramfs)
    }

    /// The `husk-vmm` binary: configured, next to this `husk`, else from `$PATH`.
    pub fn vmm_path(&self) -> PathBuf {
        if let Some(vmm) = &self.vmm {
            return vmm.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("husk-vmm")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("husk-vmm"))
    }
}

fn pick(configured: &Option<PathBuf>, installed: &str, env: &str) -> Option<PathBuf> {
    if let Some(path) = configured {
        return Some(path.clone());
    }
    let installed = Path::new(DEFAULT_SHARE_DIR).join(installed);
    if installed.exists() {
        return Some(installed);
    }
    std::env::var_os(env).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_read() {
        let text = r#"
# husk
kernel = "/k"
initramfs = "/i"
vmm = "/v"
default_vcpus = 2 # two
default_mem_mib = 512
agent_timeout_ms = 5000
debug = true
"#;
        let cfg = HuskConfig::parse(Path::new("c.toml"), text).expect("valid");
        assert_eq!(
            cfg,
            HuskConfig {
                kernel: Some("/k".into()),
                initramfs: Some("/i".into()),
                vmm: Some("/v".into()),
                default_vcpus: 2,
                default_mem_mib: 512,
                agent_timeout: Duration::from_millis(5000),
                debug: true,
            }
        );
        assert_eq!(cfg.kernel_path().expect("configured"), Path::new("/k"));
    }

    #[test]
    fn an_empty_file_means_defaults() {
        let cfg = HuskConfig::parse(Path::new("c.toml"), "").expect("valid");
        assert_eq!(cfg, HuskConfig::default());
    }

    #[test]
    fn errors_name_the_line() {
        let err = HuskConfig::parse(Path::new("c.toml"), "\nkernel = /k\n").expect_err("bad");
        assert_eq!(
            err.to_string(),
            "c.toml:2: kernel: expected a \"quoted string\""
        );
        let err = HuskConfig::parse(Path::new("c.toml"), "colour = 1").expect_err("bad");
        assert!(matches!(err, HuskConfigError::Syntax { line: 1, .. }));
    }
}
