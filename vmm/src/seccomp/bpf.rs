//! The filters' BPF, compiled from the lists ([`super::rules`]) here rather than by
//! seccompiler's `SeccompFilter`, whose programs are three times as long: it gives every
//! allowed call five instructions (a test, two jumps, its own `ret ALLOW` and `ret` mismatch),
//! and the kernel's work to install a filter (checking it, converting it to eBPF, compiling
//! it) grows with its length. In the rig, seccompiler's process list (728 instructions) and
//! the second filter it needed for `clone3` took ~3.7 ms of a restored VM's ~160 ms to
//! install; the one program compiled here (202 instructions) takes ~1.4 ms.
//! seccompiler still installs the programs, and its compiler is the unit tests' reference:
//! both programs give the same answer for every call number and every argument that matters.
//!
//! The shape of a program:
//! - the architecture is checked (anything but x86_64 kills the process, as seccompiler's
//!   programs do) and the call number loaded;
//! - calls with an answer of their own (`clone3`: `ENOSYS`) are tested first;
//! - then every call whose arguments are pinned, each a test and a long jump to its checks;
//! - then the calls allowed with any arguments, in runs of at most [`RUN`] tests that jump
//!   forward to one shared `ret ALLOW` after the run (a BPF test jumps at most 255
//!   instructions ahead);
//! - a call no test matched gets the mismatch answer;
//! - each pinned call's checks: its alternatives in turn (the argument's low 32 bits loaded,
//!   masked where the pin is a mask, compared), any match allowing it, else the mismatch.
//!
//! The kernel's filter cache sees through this as through seccompiler's programs: a call
//! allowed with any arguments is allowed whatever the arguments, found without running the
//! filter.

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram};

// Classic BPF opcodes (<linux/bpf_common.h>).
const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_ALU: u16 = 0x04;
const BPF_AND: u16 = 0x50;
const BPF_JMP: u16 = 0x05;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;

/// `AUDIT_ARCH_X86_64`.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// Offsets in `struct seccomp_data`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARGS_OFFSET: u32 = 16;

/// Seccomp's answers (<linux/seccomp.h>).
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const RET_TRAP: u32 = 0x0003_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;
pub const RET_LOG: u32 = 0x7ffc_0000;
pub const RET_ALLOW: u32 = 0x7fff_0000;

/// The most tests in one run of calls allowed with any arguments, so that each test's jump to
/// the run's `ret ALLOW` stays within a BPF test's 255 instructions.
const RUN: usize = 200;
const _: () = assert!(RUN <= u8::MAX as usize);

/// The most instructions the kernel takes in one filter (`BPF_MAXINSNS`).
const MAX_INSNS: usize = 4096;

/// One way a call's arguments may be (the low 32 bits of argument `index`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Equal to `value`.
    Eq { index: u8, value: u32 },
    /// Equal to `value` once masked with `mask`.
    MaskedEq { index: u8, mask: u32, value: u32 },
}

/// What a call is allowed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pins {
    /// Any arguments.
    Any,
    /// Arguments that pass one of these checks.
    OneOf(Vec<Check>),
}

/// Why a program cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BpfError {
    #[error("argument index {0} is not one of a system call's six")]
    Index(u8),
    #[error("call {0}'s checks are too many for one program ({1} instructions)")]
    TooLong(i64, usize),
    #[error("the program would be longer than the kernel's {MAX_INSNS} instructions")]
    Program,
    #[error("call number {0} is out of range")]
    Nr(i64),
    #[error("call {0} is both allowed and given an answer of its own")]
    Twice(i64),
    #[error("{0:#x} is wider than the 32 bits an argument check compares")]
    Value(u64),
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: BPF_JMP | BPF_JEQ | BPF_K,
        jt,
        jf,
        k,
    }
}

fn nr_of(nr: i64) -> Result<u32, BpfError> {
    u32::try_from(nr).map_err(|_| BpfError::Nr(nr))
}

/// The program that answers the calls of `answers` with their own answer, allows the calls of
/// `allowed` with their pins, and answers every other call with `mismatch`.
pub fn compile(
    allowed: &BTreeMap<i64, Pins>,
    answers: &[(i64, u32)],
    mismatch: u32,
) -> Result<BpfProgram, BpfError> {
    let mut prog = vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, ARCH_OFFSET),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET | BPF_K, RET_KILL_PROCESS),
        stmt(BPF_LD | BPF_W | BPF_ABS, NR_OFFSET),
    ];
    for &(nr, answer) in answers {
        if allowed.contains_key(&nr) {
            return Err(BpfError::Twice(nr));
        }
        prog.push(jeq(nr_of(nr)?, 0, 1));
        prog.push(stmt(BPF_RET | BPF_K, answer));
    }

    // The pinned calls: a test, then a long jump to the checks (patched below).
    let mut pinned: Vec<(i64, &[Check], usize)> = Vec::new();
    for (&nr, pins) in allowed {
        if let Pins::OneOf(checks) = pins {
            prog.push(jeq(nr_of(nr)?, 0, 1));
            pinned.push((nr, checks, prog.len()));
            prog.push(stmt(BPF_JMP | BPF_JA, 0));
        }
    }

    // The calls allowed with any arguments, in runs: each test jumps to the `ret ALLOW` that
    // follows its run, which the run's last test skips when nothing matched.
    let any: Vec<u32> = allowed
        .iter()
        .filter(|(_, pins)| **pins == Pins::Any)
        .map(|(&nr, _)| nr_of(nr))
        .collect::<Result<_, _>>()?;
    for run in any.chunks(RUN) {
        for (i, &nr) in run.iter().enumerate() {
            // From the test after this one to the `ret ALLOW` after the run's skip: at most
            // RUN, which fits.
            let to_allow = u8::try_from(run.len() - i).unwrap_or(u8::MAX);
            prog.push(jeq(nr, to_allow, 0));
        }
        prog.push(stmt(BPF_JMP | BPF_JA, 1));
        prog.push(stmt(BPF_RET | BPF_K, RET_ALLOW));
    }
    prog.push(stmt(BPF_RET | BPF_K, mismatch));

    // Each pinned call's checks.
    for (nr, checks, jump_at) in pinned {
        let start = prog.len();
        prog[jump_at].k = u32::try_from(start - jump_at - 1).map_err(|_| BpfError::Program)?;
        let block = checks_block(checks, mismatch)?;
        if block.len() > 255 {
            return Err(BpfError::TooLong(nr, block.len()));
        }
        prog.extend(block);
    }
    if prog.len() > MAX_INSNS {
        return Err(BpfError::Program);
    }
    Ok(prog)
}

/// The checks of one call: each alternative loads its argument (masking it if it must), and a
/// match jumps to the block's last instruction, `ret ALLOW`; the one before it is the
/// mismatch.
fn checks_block(checks: &[Check], mismatch: u32) -> Result<Vec<sock_filter>, BpfError> {
    // The tests, with their jump to `ret ALLOW` filled in once the length is known.
    let mut block = Vec::new();
    let mut tests = Vec::new();
    let mut loaded: Option<u8> = None;
    for check in checks {
        let (index, mask, value) = match *check {
            Check::Eq { index, value } => (index, None, value),
            Check::MaskedEq { index, mask, value } => (index, Some(mask), value),
        };
        if index > 5 {
            return Err(BpfError::Index(index));
        }
        // The low 32 bits of the argument (little-endian). A mask changes the accumulator, so
        // the next check loads again.
        if loaded != Some(index) {
            block.push(stmt(
                BPF_LD | BPF_W | BPF_ABS,
                ARGS_OFFSET + 8 * u32::from(index),
            ));
            loaded = Some(index);
        }
        if let Some(mask) = mask {
            block.push(stmt(BPF_ALU | BPF_AND | BPF_K, mask));
            loaded = None;
        }
        tests.push(block.len());
        block.push(jeq(value, 0, 0));
    }
    block.push(stmt(BPF_RET | BPF_K, mismatch));
    block.push(stmt(BPF_RET | BPF_K, RET_ALLOW));
    let allow = block.len() - 1;
    for at in tests {
        // Too far is caught by the caller's length check.
        block[at].jt = u8::try_from(allow - at - 1).unwrap_or(u8::MAX);
    }
    Ok(block)
}

/// A classic BPF interpreter for what [`compile`] and seccompiler emit: the unit tests run
/// both programs with it.
#[cfg(test)]
pub(crate) fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let word = |k: u32| -> u32 {
        match k {
            NR_OFFSET => nr,
            ARCH_OFFSET => arch,
            k if (ARGS_OFFSET..ARGS_OFFSET + 48).contains(&k) => {
                let arg = args[((k - ARGS_OFFSET) / 8) as usize];
                if (k - ARGS_OFFSET).is_multiple_of(8) {
                    arg as u32
                } else {
                    (arg >> 32) as u32
                }
            }
            k => panic!("load of offset {k}"),
        }
    };
    let mut acc = 0u32;
    let mut pc = 0usize;
    loop {
        let insn = &prog[pc];
        pc += 1;
        match insn.code {
            c if c == BPF_LD | BPF_W | BPF_ABS => acc = word(insn.k),
            c if c == BPF_ALU | BPF_AND | BPF_K => acc &= insn.k,
            c if c == BPF_JMP | BPF_JA => pc += insn.k as usize,
            c if c & 0x07 == BPF_JMP => {
                let taken = match c & 0xf0 {
                    0x10 => acc == insn.k,
                    0x20 => acc > insn.k,
                    0x30 => acc >= insn.k,
                    0x40 => acc & insn.k != 0,
                    op => panic!("jump op {op:#x}"),
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            c if c == BPF_RET | BPF_K => return insn.k,
            c => panic!("opcode {c:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(entries: &[(i64, Pins)]) -> BTreeMap<i64, Pins> {
        entries.iter().cloned().collect()
    }

    const X86_64: u32 = AUDIT_ARCH_X86_64;

    #[test]
    fn answers_calls_by_number_and_arguments() {
        let prog = compile(
            &allowed(&[
                (0, Pins::Any),
                (1, Pins::Any),
                (
                    16,
                    Pins::OneOf(vec![
                        Check::Eq {
                            index: 1,
                            value: 0x5401,
                        },
                        Check::MaskedEq {
                            index: 1,
                            mask: 0xff00,
                            value: 0xae00,
                        },
                    ]),
                ),
                (
                    62,
                    Pins::OneOf(vec![Check::Eq {
                        index: 0,
                        value: 77,
                    }]),
                ),
            ]),
            &[(435, RET_ERRNO | 38)],
            RET_TRAP,
        )
        .expect("compile");
        let call = |nr, args| run(&prog, nr, X86_64, args);
        assert_eq!(call(0, [0; 6]), RET_ALLOW);
        assert_eq!(call(1, [9; 6]), RET_ALLOW);
        assert_eq!(call(2, [0; 6]), RET_TRAP);
        assert_eq!(call(435, [0; 6]), RET_ERRNO | 38);
        assert_eq!(call(16, [3, 0x5401, 0, 0, 0, 0]), RET_ALLOW);
        // Only the low 32 bits are compared, as seccompiler's `Dword` conditions do.
        assert_eq!(call(16, [3, 0x1_0000_5401, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(call(16, [3, 0xc008_ae03, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(call(16, [3, 0x5402, 0, 0, 0, 0]), RET_TRAP);
        assert_eq!(call(62, [77, 9, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(call(62, [78, 9, 0, 0, 0, 0]), RET_TRAP);
        // Another architecture (i386 here) is killed, whatever the call.
        assert_eq!(run(&prog, 0, 3 | 0x4000_0000, [0; 6]), RET_KILL_PROCESS);
        // x32 numbers match nothing.
        assert_eq!(call(0x4000_0000, [0; 6]), RET_TRAP);
    }

    #[test]
    fn long_runs_of_calls_stay_within_the_jump_range() {
        let many = (0..450).map(|nr| (nr, Pins::Any)).collect();
        let prog = compile(&many, &[], RET_LOG).expect("compile");
        for nr in 0..460 {
            let want = if nr < 450 { RET_ALLOW } else { RET_LOG };
            assert_eq!(run(&prog, nr, X86_64, [0; 6]), want, "call {nr}");
        }
    }

    #[test]
    fn bad_lists_are_refused() {
        let bad_index = allowed(&[(1, Pins::OneOf(vec![Check::Eq { index: 6, value: 0 }]))]);
        assert_eq!(compile(&bad_index, &[], RET_TRAP), Err(BpfError::Index(6)));
        let twice = allowed(&[(435, Pins::Any)]);
        assert_eq!(
            compile(&twice, &[(435, RET_ERRNO)], RET_TRAP),
            Err(BpfError::Twice(435))
        );
        let checks = (0..300)
            .map(|value| Check::Eq { index: 1, value })
            .collect();
        let long = allowed(&[(16, Pins::OneOf(checks))]);
        assert!(matches!(
            compile(&long, &[], RET_TRAP),
            Err(BpfError::TooLong(16, _))
        ));
        let huge = (0..5000).map(|nr| (nr, Pins::Any)).collect();
        assert_eq!(compile(&huge, &[], RET_TRAP), Err(BpfError::Program));
        let negative = allowed(&[(-1, Pins::Any)]);
        assert_eq!(compile(&negative, &[], RET_TRAP), Err(BpfError::Nr(-1)));
    }
}
