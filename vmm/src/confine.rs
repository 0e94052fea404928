//! What `husk-vmm` keeps of root's power once the microVM is built, before the guest runs its
//! first instruction (the confinement that `../shared/DESIGN.md` describes).
//!
//! - **The jail** ([`crate::jail`]): new mount, ipc and uts namespaces, a root that holds only
//!   what husk-vmm still reaches by path, and no reach to the host's abstract sockets (Landlock
//!   scopes, or a new network namespace where the kernel has none).
//! - **Capabilities**: every capability outside [`KEPT`] leaves the bounding, permitted,
//!   effective, inheritable and ambient sets of the process's threads, for good. The kept ones
//!   are what the file server needs to act as the guest's users on the share; each says why.
//!   vCPU threads and the device thread then drop even those ([`drop_all_in_this_thread`]):
//!   they run KVM, the devices' register handlers and every device but virtio-fs, which need
//!   none. The file server has a thread of its own, which keeps them.
//! - **`no_new_privs`**: nothing husk-vmm could execute would gain privileges.
//!
//! - **seccomp**: then every thread is held to its kind's list of system calls
//!   ([`crate::seccomp`]).
//!
//! - **An unprivileged uid** (given `--userns-fd`): once in the jail, husk-vmm joins the user
//!   namespace the runtime made ([`crate::userns`]) and runs as host uid `base`; the kept
//!   capabilities then act only on the idmapped mounts of its share and jail.
//!
//! The pid namespace is made by the runtime, which spawns husk-vmm in it.

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities husk-vmm keeps after [`drop_privileges`], and who needs each.
pub const KEPT: &[(Capability, &str)] = &[
    (
        Capability::CAP_CHOWN,
        "the file server gives files the owner and group the guest asks for (`chown` in the \
         container)",
    ),
    (
        Capability::CAP_DAC_OVERRIDE,
        "the file server opens and writes files for the guest's root whatever their mode, as \
         root in a container may",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "the file server reads and searches directories for the guest's root whatever their \
         mode",
    ),
    (
        Capability::CAP_FOWNER,
        "the file server changes mode and times of files the guest's root does not own",
    ),
    (
        Capability::CAP_SETGID,
        "the file server takes on each request's group (setresgid on its thread), so that the \
         host's permission checks and new files' groups are the guest user's",
    ),
    (
        Capability::CAP_SETUID,
        "the file server takes on each request's user (setresuid on its thread), so that the \
         host's permission checks and new files' owners are the guest user's",
    ),
];

/// Errors of [`drop_privileges`].
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// A capability set could not be changed.
    #[error("cannot drop capabilities ({what})")]
    Caps {
        what: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    /// A seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The jail could not be entered.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// husk-vmm's user namespace could not be joined.
    #[error("cannot run as an unprivileged uid in its user namespace ({0})")]
    Userns(#[source] std::io::Error),
}

/// The whole confinement, once the microVM is built: the jail ([`crate::jail::enter`]), its
/// user namespace if it has one ([`crate::userns::enter`]), then [`drop_privileges`], then
/// the process's seccomp list ([`crate::seccomp::confine_process`]), before any thread that
/// serves the guest starts. The device and vCPU threads narrow themselves further when they
/// start.
///
/// A husk-vmm without `CAP_SYS_ADMIN` (not started by root) cannot build the jail: it says so
/// in its log and goes on with the rest.
pub fn confine(
    jail: &crate::jail::JailPlan,
    seccomp_report: Option<&std::path::Path>,
) -> Result<ConfineTimes, ConfineError> {
    let start = std::time::Instant::now();
    let micros =
        |start: std::time::Instant| u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut jail_us = None;
    let mut jail_sockets = None;
    if crate::jail::possible() {
        jail_sockets = Some(crate::jail::enter(jail)?);
        if let Some(userns) = jail.userns {
            // SAFETY: the descriptor was inherited for this and stays open.
            let userns = unsafe { std::os::fd::BorrowedFd::borrow_raw(userns) };
            crate::userns::enter(userns).map_err(ConfineError::Userns)?;
        }
        jail_us = Some(micros(start));
    } else if jail.userns.is_some() {
        return Err(ConfineError::Userns(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "joining it needs root (CAP_SYS_ADMIN)",
        )));
    } else {
        tracing::warn!(
            "husk-vmm runs without its jail: building it needs root (CAP_SYS_ADMIN); the \
             capability drop and the seccomp filters still apply"
        );
    }
    drop_privileges()?;
    crate::seccomp::confine_process(seccomp_report)?;
    crate::jail::test_hook_abstract_socket();
    Ok(ConfineTimes {
        jail_us,
        total_us: micros(start),
        jail_sockets,
    })
}

/// How long [`confine`] took, in microseconds, and how the jail scoped abstract sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfineTimes {
    /// Entering the jail (none without one).
    pub jail_us: Option<u64>,
    /// The whole confinement.
    pub total_us: u64,
    /// How the jail kept the host's abstract sockets out of reach (none without a jail).
    pub jail_sockets: Option<crate::jail::SocketScope>,
}

impl ConfineTimes {
    /// Records these times in a VM's boot timeline.
    pub fn record(self, timeline: &crate::timeline::TimelineRecorder) {
        timeline.update(|t| {
            t.jail_us = self.jail_us;
            t.confine_us = Some(self.total_us);
            t.jail_sockets = self.jail_sockets.map(|s| s.name().to_string());
        });
    }
}

fn caps_err(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> ConfineError {
    move |source| ConfineError::Caps { what, source }
}

/// The kept capabilities, as a set.
pub fn kept() -> CapsHashSet {
    KEPT.iter().map(|(cap, _)| *cap).collect()
}

/// The kept capabilities as the bit mask `/proc/PID/status` shows (`CapEff`).
pub fn kept_mask() -> u64 {
    KEPT.iter().fold(0, |mask, (cap, _)| mask | cap.bitmask())
}

/// Drops every capability outside [`KEPT`] from the calling thread and, through the bounding
/// set, from everything it later starts; clears the ambient and inheritable sets; sets
/// `no_new_privs`. Call it on the main thread before any other thread starts: threads inherit
/// the sets of the thread that creates them. A process that never had the capabilities (not
/// root) keeps what it had, minus what it may drop.
pub fn drop_privileges() -> Result<(), ConfineError> {
    let kept = kept();
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_err("read permitted"))?;
    // Dropping from the bounding set needs CAP_SETPCAP, which goes last.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::runtime::thread_all_supported() {
            if !kept.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(caps_err("bounding"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("inheritable"))?;
    let keep: CapsHashSet = permitted.intersection(&kept).copied().collect();
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err("effective"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("permitted"))?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and sets a flag of the calling thread,
    // which the threads and processes it starts inherit.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if ret != 0 {
        return Err(ConfineError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Empties the calling thread's capability sets (a vCPU thread's, the device thread's). Other
/// threads keep theirs.
pub fn drop_all_in_this_thread() -> Result<(), ConfineError> {
    caps::clear(None, CapSet::Effective).map_err(caps_err("effective"))?;
    caps::clear(None, CapSet::Permitted).map_err(caps_err("permitted"))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_set_is_the_file_servers() {
        // CHOWN 0, DAC_OVERRIDE 1, DAC_READ_SEARCH 2, FOWNER 3, SETGID 6, SETUID 7.
        assert_eq!(kept_mask(), 0xcf);
        assert_eq!(kept().len(), KEPT.len());
    }

    /// In a thread of its own (capabilities are per thread; the bounding set is not touched
    /// without CAP_SETPCAP in the permitted set, which this test drops first).
    #[test]
    fn a_thread_drops_all_it_had() {
        std::thread::spawn(|| {
            drop_all_in_this_thread().unwrap();
            assert!(caps::read(None, CapSet::Effective).unwrap().is_empty());
            assert!(caps::read(None, CapSet::Permitted).unwrap().is_empty());
        })
        .join()
        .unwrap();
    }
}
