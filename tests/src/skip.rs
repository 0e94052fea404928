//! The one way a husk test skips: loudly, straight to the process's stderr (libtest keeps what
//! a passing test prints through the print macros to itself), and never where
//! `HUSK_REQUIRE_KVM=1` (CI and `cargo xtask test`'s VM runs): there a test that cannot run
//! fails, naming itself and why. Every test crate uses this file: `husk-tests` as its module
//! `skip`, the agent's tests through `#[path]` (a dependency on `husk-tests` would bring the
//! VMM and the CRI client into the agent's build). It needs nothing but `std` and `libc`.

use std::io::Write;

/// Whether a test that cannot run must fail instead of skipping (`HUSK_REQUIRE_KVM=1`).
pub fn skips_forbidden() -> bool {
    std::env::var("HUSK_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// The running test's name: libtest runs each test on a thread named after it.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_string()
}

/// Skips the running test because of `reason`: a loud line on stderr, or a panic naming the
/// test under `HUSK_REQUIRE_KVM=1`. Callers return right after it.
pub fn skip(reason: &str) {
    let test = current_test();
    if skips_forbidden() {
        panic!("{test} cannot run here and HUSK_REQUIRE_KVM=1 forbids skipping it: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "!!! SKIPPED {test}: {reason} !!!");
}

/// Whether this process runs as root; if not, the running test is skipped (see [`skip`]) with
/// `why` root is needed.
pub fn have_root(why: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(&format!("needs root ({why})"));
    }
    root
}
