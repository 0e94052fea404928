//! Initramfs build: the static guest agent as `/init` in an uncompressed newc cpio archive.
//!
//! The agent is built for the explicit target `x86_64-unknown-linux-gnu` with
//! `-C target-feature=+crt-static` (glibc, statically linked; no musl target is installed here).
//! The explicit `--target` keeps those RUSTFLAGS off host crates (build scripts, proc macros)
//! and puts the result in `target/x86_64-unknown-linux-gnu/agent/` (the workspace's `agent`
//! profile: built for size with fat LTO). Symbols are stripped at link time, and the binary is a
//! classic static executable (`-C relocation-model=static`), not a static PIE: no dynamic
//! relocations to store (~0.4 MB) or to apply at every start. The guest kernel copies the archive
//! into its rootfs at every boot, so every byte counts.

use crate::cpio::CpioWriter;
use crate::util::{run, target_dir, workspace_root, write_atomic};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The Rust target the agent is built for.
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The Cargo profile the agent is built with (workspace `Cargo.toml`).
const AGENT_PROFILE: &str = "agent";

/// ELF program header type of the dynamic loader request.
const PT_INTERP: u32 = 3;

/// Builds the static agent and writes `target/husk/initramfs.cpio`; returns its path.
pub fn build() -> Result<PathBuf> {
    let agent = build_agent()?;
    let binary = std::fs::read(&agent).with_context(|| format!("reading {}", agent.display()))?;
    check_static(&binary).with_context(|| format!("{} is not a static binary", agent.display()))?;

    let archive = initramfs_archive(&binary).context("writing the cpio archive")?;
    let out_dir = target_dir().join("husk");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out = out_dir.join("initramfs.cpio");
    write_atomic(&out, &archive)?;
    eprintln!(
        "xtask: agent {} ({} KiB), initramfs {} ({} KiB)",
        agent.display(),
        binary.len() / 1024,
        out.display(),
        archive.len() / 1024
    );
    Ok(out)
}

/// `cargo build --profile agent -p husk-agent` for [`AGENT_TARGET`], statically linked and
/// stripped.
pub fn build_agent() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "build",
            "--profile",
            AGENT_PROFILE,
            "-p",
            "husk-agent",
            "--target",
            AGENT_TARGET,
        ])
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C relocation-model=static -C strip=symbols",
        )
        // Flags from the environment or config for the host must not leak into the guest build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS"))?;
    let agent = target_dir()
        .join(AGENT_TARGET)
        .join(AGENT_PROFILE)
        .join("husk-agent");
    if !agent.is_file() {
        bail!("cargo did not produce {}", agent.display());
    }
    Ok(agent)
}

/// Fails unless `elf` is a 64-bit little-endian x86-64 ELF executable without a `PT_INTERP`
/// program header (i.e. it needs no dynamic loader; static-pie is fine).
fn check_static(elf: &[u8]) -> Result<()> {
    let u16_at = |off: usize| -> Result<u16> {
        let bytes = elf.get(off..off + 2).context("ELF header truncated")?;
        Ok(u16::from_le_bytes(bytes.try_into()?))
    };
    let u32_at = |off: usize| -> Result<u32> {
        let bytes = elf.get(off..off + 4).context("ELF header truncated")?;
        Ok(u32::from_le_bytes(bytes.try_into()?))
    };
    let u64_at = |off: usize| -> Result<u64> {
        let bytes = elf.get(off..off + 8).context("ELF header truncated")?;
        Ok(u64::from_le_bytes(bytes.try_into()?))
    };
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        bail!("not an ELF file");
    }
    // EI_CLASS = ELFCLASS64, EI_DATA = little endian; e_machine = EM_X86_64.
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) || u16_at(0x12)? != 62 {
        bail!("not a 64-bit little-endian x86-64 ELF file");
    }
    let phoff = usize::try_from(u64_at(0x20)?)?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    if phentsize < 4 {
        bail!("bad program header size {phentsize}");
    }
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize)? == PT_INTERP {
            bail!("it has a PT_INTERP program header (it needs a dynamic loader)");
        }
    }
    Ok(())
}

/// The archive: the directories the agent mounts on, `/dev/console` (the kernel opens it for
/// init's stdio before `/dev` is mounted), `/dev/null` and the agent as `/init`.
fn initramfs_archive(agent: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut cpio = CpioWriter::new(Vec::with_capacity(agent.len() + 4096));
    cpio.dir("dev", 0o755)?;
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    // When no console can be opened (no serial device), init starts without fds 0-2 and Rust's
    // runtime opens /dev/null for them before main, aborting if it cannot: PID 1 would die
    // before devtmpfs is mounted.
    cpio.char_dev("dev/null", 0o666, 1, 3)?;
    cpio.dir("proc", 0o555)?;
    cpio.dir("sys", 0o555)?;
    cpio.dir("run", 0o755)?;
    cpio.dir("tmp", 0o1777)?;
    cpio.file("init", 0o755, agent)?;
    cpio.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header plus `types.len()` program headers of the given types.
    fn elf_with_program_headers(types: &[u32]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56 * types.len()];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for (i, ty) in types.iter().enumerate() {
            let off = 64 + 56 * i;
            elf[off..off + 4].copy_from_slice(&ty.to_le_bytes());
        }
        elf
    }

    #[test]
    fn static_elf_passes_and_dynamic_elf_fails() {
        // PT_LOAD, PT_DYNAMIC (static-pie has one), PT_GNU_STACK.
        assert!(check_static(&elf_with_program_headers(&[1, 2, 0x6474e551])).is_ok());
        let err = check_static(&elf_with_program_headers(&[6, PT_INTERP, 1])).expect_err("dynamic");
        assert!(err.to_string().contains("PT_INTERP"), "{err}");
    }

    #[test]
    fn non_elf_and_truncated_headers_fail() {
        assert!(check_static(b"#!/bin/sh\n").is_err());
        let mut elf = elf_with_program_headers(&[1, 1]);
        elf.truncate(64 + 56);
        assert!(check_static(&elf).is_err());
    }

    #[test]
    fn archive_holds_init_and_the_mount_points() {
        let archive = initramfs_archive(b"\x7fELF agent").expect("vec write");
        let text = String::from_utf8_lossy(&archive);
        for name in [
            "dev\0",
            "dev/console\0",
            "dev/null\0",
            "proc\0",
            "sys\0",
            "run\0",
            "tmp\0",
            "init\0",
        ] {
            assert!(text.contains(name), "missing {name:?}");
        }
        assert!(text.contains("\x7fELF agent"));
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(archive.len() % 4, 0);
    }
}
