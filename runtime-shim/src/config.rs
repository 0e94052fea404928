//! husk's host configuration: `/etc/husk/config.toml` (or `$HUSK_CONFIG`), all optional.
//!
//! A TOML file (read with the `toml` crate); unknown keys are errors:
//!
//! ```toml
//! kernel = "/usr/local/share/husk/vmlinux"
//! initramfs = "/usr/local/share/husk/initramfs.cpio"
//! vmm = "/usr/local/bin/husk-vmm"
//! default_vcpus = 1
//! default_mem_mib = 256
//! agent_timeout_ms = 120000
//! debug = false
//! warm_start = true          # start sandboxes from templates (see `crate::template`)
//! template_dir = "/var/lib/husk/templates"
//! fs_cache = "auto"          # how long the guest caches the container's files (`crate::share::FsCache`)
//! vmm_userns = true          # husk-vmm runs as an unprivileged uid (`husk_vmm::userns`)
//! vmm_uid_base = 1879048192  # the first host uid and gid of its range of 2^28
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

/// The file as written; every key optional.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    vmm: Option<PathBuf>,
    default_vcpus: Option<u8>,
    default_mem_mib: Option<u32>,
    agent_timeout_ms: Option<u64>,
    debug: Option<bool>,
    warm_start: Option<bool>,
    template_dir: Option<PathBuf>,
    fs_cache: Option<crate::share::FsCache>,
    vmm_userns: Option<bool>,
    vmm_uid_base: Option<u32>,
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
    /// Start sandboxes from templates (on by default).
    pub warm_start: bool,
    /// Where templates live (default [`crate::template::DEFAULT_TEMPLATE_DIR`]).
    pub template_dir: Option<PathBuf>,
    /// How long the guest caches the container's files (`auto` by default).
    pub fs_cache: crate::share::FsCache,
    /// husk-vmm runs as an unprivileged uid in a user namespace of its own, where the host
    /// allows (on by default; see [`husk_vmm::userns`]).
    pub vmm_userns: bool,
    /// The first host id the namespace maps its ids 0 to 2^28 - 1 onto.
    pub vmm_uid_base: u32,
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
            warm_start: true,
            template_dir: None,
            fs_cache: crate::share::FsCache::Auto,
            vmm_userns: true,
            vmm_uid_base: husk_vmm::userns::DEFAULT_UID_BASE,
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

    /// Parses the file's text (TOML; unknown keys are errors, so a typo is not ignored).
    pub fn parse(path: &Path, text: &str) -> Result<HuskConfig, HuskConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |span| {
                let before = text.get(..span.start).unwrap_or(text);
                before.matches('\n').count() + 1
            });
            HuskConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                message: e.message().to_string(),
            }
        })?;
        let defaults = HuskConfig::default();
        Ok(HuskConfig {
            kernel: file.kernel,
            initramfs: file.initramfs,
            vmm: file.vmm,
            default_vcpus: file.default_vcpus.unwrap_or(defaults.default_vcpus),
            default_mem_mib: file.default_mem_mib.unwrap_or(defaults.default_mem_mib),
            agent_timeout: file
                .agent_timeout_ms
                .map_or(defaults.agent_timeout, Duration::from_millis),
            debug: file.debug.unwrap_or(defaults.debug),
            warm_start: file.warm_start.unwrap_or(defaults.warm_start),
            template_dir: file.template_dir,
            fs_cache: file.fs_cache.unwrap_or(defaults.fs_cache),
            vmm_userns: file.vmm_userns.unwrap_or(defaults.vmm_userns),
            vmm_uid_base: file.vmm_uid_base.unwrap_or(defaults.vmm_uid_base),
        })
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
warm_start = false
template_dir = "/t"
fs_cache = "short"
vmm_userns = false
vmm_uid_base = 65536
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
                warm_start: false,
                template_dir: Some("/t".into()),
                fs_cache: crate::share::FsCache::Short,
                vmm_userns: false,
                vmm_uid_base: 65536,
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
        assert!(
            matches!(err, HuskConfigError::Syntax { line: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("c.toml:2: "), "{err}");
        let err =
            HuskConfig::parse(Path::new("c.toml"), "debug = true\ncolour = 1").expect_err("bad");
        assert!(
            matches!(err, HuskConfigError::Syntax { line: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("colour"), "{err}");
        let err = HuskConfig::parse(Path::new("c.toml"), "default_vcpus = 300").expect_err("bad");
        assert!(err.to_string().starts_with("c.toml:1: "), "{err}");
        let err = HuskConfig::parse(Path::new("c.toml"), "fs_cache = \"long\"").expect_err("bad");
        assert!(err.to_string().contains("auto"), "{err}");
    }
}
