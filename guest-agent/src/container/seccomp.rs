//! OCI seccomp profiles to BPF, with `seccompiler`.
//!
//! seccompiler builds filters with a single "match" action, while an OCI profile gives each rule
//! its own action. The kernel runs every installed filter and applies the result of highest
//! precedence (KILL_PROCESS > KILL_THREAD > TRAP > ERRNO > TRACE > LOG > ALLOW), so a profile
//! becomes a stack of filters:
//!
//! * when the default action is not ALLOW, one filter that ALLOWs every syscall some rule names
//!   (with the rule's argument conditions) and returns the default action for anything else;
//! * one filter per distinct rule action other than ALLOW, returning that action for the
//!   syscalls (and conditions) of its rules and ALLOW otherwise.
//!
//! A syscall matching a rule thus gets the rule's action; any other gets the default action.
//!
//! What cannot be translated fails the whole profile: notify actions and listener paths,
//! filter flags other than TSYNC (the container's init is single threaded), argument indexes
//! beyond 5.
//!
//! A syscall name that is not an x86_64 syscall is skipped, as runc and libseccomp do: real
//! profiles (Docker's, podman's) list other architectures' calls (`bdflush`, `_llseek`, ...) in
//! both allow and deny rules. Skipping is exact, not lenient: the name table covers every
//! syscall of the guest kernel (the UAPI table plus [`NEWER_SYSCALLS`]), so a name it does not
//! know has no number a process in the guest could invoke.
//! Syscalls of another architecture (i386 / x32 entry) are killed by seccompiler's arch check.

use super::syscalls_x86_64::SYSCALLS_X86_64;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Errors of translating a profile.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    /// Something the profile asks that this agent cannot do.
    #[error("unsupported {0}")]
    Unsupported(String),
    /// seccompiler refused a filter.
    #[error("building the filter failed: {0}")]
    Build(String),
    /// Installing a filter failed.
    #[error("installing a filter failed: errno {0}")]
    Install(i32),
}

/// One BPF instruction (`struct sock_filter`), serialisable for the trip to the init helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// The x86_64 number of a syscall, by name.
pub fn syscall_number(name: &str) -> Option<i64> {
    SYSCALLS_X86_64
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, nr)| *nr)
        .or_else(|| {
            // Newer than the UAPI headers the table was generated from.
            NEWER_SYSCALLS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, nr)| *nr)
        })
}

/// x86_64 syscalls added after the generated table (Linux 6.6 and later).
const NEWER_SYSCALLS: &[(&str, i64)] = &[
    ("cachestat", 451),
    ("fchmodat2", 452),
    ("map_shadow_stack", 453),
    ("futex_wake", 454),
    ("futex_wait", 455),
    ("futex_requeue", 456),
    ("statmount", 457),
    ("listmount", 458),
    ("lsm_get_self_attr", 459),
    ("lsm_set_self_attr", 460),
    ("lsm_list_modules", 461),
    ("mseal", 462),
    ("setxattrat", 463),
    ("getxattrat", 464),
    ("listxattrat", 465),
    ("removexattrat", 466),
];

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, SeccompError> {
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(1)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(0)),
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::Unsupported("action SCMP_ACT_NOTIFY".into()))
        }
    })
}

fn condition(arg: &oci_spec::runtime::LinuxSeccompArg) -> Result<SeccompCondition, SeccompError> {
    let index = u8::try_from(arg.index())
        .ok()
        .filter(|i| *i <= 5)
        .ok_or_else(|| SeccompError::Unsupported(format!("argument index {}", arg.index())))?;
    let (op, value) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // libseccomp: (arg & value) == valueTwo.
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|err| SeccompError::Build(err.to_string()))
}

/// The rules of one OCI syscall entry: several conditions on the same argument are alternatives
/// (one rule each, as runc does); otherwise all conditions form one rule.
fn rules(args: &[oci_spec::runtime::LinuxSeccompArg]) -> Result<Vec<SeccompRule>, SeccompError> {
    let conditions: Vec<SeccompCondition> = args.iter().map(condition).collect::<Result<_, _>>()?;
    let mut indexes: Vec<usize> = args.iter().map(|a| a.index()).collect();
    indexes.sort_unstable();
    let repeated = indexes.windows(2).any(|w| w[0] == w[1]);
    let build = |conds: Vec<SeccompCondition>| {
        SeccompRule::new(conds).map_err(|err| SeccompError::Build(err.to_string()))
    };
    if repeated {
        conditions.into_iter().map(|c| build(vec![c])).collect()
    } else {
        Ok(vec![build(conditions)?])
    }
}

/// Syscall number -> its rules; `None` means unconditional.
type RuleMap = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn add_rules(map: &mut RuleMap, nr: i64, rules: Option<Vec<SeccompRule>>) {
    let entry = map.entry(nr).or_insert_with(|| Some(Vec::new()));
    match (entry.as_mut(), rules) {
        (Some(existing), Some(more)) => existing.extend(more),
        // An unconditional rule makes every conditional one moot.
        _ => *entry = None,
    }
}

fn build(
    rules: RuleMap,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<Vec<SockFilter>, SeccompError> {
    let rules = rules
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|err| SeccompError::Build(err.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|err: seccompiler::BackendError| SeccompError::Build(err.to_string()))?;
    Ok(program
        .iter()
        .map(|insn| SockFilter {
            code: insn.code,
            jt: insn.jt,
            jf: insn.jf,
            k: insn.k,
        })
        .collect())
}

/// Translates a profile into the filters to install, in order.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<Vec<SockFilter>>, SeccompError> {
    if profile.listener_path().is_some() {
        return Err(SeccompError::Unsupported(
            "listenerPath (seccomp notify)".into(),
        ));
    }
    for flag in profile.flags().as_deref().unwrap_or(&[]) {
        if *flag != LinuxSeccompFilterFlag::SeccompFilterFlagTsync {
            return Err(SeccompError::Unsupported(format!("filter flag {flag}")));
        }
    }
    if let Some(arches) = profile.architectures() {
        if !arches.is_empty()
            && !arches
                .iter()
                .any(|a| matches!(a, Arch::ScmpArchX86_64 | Arch::ScmpArchNative))
        {
            return Err(SeccompError::Unsupported(
                "a profile without SCMP_ARCH_X86_64".into(),
            ));
        }
    }
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let syscalls = profile.syscalls().as_deref().unwrap_or(&[]);
    if syscalls.len() > super::spec::MAX_LIST_LEN {
        return Err(SeccompError::Unsupported(format!(
            "{} syscall rules",
            syscalls.len()
        )));
    }
    let mut allow_named = RuleMap::new();
    let mut by_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    for entry in syscalls {
        let act = action(entry.action(), entry.errno_ret())?;
        let args = entry.args().as_deref().unwrap_or(&[]);
        for name in entry.names() {
            let Some(nr) = syscall_number(name) else {
                continue;
            };
            let entry_rules = if args.is_empty() {
                None
            } else {
                Some(rules(args)?)
            };
            if default != SeccompAction::Allow {
                add_rules(&mut allow_named, nr, entry_rules.clone());
            }
            if act == SeccompAction::Allow {
                continue;
            }
            let slot = match by_action.iter().position(|(a, _)| *a == act) {
                Some(i) => i,
                None => {
                    by_action.push((act.clone(), RuleMap::new()));
                    by_action.len() - 1
                }
            };
            if let Some((_, map)) = by_action.get_mut(slot) {
                add_rules(map, nr, entry_rules);
            }
        }
    }
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(build(allow_named, default, SeccompAction::Allow)?);
    }
    for (act, map) in by_action {
        filters.push(build(map, SeccompAction::Allow, act)?);
    }
    Ok(filters)
}

/// Installs one filter in the calling thread (`prctl(PR_SET_SECCOMP)`), without setting
/// no_new_privs: the caller holds CAP_SYS_ADMIN or has set it.
pub fn install(filter: &[SockFilter]) -> Result<(), SeccompError> {
    let insns: Vec<libc::sock_filter> = filter
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let len = u16::try_from(insns.len())
        .map_err(|_| SeccompError::Build(format!("{} instructions", insns.len())))?;
    let prog = libc::sock_fprog {
        len,
        filter: insns.as_ptr().cast_mut(),
    };
    // SAFETY: prog points at `insns`, which lives until after the call; the kernel copies the
    // program and keeps no pointer to it.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    if ret != 0 {
        return Err(SeccompError::Install(nix::errno::Errno::last_raw()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).expect("valid profile")
    }

    /// The return value of the last instruction, `BPF_RET | BPF_K`.
    fn last_ret(filter: &[SockFilter]) -> u32 {
        filter.last().expect("non-empty").k
    }

    #[test]
    fn syscall_names_map_to_x86_64_numbers() {
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("mkdir"), Some(83));
        assert_eq!(syscall_number("mseal"), Some(462));
        assert_eq!(syscall_number("socketcall"), None);
    }

    #[test]
    fn allow_default_with_errno_rule_is_one_filter() {
        let filters = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        })))
        .expect("compiles");
        assert_eq!(filters.len(), 1);
        // Mismatch: ALLOW; the program mentions both syscall numbers and ERRNO|1.
        assert_eq!(last_ret(&filters[0]), libc::SECCOMP_RET_ALLOW);
        assert!(filters[0].iter().any(|i| i.k == 83));
        assert!(filters[0].iter().any(|i| i.k == 258));
        assert!(filters[0]
            .iter()
            .any(|i| i.k == libc::SECCOMP_RET_ERRNO | 1));
    }

    #[test]
    fn deny_default_adds_an_allow_list_filter_first() {
        let filters = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "syscalls": [
                {"names": ["read", "write", "arm_fadvise64_64"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["kill"], "action": "SCMP_ACT_KILL_PROCESS",
                 "args": [{"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]}
            ]
        })))
        .expect("compiles; the unknown allowed name is skipped");
        assert_eq!(filters.len(), 2);
        assert_eq!(last_ret(&filters[0]), libc::SECCOMP_RET_ERRNO | 38);
        assert_eq!(last_ret(&filters[1]), libc::SECCOMP_RET_ALLOW);
        assert!(filters[1]
            .iter()
            .any(|i| i.k == libc::SECCOMP_RET_KILL_PROCESS));
    }

    #[test]
    fn other_architectures_syscalls_are_skipped() {
        let filters = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["bdflush", "mkdir"], "action": "SCMP_ACT_ERRNO"}]
        })))
        .expect("compiles");
        assert_eq!(filters.len(), 1);
        let only_unknown = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["bdflush"], "action": "SCMP_ACT_ERRNO"}]
        })))
        .expect("compiles");
        assert!(only_unknown.is_empty());
    }

    #[test]
    fn notify_and_flags_are_refused() {
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]
        })))
        .expect_err("notify");
        assert!(err.to_string().contains("SCMP_ACT_NOTIFY"), "{err}");
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_LOG"]
        })))
        .expect_err("flag");
        assert!(err.to_string().contains("SECCOMP_FILTER_FLAG_LOG"), "{err}");
    }

    #[test]
    fn bad_argument_index_is_refused() {
        let err = compile(&profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]
        })))
        .expect_err("index");
        assert_eq!(err, SeccompError::Unsupported("argument index 6".into()));
    }

    #[test]
    fn repeated_argument_index_gives_alternative_rules() {
        let args: Vec<oci_spec::runtime::LinuxSeccompArg> = serde_json::from_value(json!([
            {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
            {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}
        ]))
        .expect("args");
        assert_eq!(rules(&args).expect("rules").len(), 2);
        let args: Vec<oci_spec::runtime::LinuxSeccompArg> = serde_json::from_value(json!([
            {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
            {"index": 1, "value": 2, "op": "SCMP_CMP_MASKED_EQ", "valueTwo": 2}
        ]))
        .expect("args");
        assert_eq!(rules(&args).expect("rules").len(), 1);
    }
}
