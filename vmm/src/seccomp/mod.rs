//! Seccomp: once the microVM is built, every `husk-vmm` thread may make only the system calls
//! its kind needs ([`rules`]); any other call ends the VMM, and says so.
//!
//! Layers: [`confine_process`] installs the process list (every list's calls) on every thread
//! at once (`SECCOMP_FILTER_FLAG_TSYNC`), right after the capabilities are dropped and before
//! any other thread starts; threads started later inherit it. The device thread, the file
//! server's and each vCPU thread then stack their own, narrower list with [`confine_thread`]
//! as the first thing they do after their setup; the agent's clients and the stdio relays
//! with [`confine_helper`] (a relay, started by the supervisor, stacks its list on the agent
//! clients'). The main thread stacks its own with [`narrow_main_thread`] once it has started
//! every thread that serves the guest: from then on it can neither start a thread nor make the
//! other threads' calls (the file server's, the devices'). The kernel answers a call with the
//! strictest of a thread's filters.
//!
//! A call outside the lists traps (`SECCOMP_RET_TRAP`): the `SIGSYS` handler writes one line,
//! "husk-vmm was killed by its seccomp filter: syscall N (name) in a K thread", to stderr (the
//! VMM's log) and to the report file the runtime named (`--seccomp-report`), then ends the
//! process with [`SECCOMP_EXIT`]. The handler uses only `write` and `exit_group`, which every
//! list allows. `husk state` and the shim read the report to say why the VMM ended.
//!
//! `clone3` answers `ENOSYS` (the process filter's own answer): its flags live in memory a
//! filter cannot read, and glibc then falls back to `clone`, whose flags the list pins to a
//! new thread's.
//!
//! The programs are compiled here ([`bpf`]), a third the length of seccompiler's, and
//! installed by seccompiler.
//!
//! Development aids, from the environment (only the host's root sets husk-vmm's):
//! `HUSK_VMM_SECCOMP=log` makes a call outside the lists allowed and logged by the kernel
//! (`audit: type=1326 ... comm="husk-vcpu-0" ... syscall=N`) instead of trapped: how the lists
//! are checked against a whole test run. `HUSK_VMM_TEST_FORBIDDEN_SYSCALL` makes husk-vmm call
//! `personality(2)`, which no list allows: with `devices`, the device thread as soon as it is
//! confined; with `sigusr2`, the main thread when the process gets SIGUSR2 (which the run loop
//! then takes instead of dying of it). The tests' proof that the filters are on and that the
//! runtime reports them.

mod bpf;
pub mod names;
pub mod rules;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::fd::{IntoRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use bpf::{BpfError, Check, Pins};
use rules::{Allowed, Args};
use seccompiler::BpfProgram;

/// The exit status of a VMM its filter ended (128 + SIGSYS, as a shell reports a process
/// killed by SIGSYS).
pub const SECCOMP_EXIT: i32 = 128 + libc::SIGSYS;

/// What the report line starts with; the runtime looks for it.
pub const REPORT_PREFIX: &str = "husk-vmm was killed by its seccomp filter";

/// The environment variable that selects the development mode (`log`).
pub const MODE_ENV: &str = "HUSK_VMM_SECCOMP";

/// The environment variable of the test hook.
pub const TEST_HOOK_ENV: &str = "HUSK_VMM_TEST_FORBIDDEN_SYSCALL";

/// The kinds of thread, each with its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Every thread until it narrows itself (the main thread too, until it has started the
    /// others).
    Process,
    /// The main thread once every thread that serves the guest runs.
    Main,
    /// A client of the guest's agent: the container supervisor, the window-size forwarder,
    /// the readiness, renewal and template watchers.
    Agent,
    /// A stdio relay.
    Relay,
    /// The device thread (the event loop and every virtio device but virtio-fs).
    Devices,
    /// The file server's thread (virtio-fs's event loop and the passthrough file system).
    FileServer,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    /// The name used in reports and by the test hook.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Process => "process",
            ThreadKind::Main => "main",
            ThreadKind::Agent => "agent client",
            ThreadKind::Relay => "relay",
            ThreadKind::Devices => "devices",
            ThreadKind::FileServer => "file server",
            ThreadKind::Vcpu => "vcpu",
        }
    }

    /// The entries of this kind's filter (the common ones included). The process filter is
    /// the union of every list: it bounds every thread, and the others narrow it to their own
    /// (the agent and relay lists are within the process list's own calls, which unit tests
    /// check).
    pub fn allowed(self) -> Vec<Allowed> {
        match self {
            ThreadKind::Process => {
                let mut all = rules::list(rules::SETUP_ONLY);
                all.extend(rules::MAIN_ONLY);
                all.extend(rules::DEVICES_ONLY);
                all.extend(rules::FILE_SERVER_ONLY);
                all.extend(rules::VCPU_ONLY);
                all
            }
            ThreadKind::Main => rules::list(rules::MAIN_ONLY),
            ThreadKind::Agent => rules::list(rules::AGENT_ONLY),
            ThreadKind::Relay => rules::list(rules::RELAY_ONLY),
            ThreadKind::Devices => rules::list(rules::DEVICES_ONLY),
            ThreadKind::FileServer => rules::list(rules::FILE_SERVER_ONLY),
            ThreadKind::Vcpu => rules::list(rules::VCPU_ONLY),
        }
    }
}

/// Whether [`confine_process`] has run in this process (husk-vmm once its VM is built).
static CONFINED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Errors of installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0} seccomp filter")]
    Build(&'static str, #[source] BpfError),
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot open the seccomp report file {0}")]
    Report(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    #[error("{MODE_ENV}={0}: expected `log` or nothing")]
    Mode(String),
}

/// What a call outside the lists does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Trap,
    Log,
}

fn mode() -> Result<Mode, SeccompError> {
    match std::env::var(MODE_ENV) {
        Err(_) => Ok(Mode::Trap),
        Ok(v) if v.is_empty() => Ok(Mode::Trap),
        Ok(v) if v == "log" => Ok(Mode::Log),
        Ok(v) => Err(SeccompError::Mode(v)),
    }
}

/// The report file's descriptor, or -1.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// The calling thread's kind, for the report (plain data: read in the signal handler).
    static KIND: Cell<ThreadKind> = const { Cell::new(ThreadKind::Process) };
}

/// The low 32 bits an argument check compares (the lists pin 32-bit values: flags, request
/// numbers, descriptors, pids).
fn low32(value: u64) -> Result<u32, BpfError> {
    u32::try_from(value).map_err(|_| BpfError::Value(value))
}

fn pins_of(args: Args) -> Result<Pins, BpfError> {
    let eq = |index, value| low32(value).map(|value| Check::Eq { index, value });
    Ok(match args {
        Args::Any => Pins::Any,
        Args::OneOf { index, values } => Pins::OneOf(
            values
                .iter()
                .map(|v| eq(index, *v))
                .collect::<Result<_, _>>()?,
        ),
        Args::Clear { index, mask } => Pins::OneOf(vec![Check::MaskedEq {
            index,
            mask: low32(mask)?,
            value: 0,
        }]),
        Args::OwnPid { index } => Pins::OneOf(vec![eq(index, u64::from(std::process::id()))?]),
        Args::IoctlOrKvm { values } => {
            let mut checks: Vec<Check> =
                values.iter().map(|v| eq(1, *v)).collect::<Result<_, _>>()?;
            checks.push(Check::MaskedEq {
                index: 1,
                mask: low32(rules::ioctls::KVM_TYPE_MASK)?,
                value: low32(rules::ioctls::KVM_TYPE)?,
            });
            Pins::OneOf(checks)
        }
    })
}

/// `kind`'s list as [`bpf::compile`] takes it: entries of one call (from several lists) join,
/// any of their pins allowing the call, and an entry without pins allows it whatever its
/// arguments.
fn joined(kind: ThreadKind) -> Result<BTreeMap<i64, Pins>, BpfError> {
    let mut joined: BTreeMap<i64, Pins> = BTreeMap::new();
    for allowed in kind.allowed() {
        let pins = pins_of(allowed.args)?;
        match (joined.get_mut(&allowed.nr), pins) {
            (None, pins) => {
                joined.insert(allowed.nr, pins);
            }
            (Some(entry), Pins::Any) => *entry = Pins::Any,
            (Some(Pins::OneOf(checks)), Pins::OneOf(more)) => checks.extend(more),
            (Some(Pins::Any), Pins::OneOf(_)) => {}
        }
    }
    Ok(joined)
}

/// The calls the process filter answers itself: `clone3` with `ENOSYS` (see the module docs).
/// The lists name it so that the lists stacked on the process list let that answer through.
fn answers(kind: ThreadKind) -> Vec<(i64, u32)> {
    match kind {
        ThreadKind::Process => vec![(libc::SYS_clone3, bpf::RET_ERRNO | libc::ENOSYS as u32)],
        _ => Vec::new(),
    }
}

/// The BPF program of `kind`'s list.
fn program(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind.name(), e);
    let mut allowed = joined(kind).map_err(build)?;
    let answers = answers(kind);
    for (nr, _) in &answers {
        allowed.remove(nr);
    }
    let mismatch = match mode {
        Mode::Trap => bpf::RET_TRAP,
        Mode::Log => bpf::RET_LOG,
    };
    bpf::compile(&allowed, &answers, mismatch).map_err(build)
}

/// Confines the whole process: opens the report file, installs the `SIGSYS` handler, then the
/// process list on every thread. Call it once the microVM is built and the capabilities are
/// dropped (`no_new_privs` set), before the threads that serve the guest start.
pub fn confine_process(report: Option<&Path>) -> Result<(), SeccompError> {
    let mode = mode()?;
    if let Some(path) = report {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| SeccompError::Report(path.to_path_buf(), e))?;
        REPORT_FD.store(file.into_raw_fd(), Ordering::Release);
    }
    install_sigsys_handler()?;
    let process = program(ThreadKind::Process, mode)?;
    seccompiler::apply_filter_all_threads(&process)
        .map_err(|e| SeccompError::Install(ThreadKind::Process.name(), e))?;
    CONFINED.store(true, Ordering::Release);
    if mode == Mode::Log {
        tracing::warn!("{MODE_ENV}=log: calls outside the seccomp lists are logged, not stopped");
    }
    Ok(())
}

/// `kind`'s program, compiled once per process: several threads of a kind (the agent clients,
/// the relays) confine themselves, each as it starts, while the guest waits on them.
fn cached_program(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, SeccompError> {
    static COMPILED: Mutex<Vec<((ThreadKind, Mode), BpfProgram)>> = Mutex::new(Vec::new());
    // Compiled under the lock, so that threads of one kind starting together compile it once.
    let mut compiled = COMPILED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, found)) = compiled.iter().find(|(k, _)| *k == (kind, mode)) {
        return Ok(found.clone());
    }
    let program = program(kind, mode)?;
    compiled.push(((kind, mode), program.clone()));
    Ok(program)
}

/// Narrows the calling thread to `kind`'s list (on top of the process list).
pub fn confine_thread(kind: ThreadKind) -> Result<(), SeccompError> {
    let mode = mode()?;
    let filter = cached_program(kind, mode)?;
    seccompiler::apply_filter(&filter).map_err(|e| SeccompError::Install(kind.name(), e))?;
    KIND.with(|k| k.set(kind));
    Ok(())
}

/// Narrows the main thread to its own list ([`rules::MAIN_ONLY`]), when the process is
/// confined: husk-vmm's run loop calls it once it has started every thread that serves the
/// guest, and starts none after (a thread started later would inherit this list, which cannot
/// start or narrow one).
pub fn narrow_main_thread() -> Result<(), SeccompError> {
    if !CONFINED.load(Ordering::Acquire) {
        return Ok(());
    }
    confine_thread(ThreadKind::Main)
}

/// Narrows a helper thread (an agent client or a relay) to `kind`'s list, as the first thing
/// it does, when the process is confined: in husk-vmm once its VM is built. The same relays
/// serve `husk exec` in the runtime's own process, which has no filters, and stay as they
/// are there. A helper that cannot narrow itself ends the process (fail closed: no guest data
/// is handled by a helper with more than its list), as the device thread does.
pub fn confine_helper(kind: ThreadKind) {
    if !CONFINED.load(Ordering::Acquire) {
        return;
    }
    if let Err(e) = confine_thread(kind) {
        tracing::error!("{} thread: {e}", kind.name());
        eprintln!("husk-vmm: {} thread: {e}", kind.name());
        std::process::exit(1);
    }
}

/// The test hook's moment: the device thread, once confined.
pub const HOOK_DEVICES: &str = "devices";
/// The test hook's moment: the main thread, on SIGUSR2.
pub const HOOK_SIGUSR2: &str = "sigusr2";

/// Whether `HUSK_VMM_TEST_FORBIDDEN_SYSCALL` names `hook`.
pub fn test_hook_armed(hook: &str) -> bool {
    std::env::var(TEST_HOOK_ENV).is_ok_and(|v| v == hook)
}

/// The test hook: when `HUSK_VMM_TEST_FORBIDDEN_SYSCALL` names `hook`, makes a call no list
/// allows (`personality(0xffffffff)`, which only reads the persona), so the filter ends the VMM.
pub fn test_hook(hook: &str) {
    if test_hook_armed(hook) {
        tracing::warn!("{TEST_HOOK_ENV}={hook}: calling personality(2), which no list allows");
        // SAFETY: personality(0xffffffff) only reads the calling process's persona.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler below only calls async-signal-safe
    // system calls (write, exit_group) on data that needs no locks.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = sigsys_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The `si_syscall` field of a `SIGSYS` siginfo: after `si_signo`, `si_errno`, `si_code` and
/// padding (16 bytes), `si_call_addr` (8), then the call number (an `int`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS the
    // call number is an int at SI_SYSCALL_OFFSET.
    let nr =
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) };
    let kind = KIND.with(Cell::get);
    let mut line = Line::new();
    line.push(REPORT_PREFIX);
    line.push(": syscall ");
    line.push_number(i64::from(nr));
    line.push(" (");
    line.push(names::syscall_name(i64::from(nr)).unwrap_or("unknown"));
    line.push(") in a ");
    line.push(kind.name());
    line.push(" thread\n");
    let report = REPORT_FD.load(Ordering::Acquire);
    for fd in [libc::STDERR_FILENO, report] {
        if fd >= 0 {
            write_all(fd, line.bytes());
        }
    }
    // SAFETY: exit_group ends the process; nothing after it runs.
    unsafe { libc::syscall(libc::SYS_exit_group, SECCOMP_EXIT) };
}

fn write_all(fd: RawFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for reading its length.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

/// A fixed buffer for the handler's line (no allocation in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, s: &str) {
        for b in s.bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push("-");
        }
        for &d in &digits[i..] {
            if self.len < self.buf.len() {
                self.buf[self.len] = d;
                self.len += 1;
            }
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The report line in `text` (a report file or a log), if the filter ended the VMM.
pub fn find_report(text: &str) -> Option<&str> {
    text.lines()
        .rev()
        .find(|l| l.starts_with(REPORT_PREFIX))
        .map(str::trim)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ALL_KINDS: [ThreadKind; 7] = [
        ThreadKind::Process,
        ThreadKind::Main,
        ThreadKind::Agent,
        ThreadKind::Relay,
        ThreadKind::Devices,
        ThreadKind::FileServer,
        ThreadKind::Vcpu,
    ];

    #[test]
    fn every_list_compiles_in_both_modes() {
        for kind in ALL_KINDS {
            for mode in [Mode::Trap, Mode::Log] {
                let prog = program(kind, mode).unwrap();
                assert!(!prog.is_empty());
                // The kernel takes at most 4096 instructions per filter.
                assert!(
                    prog.len() < 4096,
                    "{} has {} instructions",
                    kind.name(),
                    prog.len()
                );
            }
        }
    }

    /// seccompiler's program of `kind`'s list, and of the `clone3` filter that went with the
    /// process list: the reference [`program`] is checked against.
    fn reference(kind: ThreadKind, mode: Mode) -> Vec<BpfProgram> {
        use seccompiler::{
            SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
            SeccompRule, TargetArch,
        };
        let rule = |index, op, value| {
            SeccompRule::new(vec![SeccompCondition::new(
                index,
                SeccompCmpArgLen::Dword,
                op,
                value,
            )
            .unwrap()])
            .unwrap()
        };
        let mut joined: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
        for allowed in kind.allowed() {
            let rules: Vec<SeccompRule> = match allowed.args {
                Args::Any => Vec::new(),
                Args::OneOf { index, values } => values
                    .iter()
                    .map(|v| rule(index, SeccompCmpOp::Eq, *v))
                    .collect(),
                Args::Clear { index, mask } => vec![rule(index, SeccompCmpOp::MaskedEq(mask), 0)],
                Args::OwnPid { index } => {
                    vec![rule(index, SeccompCmpOp::Eq, u64::from(std::process::id()))]
                }
                Args::IoctlOrKvm { values } => values
                    .iter()
                    .map(|v| rule(1, SeccompCmpOp::Eq, *v))
                    .chain([rule(
                        1,
                        SeccompCmpOp::MaskedEq(rules::ioctls::KVM_TYPE_MASK),
                        rules::ioctls::KVM_TYPE,
                    )])
                    .collect(),
            };
            let entry = joined.entry(allowed.nr).or_insert_with(|| Some(Vec::new()));
            match (rules.is_empty(), entry.as_mut()) {
                (true, _) => *entry = None,
                (false, Some(pins)) => pins.extend(rules),
                (false, None) => {}
            }
        }
        let map = joined
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect();
        let mismatch = match mode {
            Mode::Trap => SeccompAction::Trap,
            Mode::Log => SeccompAction::Log,
        };
        let list = SeccompFilter::new(map, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .unwrap()
            .try_into()
            .unwrap();
        if kind != ThreadKind::Process {
            return vec![list];
        }
        let clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .unwrap()
        .try_into()
        .unwrap();
        vec![list, clone3]
    }

    /// The kernel's answer from a stack of filters: the strictest (`KILL_PROCESS` first, then
    /// the lowest action value).
    fn strictest(answers: impl Iterator<Item = u32>) -> u32 {
        answers.min_by_key(|k| *k as i32).unwrap()
    }

    /// Every value a list pins, and neighbours of it: the arguments the equivalence is checked
    /// with.
    fn argument_values() -> Vec<u64> {
        let mut values = vec![0, 1, 2, 0xffff_ffff, u64::from(std::process::id())];
        for kind in ALL_KINDS {
            for allowed in kind.allowed() {
                match allowed.args {
                    Args::OneOf { values: pinned, .. } | Args::IoctlOrKvm { values: pinned } => {
                        values.extend(pinned)
                    }
                    Args::Clear { mask, .. } => values.extend([mask, mask & mask.wrapping_neg()]),
                    Args::Any | Args::OwnPid { .. } => {}
                }
            }
        }
        let kvm = rules::ioctls::KVM_TYPE;
        values.extend([kvm, kvm | 0x80, kvm | 0xc008_0000, kvm ^ 0x100]);
        let mut more = Vec::new();
        for v in &values {
            more.extend([
                v.wrapping_add(1),
                v.wrapping_sub(1),
                v | 1 << 32,
                v ^ 0x4000,
            ]);
        }
        values.extend(more);
        values.sort_unstable();
        values.dedup();
        values
    }

    #[test]
    fn every_program_answers_as_seccompilers_did() {
        let values = argument_values();
        let x86_64 = 62 | 0x8000_0000 | 0x4000_0000;
        let i386 = 3 | 0x4000_0000;
        for kind in ALL_KINDS {
            for mode in [Mode::Trap, Mode::Log] {
                let ours = program(kind, mode).unwrap();
                let theirs = reference(kind, mode);
                let listed: Vec<i64> = kind.allowed().iter().map(|a| a.nr).collect();
                let mut checked = 0;
                for nr in (0..600).chain(0x4000_0000..0x4000_0010) {
                    let mut cases = vec![(x86_64, [0u64; 6]), (i386, [0; 6])];
                    if listed.contains(&i64::from(nr)) || nr == libc::SYS_clone3 as u32 {
                        for &v in &values {
                            cases.push((x86_64, [v; 6]));
                            for index in 0..6 {
                                let mut args = [0; 6];
                                args[index] = v;
                                cases.push((x86_64, args));
                            }
                        }
                    }
                    for (arch, args) in cases {
                        let want = strictest(theirs.iter().map(|p| bpf::run(p, nr, arch, args)));
                        let got = bpf::run(&ours, nr, arch, args);
                        assert_eq!(
                            got,
                            want,
                            "{} ({mode:?}): call {nr}, arch {arch:#x}, args {args:x?}",
                            kind.name()
                        );
                        checked += 1;
                    }
                }
                assert!(checked > 10_000, "{checked}");
            }
        }
    }

    #[test]
    fn programs_are_a_third_of_seccompilers() {
        for kind in ALL_KINDS {
            let ours = program(kind, Mode::Trap).unwrap().len();
            let theirs: usize = reference(kind, Mode::Trap).iter().map(Vec::len).sum();
            assert!(
                ours * 2 < theirs,
                "{}: {ours} against {theirs}",
                kind.name()
            );
        }
    }

    #[test]
    fn a_kinds_cached_program_is_the_freshly_compiled_one() {
        for kind in ALL_KINDS {
            let first = cached_program(kind, Mode::Trap).unwrap();
            let again = cached_program(kind, Mode::Trap).unwrap();
            assert_eq!(first, program(kind, Mode::Trap).unwrap(), "{kind:?}");
            assert_eq!(again, first, "{kind:?}");
        }
        // Each mode its own program: the same calls, another action on a mismatch.
        let log = cached_program(ThreadKind::Relay, Mode::Log).unwrap();
        assert_ne!(log, cached_program(ThreadKind::Relay, Mode::Trap).unwrap());
    }

    #[test]
    fn the_process_list_holds_every_call_of_the_narrower_lists() {
        let process: Vec<i64> = ThreadKind::Process.allowed().iter().map(|a| a.nr).collect();
        for kind in [
            ThreadKind::Main,
            ThreadKind::Agent,
            ThreadKind::Relay,
            ThreadKind::Devices,
            ThreadKind::FileServer,
            ThreadKind::Vcpu,
        ] {
            for a in kind.allowed() {
                assert!(process.contains(&a.nr), "{} of {}", a.nr, kind.name());
            }
        }
        // Pins join: the process filter lets the device thread's TUNGETIFF through and the
        // vCPU thread's KVM_RUN, and still no other ioctl than its own and theirs.
        let ioctls: Vec<Args> = ThreadKind::Process
            .allowed()
            .iter()
            .filter(|a| a.nr == libc::SYS_ioctl)
            .map(|a| a.args)
            .collect();
        assert_eq!(ioctls.len(), 3);
    }

    /// A relay stacks its list on the agent clients' (the supervisor starts it), and both on
    /// the main thread's own calls: each is within the one below it, pins included, and
    /// narrower.
    #[test]
    fn helper_lists_narrow_the_list_they_are_stacked_on() {
        fn within(inner: &[rules::Allowed], outer: &[rules::Allowed]) {
            for a in inner {
                let b = outer.iter().find(|b| b.nr == a.nr).unwrap_or_else(|| {
                    panic!("{:?} not in the outer list", names::syscall_name(a.nr))
                });
                match (a.args, b.args) {
                    (_, Args::Any) => {}
                    (
                        Args::OneOf { index, values },
                        Args::OneOf {
                            index: i,
                            values: v,
                        },
                    ) => {
                        assert_eq!(index, i);
                        assert!(values.iter().all(|x| v.contains(x)), "{}", a.nr);
                    }
                    (Args::OneOf { index: 1, values }, Args::IoctlOrKvm { values: v })
                    | (Args::IoctlOrKvm { values }, Args::IoctlOrKvm { values: v }) => {
                        assert!(values.iter().all(|x| v.contains(x)), "ioctl");
                    }
                    (Args::OwnPid { index }, Args::OwnPid { index: i }) => assert_eq!(index, i),
                    (Args::Clear { index, mask }, Args::Clear { index: i, mask: m }) => {
                        assert_eq!(index, i);
                        assert_eq!(mask & m, m, "{}", a.nr);
                    }
                    (x, y) => panic!("{}: {x:?} is not within {y:?}", a.nr),
                }
            }
            assert!(inner.len() < outer.len());
        }
        let mut process_own = rules::list(rules::SETUP_ONLY);
        process_own.extend(rules::MAIN_ONLY);
        let main = ThreadKind::Main.allowed();
        let agent = ThreadKind::Agent.allowed();
        let relay = ThreadKind::Relay.allowed();
        within(&main, &process_own);
        within(&agent, &process_own);
        within(&relay, &agent);
        // Never KVM, nor the file server's or a template's calls, in an agent client.
        for nr in [
            libc::SYS_mknodat,
            libc::SYS_linkat,
            libc::SYS_ftruncate,
            libc::SYS_mincore,
        ] {
            assert!(agent.iter().all(|a| a.nr != nr), "{nr}");
        }
        let ioctl = agent.iter().find(|a| a.nr == libc::SYS_ioctl).unwrap();
        assert!(
            matches!(ioctl.args, Args::OneOf { index: 1, values } if !values.contains(&rules::ioctls::KVM_RUN))
        );
        assert!(relay
            .iter()
            .all(|a| a.nr != libc::SYS_openat && a.nr != libc::SYS_connect));
    }

    /// Once narrowed, the main thread can start no thread, narrow no filter, and make none of
    /// the calls only the threads serving the guest need.
    #[test]
    fn the_main_threads_list_holds_none_of_the_other_threads_calls() {
        let main: Vec<i64> = ThreadKind::Main.allowed().iter().map(|a| a.nr).collect();
        for nr in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_seccomp,
            libc::SYS_capset,
            libc::SYS_mknodat,
            libc::SYS_linkat,
            libc::SYS_symlinkat,
            libc::SYS_fchownat,
            libc::SYS_setresuid,
            libc::SYS_unshare,
            libc::SYS_umask,
            libc::SYS_accept4,
            libc::SYS_timerfd_create,
        ] {
            assert!(!main.contains(&nr), "{:?}", names::syscall_name(nr));
        }
        // Still the run loop's, teardown's and a template's.
        for nr in [
            libc::SYS_poll,
            libc::SYS_read,
            libc::SYS_tgkill,
            libc::SYS_ioctl,
            libc::SYS_openat,
            libc::SYS_pwrite64,
            libc::SYS_renameat2,
            libc::SYS_mincore,
        ] {
            assert!(main.contains(&nr), "{:?}", names::syscall_name(nr));
        }
    }

    #[test]
    fn the_handlers_line_names_the_call() {
        let mut line = Line::new();
        line.push("syscall ");
        line.push_number(135);
        line.push(" (");
        line.push(names::syscall_name(135).unwrap());
        line.push(")");
        assert_eq!(line.bytes(), b"syscall 135 (personality)");
        let mut line = Line::new();
        line.push_number(0);
        line.push_number(-7);
        assert_eq!(line.bytes(), b"0-7");
    }

    #[test]
    fn names_are_sorted_and_known() {
        assert!(names::SYSCALL_NAMES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(names::syscall_name(libc::SYS_read), Some("read"));
        assert_eq!(names::syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(names::syscall_name(libc::SYS_clone3), Some("clone3"));
        assert_eq!(names::syscall_name(9999), None);
    }

    #[test]
    fn a_report_is_found_in_a_log() {
        let log = "WARN something\nhusk-vmm was killed by its seccomp filter: syscall 135 \
                   (personality) in a devices thread\n";
        assert_eq!(
            find_report(log),
            Some("husk-vmm was killed by its seccomp filter: syscall 135 (personality) in a devices thread")
        );
        assert_eq!(find_report("nothing here\n"), None);
    }

    const CHILD_ENV: &str = "HUSK_SECCOMP_TEST_CHILD_REPORT";
    const CHILD_CALL_ENV: &str = "HUSK_SECCOMP_TEST_CHILD_CALL";

    /// Run by [`a_call_outside_the_list_ends_the_process_with_a_report`] in a process of its
    /// own (a filter cannot be removed); does nothing in the normal run.
    #[test]
    fn child_confines_itself_and_calls_outside_its_list() {
        let Ok(report) = std::env::var(CHILD_ENV) else {
            return;
        };
        // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        assert_eq!(rc, 0);
        let parent = nix::unistd::getppid();
        confine_process(Some(Path::new(&report))).unwrap();
        if std::env::var(CHILD_CALL_ENV).as_deref() == Ok("kill") {
            // Allowed: a signal to itself (0 only checks).
            let me = nix::unistd::getpid();
            nix::sys::signal::kill(me, None).unwrap();
            // Not to any other process, here the parent.
            let _ = nix::sys::signal::kill(parent, None);
            unreachable!("kill(2) of another process was allowed");
        }
        if std::env::var(CHILD_CALL_ENV).as_deref() == Ok("main-umask") {
            narrow_main_thread().unwrap();
            // Allowed: a read of nothing.
            // SAFETY: a zero-length read touches no memory.
            unsafe { libc::read(-1, std::ptr::null_mut(), 0) };
            // Not the file server's umask(2).
            // SAFETY: umask only sets the process's file mode mask.
            unsafe { libc::umask(0o022) };
            unreachable!("the main thread's umask(2) was allowed");
        }
        if std::env::var(CHILD_CALL_ENV).as_deref() == Ok("relay-open") {
            confine_helper(ThreadKind::Agent);
            confine_helper(ThreadKind::Relay);
            // Allowed: a read of nothing.
            // SAFETY: a zero-length read touches no memory.
            unsafe { libc::read(-1, std::ptr::null_mut(), 0) };
            // Not opening a file, which the agent client may.
            let _ = std::fs::File::open("/dev/null");
            unreachable!("a relay opened a file");
        }
        confine_thread(ThreadKind::Devices).unwrap();
        // Allowed: a read of nothing.
        // SAFETY: a zero-length read touches no memory.
        unsafe { libc::read(-1, std::ptr::null_mut(), 0) };
        // SAFETY: personality(0xffffffff) only reads the persona.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
        unreachable!("personality(2) was allowed");
    }

    /// Runs the child test with `call`; returns its report file's line and stderr's.
    fn child_report(call: &str) -> (Option<String>, Option<String>) {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("report");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::child_confines_itself_and_calls_outside_its_list",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_ENV, &report)
            .env(CHILD_CALL_ENV, call)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(SECCOMP_EXIT), "stderr: {stderr}");
        (
            find_report(&std::fs::read_to_string(&report).unwrap()).map(str::to_owned),
            find_report(&stderr).map(str::to_owned),
        )
    }

    /// husk-vmm may signal itself, and no other process.
    #[test]
    fn a_signal_to_another_process_ends_the_process_with_a_report() {
        let (report, stderr) = child_report("kill");
        let expected = format!(
            "husk-vmm was killed by its seccomp filter: syscall 62 (kill) in a {} thread",
            ThreadKind::Process.name()
        );
        assert_eq!(report.as_deref(), Some(expected.as_str()));
        assert_eq!(stderr.as_deref(), Some(expected.as_str()));
    }

    /// The main thread, once narrowed, cannot make the file server's calls.
    #[test]
    fn a_narrowed_main_thread_making_a_file_servers_call_ends_the_process() {
        let (report, stderr) = child_report("main-umask");
        let expected = "husk-vmm was killed by its seccomp filter: syscall 95 (umask) \
                        in a main thread";
        assert_eq!(report.as_deref(), Some(expected));
        assert_eq!(stderr.as_deref(), Some(expected));
    }

    /// A relay, narrowed on an agent client's list, cannot open a file.
    #[test]
    fn a_relay_that_opens_a_file_ends_the_process_with_a_report() {
        let (report, stderr) = child_report("relay-open");
        let expected = "husk-vmm was killed by its seccomp filter: syscall 257 (openat) \
                        in a relay thread";
        assert_eq!(report.as_deref(), Some(expected));
        assert_eq!(stderr.as_deref(), Some(expected));
    }

    /// The devices list traps a call outside it; the handler reports it and the process
    /// ends with SECCOMP_EXIT.
    #[test]
    fn a_call_outside_the_list_ends_the_process_with_a_report() {
        let (report, stderr) = child_report("personality");
        let expected = "husk-vmm was killed by its seccomp filter: syscall 135 (personality) \
                        in a devices thread";
        assert_eq!(report.as_deref(), Some(expected));
        assert_eq!(stderr.as_deref(), Some(expected));
    }
}
