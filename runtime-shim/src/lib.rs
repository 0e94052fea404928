//! husk's host side: the runc-compatible OCI runtime CLI (and, later, the containerd shim v2).
//! One file and one function per command, as the OCI runtime CLI spec lists them.

pub mod commands;
