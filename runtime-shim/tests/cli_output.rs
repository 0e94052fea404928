//! The `husk` CLI's output to a reader that went away (`husk state c | grep -q running`, `husk
//! list | head -1`): the process ends by `SIGPIPE`, quietly, as runc and the shell's own tools
//! do, never with a panic. Runs anywhere: `husk features` needs no container and no KVM.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn output_to_a_closed_pipe_ends_by_sigpipe_without_a_panic() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    // Nobody reads: the first write of `features`' JSON fails with EPIPE.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_husk"))
        .arg("features")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run husk features");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}, stderr: {stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "nothing said on stderr: {stderr}");
    // And with a reader, the same command succeeds.
    let out = Command::new(env!("CARGO_BIN_EXE_husk"))
        .arg("features")
        .output()
        .expect("run husk features");
    assert!(out.status.success(), "{:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ociVersionMin"));
}
