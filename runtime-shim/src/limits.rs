//! The open-file limit `husk` needs: it and the husk-vmm it starts (which inherits the limit)
//! hold a few dozen descriptors while a container runs, and cleaning up after a failure needs
//! some too. Under a lower limit a command would fail half way, where a failure can leave
//! state behind; so it is refused before anything is touched, naming the limit.

use anyhow::{bail, Result};

/// The fewest open files `husk` starts a command with. A cold-booting husk-vmm with every
/// device (each holds eventfds for its queues, activation and interrupt; the balloon five) came
/// to about 65 in the rig, failing under 64; 96 leaves room.
pub const MIN_OPEN_FILES: u64 = 96;

/// Raises the soft `RLIMIT_NOFILE` to [`MIN_OPEN_FILES`] when it is lower and the hard limit
/// allows; fails, naming both limits, when the hard limit is lower still.
pub fn ensure_open_files() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "cannot read RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
    }
    check(limit.rlim_cur, limit.rlim_max)?;
    if limit.rlim_cur < MIN_OPEN_FILES {
        limit.rlim_cur = MIN_OPEN_FILES;
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            bail!(
                "cannot raise RLIMIT_NOFILE to {MIN_OPEN_FILES}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Whether a soft and hard limit allow [`MIN_OPEN_FILES`].
fn check(soft: u64, hard: u64) -> Result<()> {
    if hard < MIN_OPEN_FILES {
        bail!(
            "too few open files allowed (RLIMIT_NOFILE soft {soft}, hard {hard}): husk and the \
             husk-vmm it starts need at least {MIN_OPEN_FILES}; raise the limit (ulimit -n)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_limit_below_the_minimum_is_refused_by_name() {
        let err = check(5, 5).expect_err("5 is too few");
        let msg = format!("{err:#}");
        assert!(msg.contains("RLIMIT_NOFILE soft 5, hard 5"), "{msg}");
        assert!(msg.contains("at least 96"), "{msg}");
        assert!(
            check(10, MIN_OPEN_FILES).is_ok(),
            "the soft limit can be raised"
        );
        assert!(check(1024, 1_048_576).is_ok());
    }
}
