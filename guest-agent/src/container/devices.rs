//! A container's device access, as its spec's `linux.resources.devices` says, enforced by a
//! cgroup v2 device program (eBPF, `BPF_PROG_TYPE_CGROUP_DEVICE`) attached to its cgroup.
//!
//! cgroup v2 has no `devices.allow` file: the kernel asks a BPF program on every open or mknod
//! of a device node by a process of the cgroup. The program is generated here from the rules
//! the way runc does it (`libcontainer/cgroups/devices/devicefilter.go`):
//! - the spec's rules, then the runtime's own allow rules (the OCI default devices, the
//!   container's console and ptys, the spec's `linux.devices`, and `mknod` of anything, as runc
//!   allows), checked from the last to the first: the last rule that matches decides;
//! - no rule matches: denied (EPERM), the spec's usual first rule (`deny all`) by construction.
//!
//! A spec with no `devices` list gets no program, as today (the guest holds only the VM's own
//! virtual devices). The program only reads its context and returns; the verifier checks that.
//! Everything about BPF's encoding stays in this file; the two `bpf(2)` calls are at the end.

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Errors of device programs.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// A rule the program cannot express.
    #[error("linux.resources.devices: {0}")]
    BadRule(String),
    /// The kernel refused the program or its attachment.
    #[error("{what} failed (does the guest kernel have CONFIG_CGROUP_BPF?)")]
    Bpf {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

// `struct bpf_cgroup_dev_ctx` and its values (include/uapi/linux/bpf.h).
const DEV_BLOCK: u32 = 1;
const DEV_CHAR: u32 = 2;
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// One device rule, in the program's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// [`DEV_BLOCK`] or [`DEV_CHAR`]; `None` for both.
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// `ACC_*` bits.
    pub access: u32,
}

impl Rule {
    fn char_dev(major: u32, minor: Option<u32>) -> Rule {
        Rule {
            allow: true,
            kind: Some(DEV_CHAR),
            major: Some(major),
            minor,
            access: ACC_ALL,
        }
    }
}

/// The rules every container gets after its spec's own: what runc allows (`AllowedDevices`):
/// mknod of any node, the OCI default devices, `/dev/console`, the ptys and `/dev/ptmx`.
fn runtime_rules() -> Vec<Rule> {
    let mknod_any = |kind| Rule {
        allow: true,
        kind: Some(kind),
        major: None,
        minor: None,
        access: ACC_MKNOD,
    };
    let mut rules = vec![mknod_any(DEV_CHAR), mknod_any(DEV_BLOCK)];
    for (_, major, minor) in super::spec::DEFAULT_DEVICES {
        rules.push(Rule::char_dev(*major as u32, Some(*minor as u32)));
    }
    rules.push(Rule::char_dev(5, Some(1))); // /dev/console
    rules.push(Rule::char_dev(5, Some(2))); // /dev/ptmx
    rules.push(Rule::char_dev(136, None)); // /dev/pts/*
    rules
}

/// The rules for a container: its spec's, then [`runtime_rules`], then `rwm` for each device
/// of its `linux.devices` (`(is_block, major, minor)`), as runc does.
pub fn rules_for(
    spec_rules: &[LinuxDeviceCgroup],
    spec_devices: &[(bool, u64, u64)],
) -> Result<Vec<Rule>, DevicesError> {
    let mut rules = Vec::new();
    for r in spec_rules {
        let kind = match r.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some(DEV_BLOCK),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(DEV_CHAR),
            LinuxDeviceType::P => {
                return Err(DevicesError::BadRule(
                    "type p (FIFO) is not a device the cgroup controls".into(),
                ))
            }
        };
        let number = |n: Option<i64>, what: &str| -> Result<Option<u32>, DevicesError> {
            match n {
                None | Some(-1) => Ok(None),
                Some(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| DevicesError::BadRule(format!("{what} {n} out of range"))),
            }
        };
        let mut access = 0;
        for c in r.access().as_deref().unwrap_or("rwm").chars() {
            access |= match c {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                'm' => ACC_MKNOD,
                other => {
                    return Err(DevicesError::BadRule(format!(
                        "access {other:?} (not r, w or m)"
                    )))
                }
            };
        }
        rules.push(Rule {
            allow: r.allow(),
            kind,
            major: number(r.major(), "major")?,
            minor: number(r.minor(), "minor")?,
            access,
        });
    }
    rules.extend(runtime_rules());
    for &(block, major, minor) in spec_devices {
        let number = |n: u64| {
            u32::try_from(n)
                .map_err(|_| DevicesError::BadRule(format!("device number {n} out of range")))
        };
        rules.push(Rule {
            allow: true,
            kind: Some(if block { DEV_BLOCK } else { DEV_CHAR }),
            major: Some(number(major)?),
            minor: Some(number(minor)?),
            access: ACC_ALL,
        });
    }
    Ok(rules)
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcodes (include/uapi/linux/bpf_common.h, bpf.h).
const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ALU32_AND_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const ALU32_RSH_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const ALU64_AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JNE_X: u8 = 0x5d; // BPF_JMP | BPF_JNE | BPF_X
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

/// The device program for `rules` (see the module docs). Registers: r1 the context, then
/// r2 the device type, r3 the access asked for, r4 the major, r5 the minor number.
pub fn program(rules: &[Rule]) -> Result<Vec<Insn>, DevicesError> {
    let mut prog = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU32_AND_K, 2, 0, 0, 0xffff),
        insn(LDX_MEM_W, 3, 1, 0, 0),
        insn(ALU32_RSH_K, 3, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        // The checks jump past the block's end (to the next rule) when they fail; their
        // offsets are set once the block's length is known.
        let mut block = Vec::new();
        if let Some(kind) = rule.kind {
            block.push(insn(JNE_K, 2, 0, 0, kind as i32));
        }
        if rule.access & ACC_ALL != ACC_ALL {
            // Every access asked for must be one the rule names.
            block.push(insn(MOV64_X, 1, 3, 0, 0));
            block.push(insn(ALU64_AND_K, 1, 0, 0, rule.access as i32));
            block.push(insn(JNE_X, 1, 3, 0, 0));
        }
        for (reg, number) in [(4, rule.major), (5, rule.minor)] {
            if let Some(n) = number {
                let imm = i32::try_from(n).map_err(|_| {
                    DevicesError::BadRule(format!("device number {n} out of range"))
                })?;
                block.push(insn(JNE_K, reg, 0, 0, imm));
            }
        }
        block.push(insn(MOV64_K, 0, 0, 0, i32::from(rule.allow)));
        block.push(insn(EXIT, 0, 0, 0, 0));
        let len = block.len();
        let mut conditional = false;
        for (i, ins) in block.iter_mut().enumerate() {
            if ins.code == JNE_K || ins.code == JNE_X {
                // From the instruction after this one to the one after the block.
                ins.off = i16::try_from(len - i - 1).expect("a block is a few instructions");
                conditional = true;
            }
        }
        prog.extend(block);
        if !conditional {
            // A rule that matches everything decides everything left: the verifier refuses
            // code after it as unreachable.
            return Ok(prog);
        }
    }
    prog.push(insn(MOV64_K, 0, 0, 0, 0));
    prog.push(insn(EXIT, 0, 0, 0, 0));
    Ok(prog)
}

/// `struct bpf_insn` bytes: code, dst | src << 4, off, imm (little endian).
fn encode(prog: &[Insn]) -> Vec<u64> {
    prog.iter()
        .map(|i| {
            let mut b = [0u8; 8];
            b[0] = i.code;
            b[1] = (i.dst & 0xf) | (i.src << 4);
            b[2..4].copy_from_slice(&i.off.to_le_bytes());
            b[4..8].copy_from_slice(&i.imm.to_le_bytes());
            u64::from_le_bytes(b)
        })
        .collect()
}

// bpf(2) commands, program and attach types, flags (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    // The kernel takes a zero-filled tail for the fields we do not set.
    _rest: [u64; 12],
}

/// The head of `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _rest: [u32; 11],
}

/// Loads the program for `rules` and attaches it to the cgroup at `cgroup` (which keeps it
/// until the cgroup is removed; the program's fd is closed on return).
pub fn attach(cgroup: &Path, rules: &[Rule]) -> Result<(), DevicesError> {
    let insns = encode(&program(rules)?);
    let license = c"Apache-2.0";
    // The verifier's log, for the error when it refuses the program.
    let mut log = vec![0u8; 64 * 1024];
    let load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(insns.len()).expect("a few instructions per rule"),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    // SAFETY: bpf(2) reads `load` (size given) and the instruction and license buffers it
    // points to, all alive for the call; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &load as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let verifier = String::from_utf8_lossy(&log[..end]);
        let verifier = verifier.trim();
        return Err(DevicesError::Bpf {
            what: "loading the device program (bpf BPF_PROG_LOAD)",
            source: if verifier.is_empty() {
                err
            } else {
                std::io::Error::new(err.kind(), format!("{err}; the verifier says: {verifier}"))
            },
        });
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let dir = std::fs::File::open(cgroup).map_err(|source| DevicesError::Bpf {
        what: "opening the cgroup",
        source,
    })?;
    let attach = ProgAttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..ProgAttachAttr::default()
    };
    // SAFETY: bpf(2) reads `attach` (size given), which names two fds we hold open.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attach as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        )
    };
    if rc != 0 {
        return Err(DevicesError::Bpf {
            what: "attaching the device program to the container's cgroup",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Runs a device program for one access, as the kernel would (for the instructions
    /// [`program`] emits).
    fn run(prog: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> u64 {
        let ctx = [(access << 16) | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (d, s) = (usize::from(i.dst), usize::from(i.src));
            pc += 1;
            match i.code {
                LDX_MEM_W => r[d] = u64::from(ctx[(i.off / 4) as usize]),
                ALU32_AND_K => r[d] = (r[d] as u32 & i.imm as u32) as u64,
                ALU32_RSH_K => r[d] = ((r[d] as u32) >> i.imm) as u64,
                ALU64_AND_K => r[d] &= i.imm as i64 as u64,
                MOV64_K => r[d] = i.imm as i64 as u64,
                MOV64_X => r[d] = r[s],
                JNE_K if r[d] != i.imm as i64 as u64 => pc += i.off as usize,
                JNE_X if r[d] != r[s] => pc += i.off as usize,
                JNE_K | JNE_X => {}
                EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn spec_rules(v: serde_json::Value) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_value(v).expect("valid rules")
    }

    #[test]
    fn the_default_spec_allows_the_default_devices_and_mknod_only() {
        // `runc spec`'s rules: deny everything.
        let rules =
            rules_for(&spec_rules(json!([{"allow": false, "access": "rwm"}])), &[]).expect("rules");
        let prog = program(&rules).expect("program");
        assert_eq!(
            run(&prog, DEV_CHAR, ACC_READ | ACC_WRITE, 1, 3),
            1,
            "/dev/null"
        );
        assert_eq!(run(&prog, DEV_CHAR, ACC_READ, 136, 7), 1, "a pty");
        assert_eq!(
            run(&prog, DEV_CHAR, ACC_READ, 1, 1),
            0,
            "/dev/mem is denied"
        );
        assert_eq!(run(&prog, DEV_BLOCK, ACC_READ, 8, 0), 0, "a disk is denied");
        assert_eq!(
            run(&prog, DEV_CHAR, ACC_MKNOD, 1, 1),
            1,
            "mknod is allowed, as runc does"
        );
        assert_eq!(
            run(&prog, DEV_CHAR, ACC_MKNOD | ACC_READ, 1, 1),
            0,
            "mknod and read at once needs both"
        );
    }

    #[test]
    fn the_last_matching_rule_decides() {
        let rules = rules_for(
            &spec_rules(json!([
                {"allow": false, "access": "rwm"},
                {"allow": true, "type": "b", "major": 8, "access": "r"},
                {"allow": false, "type": "b", "major": 8, "minor": 1, "access": "rwm"}
            ])),
            &[(false, 10, 200)],
        )
        .expect("rules");
        let prog = program(&rules).expect("program");
        assert_eq!(run(&prog, DEV_BLOCK, ACC_READ, 8, 0), 1, "sda read");
        assert_eq!(
            run(&prog, DEV_BLOCK, ACC_WRITE, 8, 0),
            0,
            "sda write: r only"
        );
        assert_eq!(
            run(&prog, DEV_BLOCK, ACC_READ, 8, 1),
            0,
            "sda1 denied after"
        );
        assert_eq!(run(&prog, DEV_CHAR, ACC_READ, 8, 0), 0, "type matters");
        assert_eq!(
            run(&prog, DEV_CHAR, ACC_READ | ACC_WRITE, 10, 200),
            1,
            "linux.devices"
        );
    }

    #[test]
    fn an_allow_all_spec_allows_everything() {
        let rules =
            rules_for(&spec_rules(json!([{"allow": true, "access": "rwm"}])), &[]).expect("rules");
        let prog = program(&rules).expect("program");
        assert_eq!(run(&prog, DEV_BLOCK, ACC_READ | ACC_WRITE, 253, 4), 1);
    }

    #[test]
    fn nothing_follows_a_rule_that_matches_everything() {
        // The verifier refuses unreachable instructions.
        let deny_all = Rule {
            allow: false,
            kind: None,
            major: None,
            minor: None,
            access: ACC_ALL,
        };
        let prog = program(&[deny_all]).expect("program");
        assert_eq!(
            &prog[6..],
            &[insn(MOV64_K, 0, 0, 0, 0), insn(EXIT, 0, 0, 0, 0)]
        );
        let allow_null = Rule::char_dev(1, Some(3));
        let prog = program(&[deny_all, allow_null]).expect("program");
        assert_eq!(prog.last(), Some(&insn(EXIT, 0, 0, 0, 0)));
        assert_eq!(
            prog.len(),
            6 + 5 + 2,
            "the null rule, then deny all: no default after it"
        );
    }

    #[test]
    fn rules_it_cannot_express_are_named() {
        let bad = rules_for(&spec_rules(json!([{"allow": true, "access": "rwx"}])), &[]);
        assert!(matches!(bad, Err(DevicesError::BadRule(m)) if m.contains("'x'")));
        let fifo = rules_for(&spec_rules(json!([{"allow": true, "type": "p"}])), &[]);
        assert!(matches!(fifo, Err(DevicesError::BadRule(m)) if m.contains("FIFO")));
    }

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        let words = encode(&[insn(LDX_MEM_W, 4, 1, 4, 0), insn(JNE_K, 2, 0, 3, 2)]);
        assert_eq!(words[0].to_le_bytes(), [0x61, 0x14, 4, 0, 0, 0, 0, 0]);
        assert_eq!(words[1].to_le_bytes(), [0x55, 0x02, 3, 0, 2, 0, 0, 0]);
    }
}
