//! A container's cgroup and network namespace, made ahead in a template.
//!
//! Making a container's cgroup (a memory cgroup, with the other controllers) and its network
//! namespace (the kernel runs every protocol's per-namespace set-up: loopback, IPv4 and IPv6
//! with their sysctl tables, ...) are the costliest steps of its set-up in the guest. In the
//! test rig, the agent took about 190 ms to create a container in a restored guest, of which
//! these two steps took about 90 ms, most of it paid by whichever of the two came first after
//! the restore. So a template boot makes one of each ahead, before the template is taken
//! ([`make_spares`]), and the first container of a sandbox restored from it takes them
//! ([`take_netns`], [`take_cgroup`]); later containers, and a sandbox that boots, make their
//! own as before.
//!
//! What is made ahead is as new as what a container would make itself: made by the guest's
//! root, empty (the network namespace holds only `lo`, down), and nothing ever ran in it. A
//! container with a user namespace makes its own network namespace, which that user namespace
//! must own for the container's root to configure it. The cgroup made ahead is named
//! [`SPARE_CGROUP`] rather than after the container: inside a container with a cgroup
//! namespace (as engines make them) its name is never seen; without one, `/proc/self/cgroup`
//! shows it.
//!
//! Random state: every sandbox restored from a template shares the network namespace's one
//! random value drawn when it is made (`hash_mix`, mixed into its socket hashes), as they share
//! the guest's initial namespace's. The keys an attacker would want to predict
//! (`inet_ehash_secret` of the connection hashes, the IP ID key, TCP's sequence number and
//! timestamp secrets) are drawn at their first use, after the sandbox's CRNG was reseeded
//! ([`crate::identity`]).

use super::cgroup::{Cgroup, CgroupError};
use super::spec::NamespacePlan;
use nix::sched::CloneFlags;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The name of the cgroup made ahead. Container ids start with a letter or a digit
/// ([`super::check_id`]), so no container's cgroup can take it.
pub const SPARE_CGROUP: &str = ".ahead";

/// The network namespace made ahead, held open until a container joins it.
static SPARE_NETNS: Mutex<Option<OwnedFd>> = Mutex::new(None);
/// The cgroup made ahead.
static SPARE_CGROUP_MADE: Mutex<Option<Cgroup>> = Mutex::new(None);

/// Makes the spare network namespace and cgroup (under `cgroup_root`, as containers' are).
/// Call it in a template boot, before the template is taken. Returns what failed, if anything.
pub fn make_spares(cgroup_root: &Path) -> Vec<String> {
    let mut failed = Vec::new();
    match make_netns() {
        Ok(fd) => *lock(&SPARE_NETNS) = Some(fd),
        Err(err) => failed.push(format!("a network namespace: {err}")),
    }
    match Cgroup::create(cgroup_root, SPARE_CGROUP) {
        Ok(cgroup) => *lock(&SPARE_CGROUP_MADE) = Some(cgroup),
        Err(err) => failed.push(format!("a cgroup: {err}")),
    }
    failed
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new network namespace: a thread of its own unshares it (a network namespace is a
/// thread's), opens it and ends.
fn make_netns() -> io::Result<OwnedFd> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> io::Result<OwnedFd> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok(File::open("/proc/thread-self/ns/net")?.into())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread making it panicked")))
    })
}

/// The entry of `namespaces` the spare network namespace can serve: a new network namespace,
/// in a plan without a user namespace (one to join or a new one).
fn netns_slot(namespaces: &mut [NamespacePlan]) -> Option<&mut NamespacePlan> {
    if namespaces.iter().any(|ns| ns.flag == libc::CLONE_NEWUSER) {
        return None;
    }
    namespaces
        .iter_mut()
        .find(|ns| ns.flag == libc::CLONE_NEWNET && ns.path.is_none())
}

/// Gives a container's plan the spare network namespace, if there is one and the plan can use
/// it: its new network namespace becomes one to join, through this process's descriptor. The
/// caller holds the returned descriptor until the helper has joined (it reported `Ready`) or
/// failed, then drops it.
pub fn take_netns(namespaces: &mut [NamespacePlan]) -> Option<OwnedFd> {
    let slot = netns_slot(namespaces)?;
    let spare = lock(&SPARE_NETNS).take()?;
    slot.path = Some(PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        spare.as_raw_fd()
    )));
    Some(spare)
}

/// The spare cgroup if there is one under `cgroup_root`, or a new cgroup `<cgroup_root>/<id>`.
pub fn take_cgroup(cgroup_root: &Path, id: &str) -> Result<Cgroup, CgroupError> {
    let mut spare = lock(&SPARE_CGROUP_MADE);
    match spare.take() {
        Some(cgroup) if cgroup.path.parent() == Some(cgroup_root) => Ok(cgroup),
        other => {
            *spare = other;
            Cgroup::create(cgroup_root, id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(flag: i32, path: Option<&str>) -> NamespacePlan {
        NamespacePlan {
            flag,
            path: path.map(PathBuf::from),
        }
    }

    #[test]
    fn only_a_new_network_namespace_without_a_user_namespace_takes_the_spare() {
        let mut plain = vec![
            ns(libc::CLONE_NEWPID, None),
            ns(libc::CLONE_NEWNET, None),
            ns(libc::CLONE_NEWNS, None),
        ];
        let slot = netns_slot(&mut plain).expect("a slot");
        assert_eq!(slot.flag, libc::CLONE_NEWNET);

        // A network namespace to join (a pod's, the VM's) is not new.
        let mut joined = vec![ns(libc::CLONE_NEWNET, Some("/proc/7/ns/net"))];
        assert!(netns_slot(&mut joined).is_none());

        // No network namespace asked for: the container shares the agent's.
        let mut none = vec![ns(libc::CLONE_NEWPID, None), ns(libc::CLONE_NEWNS, None)];
        assert!(netns_slot(&mut none).is_none());

        // A user namespace, new or joined, must own the network namespace.
        for user in [None, Some("/proc/9/ns/user")] {
            let mut userns = vec![ns(libc::CLONE_NEWUSER, user), ns(libc::CLONE_NEWNET, None)];
            assert!(netns_slot(&mut userns).is_none());
        }
    }

    #[test]
    fn without_a_spare_the_plan_is_left_as_it_was() {
        // No template boot made one in this process.
        let mut plain = vec![ns(libc::CLONE_NEWNET, None)];
        assert!(take_netns(&mut plain).is_none());
        assert_eq!(plain[0].path, None);
    }

    /// One test for the spare cgroup, which is the process's.
    #[test]
    fn the_spare_cgroup_serves_one_container_under_its_own_root() {
        let root = tempfile::tempdir().expect("tmp");
        let other = tempfile::tempdir().expect("tmp");
        // Without a spare, a cgroup is made.
        let made = take_cgroup(other.path(), "c0").expect("a cgroup directory");
        assert_eq!(made.path, other.path().join("c0"));
        assert!(made.path.is_dir());

        let spare = root.path().join(SPARE_CGROUP);
        std::fs::create_dir(&spare).expect("spare dir");
        *lock(&SPARE_CGROUP_MADE) = Some(Cgroup {
            path: spare.clone(),
        });
        // Under another root it stays the spare.
        let elsewhere = take_cgroup(other.path(), "c1").expect("a cgroup");
        assert_eq!(elsewhere.path, other.path().join("c1"));
        let first = take_cgroup(root.path(), "c2").expect("the spare");
        assert_eq!(first.path, spare);
        let second = take_cgroup(root.path(), "c3").expect("a new one");
        assert_eq!(second.path, root.path().join("c3"));
    }

    #[test]
    fn no_container_id_is_the_spare_cgroups_name() {
        assert!(super::super::check_id(SPARE_CGROUP).is_err());
    }
}
