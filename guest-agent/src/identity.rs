//! A guest restored from a template takes its own identity ([`Request::Renew`]).
//!
//! husk starts sandboxes by restoring a snapshot of a booted guest (a template): every sandbox
//! restored from one template starts with the same memory, so the same kernel random state,
//! the template's wall clock and no host share. Before any container exists, husk-vmm connects
//! to [`husk_agent_protocol::AGENT_IDENTITY_PORT`] (the only port it lets through until the
//! guest signals readiness again) and sends a [`Renewal`]; the agent
//! - mixes the host's fresh randomness into the kernel's pool (`RNDADDENTROPY`, credited) and
//!   forces the CRNG to reseed from it (`RNDRESEEDCRNG`): every later `getrandom`,
//!   `/dev/urandom` read and the lazily made `boot_id` differ between sandboxes;
//! - sets the wall clock (the monotonic clock continues from the template, as after a pause);
//! - sets the hostname, if the host gave one;
//! - configures the network cards, if the sandbox has some (the template's cards are down and
//!   have no address; see [`init::configure_network`]);
//! - mounts the host share (a template boot, told by [`TEMPLATE_CMDLINE_FLAG`] on the kernel
//!   command line, leaves it unmounted: its virtio-fs session is this sandbox's own);
//! - signals readiness on the host's ready port, which releases the host's other clients.
//!
//! Only PID 1 renews (the agent run on the host for tests must never touch the host's clock).
//!
//! [`Request::Renew`]: husk_agent_protocol::Request::Renew

use crate::init;
use crate::sys::LinuxSyscall;
use husk_agent_protocol::{
    Renewal, RENEWAL_MAX_ENTROPY, RENEWAL_MAX_NETWORK_PARAMS, RENEWAL_MIN_ENTROPY,
    TEMPLATE_CMDLINE_FLAG,
};
use nix::errno::Errno;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Longest hostname Linux takes (`__NEW_UTS_LEN`).
const HOSTNAME_MAX: usize = 64;

/// Whether this boot makes a template (set once by [`detect_template_boot`]).
static TEMPLATE_BOOT: AtomicBool = AtomicBool::new(false);

/// Errors of a renewal.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("only the guest's init renews the guest")]
    NotInit,
    #[error(
        "{0} bytes of entropy: a renewal carries {RENEWAL_MIN_ENTROPY} to {RENEWAL_MAX_ENTROPY}"
    )]
    EntropySize(usize),
    #[error("invalid hostname {0:?}")]
    Hostname(String),
    #[error("opening /dev/urandom failed")]
    OpenRandom(#[source] std::io::Error),
    #[error("adding entropy (RNDADDENTROPY) failed")]
    AddEntropy(#[source] Errno),
    #[error("reseeding the CRNG (RNDRESEEDCRNG) failed")]
    Reseed(#[source] Errno),
    #[error("setting the wall clock failed")]
    Clock(#[source] Errno),
    #[error("setting the hostname failed")]
    SetHostname(#[source] Errno),
    #[error("mounting the host share failed")]
    Share(#[source] init::InitError),
    #[error("bad network parameters: {0}")]
    NetworkParams(String),
    #[error("configuring the network card failed: {0}")]
    Network(String),
}

/// Longest network parameter of a renewal (`husk.route=` with two IPv6 addresses fits).
const NETWORK_PARAM_MAX: usize = 128;

/// Reads the kernel command line once: whether this boot makes a template.
pub fn detect_template_boot() -> bool {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let template = cmdline_marks_template(&cmdline);
    TEMPLATE_BOOT.store(template, Ordering::SeqCst);
    template
}

fn cmdline_marks_template(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|w| w == TEMPLATE_CMDLINE_FLAG)
}

/// Checks a renewal before anything changes.
fn validate(renewal: &Renewal) -> Result<(), RenewError> {
    let n = renewal.entropy.len();
    if !(RENEWAL_MIN_ENTROPY..=RENEWAL_MAX_ENTROPY).contains(&n) {
        return Err(RenewError::EntropySize(n));
    }
    if let Some(name) = &renewal.hostname {
        if name.is_empty() || name.len() > HOSTNAME_MAX || name.contains(['/', '\0']) {
            return Err(RenewError::Hostname(name.clone()));
        }
    }
    if renewal.network.len() > RENEWAL_MAX_NETWORK_PARAMS {
        return Err(RenewError::NetworkParams(format!(
            "{} of them, at most {RENEWAL_MAX_NETWORK_PARAMS}",
            renewal.network.len()
        )));
    }
    for param in &renewal.network {
        if param.is_empty()
            || param.len() > NETWORK_PARAM_MAX
            || param.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(RenewError::NetworkParams(format!("{param:?}")));
        }
    }
    let (_, malformed) = init::all_net_params(&renewal.network.join(" "));
    if !malformed.is_empty() {
        return Err(RenewError::NetworkParams(malformed.join("; ")));
    }
    Ok(())
}

/// Applies `renewal` (see the module docs).
pub fn renew(renewal: &Renewal) -> Result<(), RenewError> {
    if std::process::id() != 1 {
        return Err(RenewError::NotInit);
    }
    validate(renewal)?;
    add_entropy(&renewal.entropy)?;
    set_realtime(renewal.realtime_ns)?;
    if let Some(name) = &renewal.hostname {
        nix::unistd::sethostname(name).map_err(RenewError::SetHostname)?;
    }
    if TEMPLATE_BOOT.swap(false, Ordering::SeqCst) {
        match init::mount_share(&LinuxSyscall) {
            Ok(true) => {
                init::tune_share();
                crate::log_info!("host share mounted at {}", init::SHARE_MOUNT_POINT)
            }
            Ok(false) => crate::log_info!("no host share after the renewal"),
            Err(err) => return Err(RenewError::Share(err)),
        }
    }
    if !renewal.network.is_empty() {
        let failed = init::configure_network(&renewal.network.join(" "));
        if !failed.is_empty() {
            return Err(RenewError::Network(failed.join("; ")));
        }
        crate::log_info!("network cards configured");
    }
    crate::server::signal_ready_again();
    crate::log_info!("renewed: reseeded, clock set, ready");
    Ok(())
}

/// The argument of `RNDADDENTROPY`: `struct rand_pool_info` with its buffer inline.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; RENEWAL_MAX_ENTROPY],
}

fn add_entropy(entropy: &[u8]) -> Result<(), RenewError> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(RenewError::OpenRandom)?;
    let mut info = RandPoolInfo {
        // Bounded by RENEWAL_MAX_ENTROPY (validated), so these fit.
        entropy_count: (entropy.len() * 8) as libc::c_int,
        buf_size: entropy.len() as libc::c_int,
        buf: [0; RENEWAL_MAX_ENTROPY],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buffer holds buf_size bytes; `info`
    // is such a struct, alive for the call.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) };
    Errno::result(ret).map_err(RenewError::AddEntropy)?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    Errno::result(ret).map_err(RenewError::Reseed)?;
    Ok(())
}

fn set_realtime(ns: u64) -> Result<(), RenewError> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec, alive for the call.
    let ret = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    Errno::result(ret).map(drop).map_err(RenewError::Clock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renewal(entropy: usize, hostname: Option<&str>) -> Renewal {
        Renewal {
            entropy: vec![7; entropy],
            realtime_ns: 1,
            hostname: hostname.map(str::to_string),
            network: Vec::new(),
        }
    }

    #[test]
    fn template_flag_is_a_whole_word_of_the_cmdline() {
        assert!(cmdline_marks_template("quiet husk.template=1 rdinit=/init"));
        assert!(!cmdline_marks_template("quiet husk.template=10"));
        assert!(!cmdline_marks_template(""));
    }

    #[test]
    fn renewals_are_validated_before_anything_changes() {
        assert!(validate(&renewal(64, Some("sandbox"))).is_ok());
        assert!(matches!(
            validate(&renewal(8, None)),
            Err(RenewError::EntropySize(8))
        ));
        assert!(matches!(
            validate(&renewal(RENEWAL_MAX_ENTROPY + 1, None)),
            Err(RenewError::EntropySize(_))
        ));
        for bad in ["", "a/b", &"x".repeat(65)] {
            assert!(matches!(
                validate(&renewal(64, Some(bad))),
                Err(RenewError::Hostname(_))
            ));
        }
    }

    #[test]
    fn network_parameters_are_validated_before_anything_changes() {
        let with = |params: &[&str]| Renewal {
            network: params.iter().map(|p| p.to_string()).collect(),
            ..renewal(64, None)
        };
        assert!(validate(&with(&[
            "husk.mac=02:00:0a:58:00:05",
            "husk.mtu=1450",
            "husk.ip4=10.88.0.5/16",
            "husk.ip6=fd00::5/64,fd00::1",
            "husk.route=0.0.0.0/0,10.88.0.1",
            "husk.eth1.mac=02:00:0a:59:00:05",
            "husk.eth1.ip4=10.89.0.5/16",
        ]))
        .is_ok());
        for bad in [
            &["husk.mac=02:00:0a:58:00"][..],
            &["husk.mtu=9"],
            &["husk.ip4=10.88.0.5"],
            &["husk.route=10.0.0.0/8 husk.route=0.0.0.0/0,10.0.0.1"],
            &[""],
            &["husk.addr=10.0.0.3/24\n"],
            &["husk.eth1.ip4=10.89.0.5"],
        ] {
            assert!(
                matches!(validate(&with(bad)), Err(RenewError::NetworkParams(_))),
                "{bad:?}"
            );
        }
        let many = vec!["husk.addr=10.0.0.3/24"; RENEWAL_MAX_NETWORK_PARAMS + 1];
        assert!(matches!(
            validate(&with(&many)),
            Err(RenewError::NetworkParams(_))
        ));
    }

    #[test]
    fn only_pid_1_renews() {
        // The tests never run as PID 1: the host's clock and pool are never touched.
        let err = renew(&renewal(64, None)).expect_err("refused");
        assert!(matches!(err, RenewError::NotInit));
    }
}
