//! The reviewed allowlists: which system calls each kind of `husk-vmm` thread may make, with
//! arguments pinned where they matter, and who needs each.
//!
//! The lists, applied in layers (see [`super`]):
//! - the process list: [`SETUP_ONLY`], [`MAIN_ONLY`] and every list below, every thread's outer
//!   bound, installed on the whole process once the microVM is built. [`SETUP_ONLY`] holds
//!   what threads need before they narrow themselves (starting a thread, naming it, dropping
//!   its capabilities, installing its filter).
//! - [`MAIN_ONLY`]: the main thread, stacked on the process list once every thread that serves
//!   the guest has started (the run loop, teardown, snapshot writing).
//! - [`AGENT_ONLY`]: the agent's clients (the container supervisor, the window-size
//!   forwarder, the readiness, renewal and template watchers), stacked on the process list.
//! - [`RELAY_ONLY`]: the stdio relays, stacked on the agent list (the supervisor starts them).
//! - [`DEVICES_ONLY`]: the device thread (the event loop serving the vsock muxer, network
//!   card, entropy source and balloon), stacked on the process list.
//! - [`FILE_SERVER_ONLY`]: the file server's thread (virtio-fs), stacked on the process list.
//! - [`VCPU_ONLY`]: each vCPU thread (KVM_RUN and the devices' register handlers), stacked on
//!   the process list.
//!
//! A stacked list can only narrow: the kernel runs every filter of a thread and takes the
//! strictest answer. Any call outside a thread's lists traps (see [`super`]); so does an
//! argument outside its pins.

use libc::c_long;

/// How a call's arguments are pinned.
#[derive(Clone, Copy, Debug)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Argument `index` (its low 32 bits) is one of `values`.
    OneOf { index: u8, values: &'static [u64] },
    /// Argument `index` has none of the bits of `mask` set.
    Clear { index: u8, mask: u64 },
    /// An `ioctl` whose request (argument 1) is one of `values` or of KVM's type.
    IoctlOrKvm { values: &'static [u64] },
    /// Argument `index` is husk-vmm's own pid: a signal only to itself (in its own pid
    /// namespace it reaches no other process anyway; a husk-vmm its runtime could not give one
    /// shares the host's, see [`crate::jail`]).
    OwnPid { index: u8 },
}

/// One allowed system call.
#[derive(Clone, Copy, Debug)]
pub struct Allowed {
    pub nr: c_long,
    pub args: Args,
    /// Who makes the call, and why.
    pub why: &'static str,
}

const fn any(nr: c_long, why: &'static str) -> Allowed {
    Allowed {
        nr,
        args: Args::Any,
        why,
    }
}

const fn one_of(nr: c_long, index: u8, values: &'static [u64], why: &'static str) -> Allowed {
    Allowed {
        nr,
        args: Args::OneOf { index, values },
        why,
    }
}

const fn own_pid(nr: c_long, index: u8, why: &'static str) -> Allowed {
    Allowed {
        nr,
        args: Args::OwnPid { index },
        why,
    }
}

const fn clear(nr: c_long, index: u8, mask: u64, why: &'static str) -> Allowed {
    Allowed {
        nr,
        args: Args::Clear { index, mask },
        why,
    }
}

/// `ioctl` request numbers (`_IO`, `_IOR`, `_IOW`, `_IOWR` of `<asm-generic/ioctl.h>`).
pub mod ioctls {
    const NONE: u64 = 0;
    const WRITE: u64 = 1;
    const READ: u64 = 2;

    const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
    }

    const KVMIO: u64 = 0xAE;

    pub const KVM_RUN: u64 = ioc(NONE, KVMIO, 0x80, 0);
    pub const KVM_GET_REGS: u64 = ioc(READ, KVMIO, 0x81, size_of::<kvm_bindings::kvm_regs>());
    pub const KVM_GET_SREGS: u64 = ioc(READ, KVMIO, 0x83, size_of::<kvm_bindings::kvm_sregs>());

    /// Every request of KVM's type byte (`(request & KVM_TYPE_MASK) == KVM_TYPE`).
    pub const KVM_TYPE: u64 = KVMIO << 8;
    pub const KVM_TYPE_MASK: u64 = 0xff << 8;

    pub const TCGETS: u64 = 0x5401;
    pub const TCSETS: u64 = 0x5402;
    pub const TCSETSW: u64 = 0x5403;
    pub const TCSETSF: u64 = 0x5404;
    pub const TIOCSCTTY: u64 = 0x540E;
    pub const TIOCGPGRP: u64 = 0x540F;
    pub const TIOCGWINSZ: u64 = 0x5413;
    pub const TIOCSWINSZ: u64 = 0x5414;
    pub const FIONREAD: u64 = 0x541B;
    pub const FIONBIO: u64 = 0x5421;
    pub const TIOCGPTPEER: u64 = 0x5441;
    pub const FIONCLEX: u64 = 0x5450;
    pub const FIOCLEX: u64 = 0x5451;
    pub const TIOCGPTN: u64 = ioc(READ, b'T' as u64, 0x30, size_of::<u32>());
    pub const TIOCSPTLCK: u64 = ioc(WRITE, b'T' as u64, 0x31, size_of::<i32>());
    pub const TUNGETIFF: u64 = ioc(READ, b'T' as u64, 0xd2, size_of::<u32>());
    pub const TUNSETOFFLOAD: u64 = ioc(WRITE, b'T' as u64, 0xd0, size_of::<u32>());
}

use ioctls::*;

/// The `clone` flags of a new thread (glibc's `pthread_create`); nothing else may be cloned:
/// no process is ever started once the VM is built.
pub const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// What every thread may do: memory, locks, time, leaving. In each list.
const COMMON: &[Allowed] = &[
    any(
        libc::SYS_futex,
        "every lock and condition variable (std's Mutex, Condvar, Arc)",
    ),
    clear(
        libc::SYS_mmap,
        2,
        libc::PROT_EXEC as u64,
        "the allocator and thread stacks; never executable",
    ),
    clear(
        libc::SYS_mprotect,
        2,
        libc::PROT_EXEC as u64,
        "the allocator's arenas and thread stack guards; never executable",
    ),
    any(libc::SYS_munmap, "the allocator; thread stacks"),
    any(libc::SYS_mremap, "the allocator growing a large buffer"),
    any(libc::SYS_brk, "the allocator"),
    any(
        libc::SYS_madvise,
        "the allocator returning memory; glibc frees an ending thread's stack; the balloon drops the \
         guest pages the guest reported free (MADV_DONTNEED)",
    ),
    any(
        libc::SYS_clock_gettime,
        "time, where the vDSO falls back to the kernel",
    ),
    any(libc::SYS_gettid, "logging and locks"),
    any(libc::SYS_getrandom, "hash maps' random keys"),
    any(libc::SYS_sched_yield, "spin loops in locks"),
    any(
        libc::SYS_rt_sigreturn,
        "returning from the vCPU kick signal's handler",
    ),
    any(
        libc::SYS_rt_sigprocmask,
        "glibc blocks signals while a thread ends",
    ),
    any(
        libc::SYS_sigaltstack,
        "std removes a thread's signal stack when it ends",
    ),
    any(
        libc::SYS_restart_syscall,
        "a sleep, wait or poll stopped by SIGSTOP or a debugger resumes through it on SIGCONT",
    ),
    any(libc::SYS_exit, "a thread ends"),
    any(
        libc::SYS_exit_group,
        "the process ends (also the seccomp trap's report)",
    ),
    any(
        libc::SYS_write,
        "logs to stderr; eventfd signals; the seccomp trap's report",
    ),
    any(libc::SYS_close, "dropping a descriptor"),
];

/// What every thread needs until it narrows itself, and the main thread until every thread
/// that serves the guest runs: starting threads, naming them, dropping their capabilities,
/// narrowing their filters, making the event loops. Part of the process list; not of the main
/// thread's own list, which it narrows itself to once the last of those threads started.
pub const SETUP_ONLY: &[Allowed] = &[
    one_of(
        libc::SYS_clone,
        0,
        &[THREAD_CLONE_FLAGS],
        "starting a thread (never a process)",
    ),
    any(
        libc::SYS_clone3,
        "glibc tries clone3 first; the filter answers ENOSYS (its arguments cannot be checked) \
         and glibc falls back to clone",
    ),
    any(
        libc::SYS_set_robust_list,
        "a new thread's robust futex list (glibc)",
    ),
    any(
        libc::SYS_rseq,
        "a new thread registers restartable sequences (glibc)",
    ),
    one_of(
        libc::SYS_prctl,
        0,
        &[
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            libc::PR_CAPBSET_READ as u64,
            libc::PR_CAP_AMBIENT as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
        ],
        "naming threads (std); dropping a vCPU thread's capabilities (caps); seccompiler sets \
         no_new_privs before a thread narrows its filter",
    ),
    any(
        libc::SYS_seccomp,
        "every thread narrows its filter, the main thread last (a filter can only narrow)",
    ),
    any(
        libc::SYS_capget,
        "dropping a thread's capabilities (vCPU threads, the file server's thread)",
    ),
    any(libc::SYS_capset, "the same"),
    any(
        libc::SYS_sched_getaffinity,
        "std sizing a thread pool or stack",
    ),
    any(
        libc::SYS_epoll_create1,
        "the device thread's event loop is made on the main thread",
    ),
];

/// The main thread once every thread that serves the guest runs (the run loop, teardown, a
/// template's writing, mirroring the init's exit), with [`SETUP_ONLY`] the process list's
/// own calls. The helper threads' lists (agent clients, relays) lie within these two.
pub const MAIN_ONLY: &[Allowed] = &[
    own_pid(
        libc::SYS_tgkill,
        0,
        "kicking vCPU threads out of KVM_RUN at teardown; re-raising the init's signal: only \
         husk-vmm's own threads",
    ),
    own_pid(
        libc::SYS_kill,
        0,
        "the supervisor asks its own run loop to stop (SIGTERM to itself): only itself",
    ),
    any(libc::SYS_getpid, "the same; logging"),
    any(
        libc::SYS_nanosleep,
        "waits while joining threads and polling",
    ),
    any(libc::SYS_clock_nanosleep, "the same"),
    any(
        libc::SYS_rt_sigaction,
        "mirroring the init's exit: default disposition for its signal",
    ),
    any(libc::SYS_rt_sigtimedwait, "the run loop"),
    any(
        libc::SYS_prlimit64,
        "mirroring the init's exit: no core dump",
    ),
    any(libc::SYS_setrlimit, "the same"),
    // Waiting.
    any(
        libc::SYS_read,
        "the run loop's signalfd and eventfds; agent replies; stdio relays",
    ),
    any(libc::SYS_readv, "stdio relays"),
    any(libc::SYS_writev, "stdio relays; logs"),
    any(
        libc::SYS_poll,
        "the run loop; the agent client's timed waits; relays",
    ),
    any(libc::SYS_ppoll, "the same"),
    any(libc::SYS_epoll_wait, "the run loop"),
    any(libc::SYS_epoll_pwait, "the same"),
    any(libc::SYS_epoll_ctl, "the run loop"),
    any(
        libc::SYS_signalfd4,
        "the run loop reads SIGTERM and SIGINT from a signalfd",
    ),
    any(
        libc::SYS_eventfd2,
        "the run loop's stop and control eventfds",
    ),
    // Talking to the agent over the vsock socket (a Unix socket), passing the console.
    one_of(
        libc::SYS_socket,
        0,
        &[libc::AF_UNIX as u64],
        "the agent client connects to the VM's vsock socket (Unix only)",
    ),
    one_of(libc::SYS_socketpair, 0, &[libc::AF_UNIX as u64], "the same"),
    any(libc::SYS_connect, "the same"),
    any(libc::SYS_sendto, "agent requests"),
    any(libc::SYS_recvfrom, "agent replies"),
    any(
        libc::SYS_sendmsg,
        "agent requests; handing the console's pty to the engine (SCM_RIGHTS)",
    ),
    any(libc::SYS_recvmsg, "agent replies"),
    any(libc::SYS_setsockopt, "the agent client's timeouts"),
    any(libc::SYS_getsockopt, "socket errors"),
    any(libc::SYS_shutdown, "closing a stream's direction"),
    any(libc::SYS_fcntl, "descriptor flags"),
    any(libc::SYS_dup, "duplicating stdio for the relays"),
    any(libc::SYS_dup3, "the same"),
    any(libc::SYS_pipe2, "relays"),
    // Files: the exit status, the boot report, a template's state and memory, the console pty.
    any(
        libc::SYS_openat,
        "the exit file, the boot report, a template's files, /dev/ptmx, /dev/kvm for a snapshot",
    ),
    any(libc::SYS_newfstatat, "std's file metadata"),
    any(libc::SYS_fstat, "the same"),
    any(libc::SYS_statx, "the same"),
    any(libc::SYS_lseek, "files"),
    any(libc::SYS_pread64, "a template's memory"),
    any(libc::SYS_pwrite64, "a template's memory"),
    any(
        libc::SYS_fsync,
        "a template's files and the exit file reach the disk",
    ),
    any(libc::SYS_fdatasync, "the same"),
    any(libc::SYS_ftruncate, "a template's memory file"),
    any(libc::SYS_fallocate, "the same"),
    any(
        libc::SYS_rename,
        "a template and the reports are written atomically",
    ),
    any(libc::SYS_renameat, "the same"),
    any(libc::SYS_renameat2, "the same"),
    any(
        libc::SYS_unlink,
        "removing the vsock socket and temporary files",
    ),
    any(libc::SYS_unlinkat, "the same"),
    any(libc::SYS_mkdirat, "a template's directory"),
    any(libc::SYS_mkdir, "the same"),
    any(libc::SYS_getdents64, "a template's directory"),
    any(libc::SYS_readlink, "std's backtraces"),
    any(
        libc::SYS_mincore,
        "a template's memory: which pages the guest touched",
    ),
    // ioctl: KVM (snapshot), terminals (the console relay), non-blocking sockets.
    Allowed {
        nr: libc::SYS_ioctl,
        args: Args::IoctlOrKvm {
            values: TERMINAL_IOCTLS,
        },
        why: "KVM's requests (a snapshot's state; the main thread owns the VM), terminals (the \
              console relay, window sizes), non-blocking sockets, close-on-exec",
    },
];

/// The terminal requests of the console relay and of opening a pty (glibc's `openpty`).
const TERMINAL_IOCTLS: &[u64] = &[
    TCGETS,
    TCSETS,
    TCSETSW,
    TCSETSF,
    TIOCSCTTY,
    TIOCGPGRP,
    TIOCGWINSZ,
    TIOCSWINSZ,
    FIONREAD,
    FIONBIO,
    TIOCGPTPEER,
    FIONCLEX,
    FIOCLEX,
    TIOCGPTN,
    TIOCSPTLCK,
];

/// The agent's clients: the container supervisor (and the thread that stops the VM after
/// the container's end), the window-size forwarder, and the readiness, renewal and template
/// watchers. They read the agent's replies, so they are the threads that parse what the
/// guest says; what the main thread alone needs (KVM, the run loop's descriptors, a
/// template's memory, mirroring the init's exit) and what the device and vCPU threads need
/// is not here.
pub const AGENT_ONLY: &[Allowed] = &[
    // Threads: the supervisor starts the stdio relays and the stopping thread.
    one_of(
        libc::SYS_clone,
        0,
        &[THREAD_CLONE_FLAGS],
        "the supervisor starts the relays (a thread, never a process)",
    ),
    any(
        libc::SYS_clone3,
        "glibc tries clone3 first; the filter answers ENOSYS",
    ),
    any(libc::SYS_set_robust_list, "a new thread (glibc)"),
    any(libc::SYS_rseq, "a new thread (glibc)"),
    one_of(
        libc::SYS_prctl,
        0,
        &[
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
        ],
        "a new relay names itself (std); seccompiler sets no_new_privs before it narrows",
    ),
    any(libc::SYS_seccomp, "a new relay narrows its filter"),
    any(
        libc::SYS_sched_getaffinity,
        "std sizing a new thread's stack",
    ),
    own_pid(
        libc::SYS_kill,
        0,
        "the supervisor asks its own run loop to stop (SIGTERM to itself): only itself",
    ),
    any(libc::SYS_getpid, "the same; logging"),
    any(
        libc::SYS_nanosleep,
        "watchers' and the window-size forwarder's polling; the stop's grace",
    ),
    any(libc::SYS_clock_nanosleep, "the same"),
    // The agent over the vsock socket (a Unix socket); the engine's console socket.
    one_of(
        libc::SYS_socket,
        0,
        &[libc::AF_UNIX as u64],
        "connecting to the VM's vsock socket (Unix only)",
    ),
    one_of(
        libc::SYS_socketpair,
        0,
        &[libc::AF_UNIX as u64],
        "stdio relays",
    ),
    any(libc::SYS_connect, "the vsock socket"),
    any(libc::SYS_read, "agent replies; the relays' pipes"),
    any(libc::SYS_readv, "the same"),
    any(libc::SYS_writev, "agent requests; logs"),
    any(libc::SYS_sendto, "agent requests"),
    any(libc::SYS_recvfrom, "agent replies"),
    any(
        libc::SYS_sendmsg,
        "agent requests; handing the console's pty to the engine (SCM_RIGHTS)",
    ),
    any(libc::SYS_recvmsg, "agent replies"),
    any(libc::SYS_poll, "the agent client's timed waits"),
    any(libc::SYS_ppoll, "the same"),
    any(libc::SYS_setsockopt, "the agent client's timeouts"),
    any(libc::SYS_getsockopt, "socket errors"),
    any(libc::SYS_shutdown, "closing a stream's direction"),
    any(libc::SYS_fcntl, "descriptor flags"),
    any(libc::SYS_dup, "the relays' descriptors"),
    any(libc::SYS_dup3, "the same"),
    any(libc::SYS_pipe2, "the relays"),
    // Files: the exit status, the boot report (both written atomically), the console's pty.
    any(
        libc::SYS_openat,
        "the exit file, the boot report, /dev/ptmx and the pty's peer",
    ),
    any(libc::SYS_newfstatat, "std's file metadata; the pty's name"),
    any(libc::SYS_fstat, "the same"),
    any(libc::SYS_statx, "the same"),
    any(libc::SYS_lseek, "files"),
    any(libc::SYS_rename, "the exit file and the boot report"),
    any(libc::SYS_renameat, "the same"),
    any(libc::SYS_renameat2, "the same"),
    any(libc::SYS_unlink, "a temporary file left by a failed write"),
    any(libc::SYS_unlinkat, "the same"),
    any(
        libc::SYS_readlink,
        "the pty's name (ttyname); std's backtraces",
    ),
    any(
        libc::SYS_getdents64,
        "the pty's name: with no /proc in the jail, ttyname looks for it in /dev/pts",
    ),
    own_pid(
        libc::SYS_tgkill,
        0,
        "an abort re-raises its signal: only husk-vmm's own threads",
    ),
    one_of(
        libc::SYS_ioctl,
        1,
        TERMINAL_IOCTLS,
        "terminals only: the console's pty and its window size; non-blocking sockets; \
         close-on-exec. Never KVM",
    ),
];

/// The stdio relays: bytes between the container's streams (vsock connections to the agent)
/// and the engine's pipes or pty. Nothing but reading, writing and closing.
pub const RELAY_ONLY: &[Allowed] = &[
    any(libc::SYS_read, "the stream or pipe copied from"),
    any(libc::SYS_readv, "the same"),
    any(
        libc::SYS_recvfrom,
        "the same, a socket (std's read of a UnixStream)",
    ),
    any(libc::SYS_writev, "the stream or pipe copied to"),
    any(libc::SYS_sendto, "the same, a socket"),
    any(
        libc::SYS_shutdown,
        "stdin's relay ends the stream's direction at end of input",
    ),
];

/// The device thread: the event loop and every device it serves (all but virtio-fs).
pub const DEVICES_ONLY: &[Allowed] = &[
    any(libc::SYS_epoll_wait, "the event loop"),
    any(libc::SYS_epoll_pwait, "the same"),
    any(
        libc::SYS_epoll_ctl,
        "devices adding and removing descriptors (vsock connections)",
    ),
    any(libc::SYS_read, "eventfds; the TAP; vsock connections"),
    any(libc::SYS_readv, "the TAP"),
    any(libc::SYS_writev, "the TAP"),
    // vsock: host connections accepted on the listening socket; the guest's to `<socket>_<port>`.
    any(libc::SYS_accept4, "vsock: the host connects to the guest"),
    one_of(
        libc::SYS_socket,
        0,
        &[libc::AF_UNIX as u64],
        "vsock: the guest connects to a host port's Unix socket",
    ),
    any(libc::SYS_connect, "the same"),
    any(libc::SYS_sendto, "vsock data"),
    any(libc::SYS_recvfrom, "vsock data"),
    any(libc::SYS_sendmsg, "vsock data"),
    any(libc::SYS_recvmsg, "vsock data"),
    any(libc::SYS_shutdown, "vsock: a side closes"),
    any(libc::SYS_getsockopt, "vsock: a connection's error"),
    any(
        libc::SYS_fcntl,
        "descriptor flags (non-blocking, close-on-exec); duplicating eventfds",
    ),
    any(
        libc::SYS_timerfd_create,
        "the vsock muxer's sweep timer (made when the guest activates the device)",
    ),
    any(libc::SYS_timerfd_settime, "the same"),
    one_of(
        libc::SYS_ioctl,
        1,
        &[FIONBIO, FIOCLEX, TUNGETIFF, TUNSETOFFLOAD],
        "non-blocking vsock connections; the TAP's flags; the TAP's offloads, set to what the \
         guest's driver acked when it activates the network card",
    ),
];

/// The file server's thread: virtio-fs's event loop and fuse-backend-rs's passthrough under
/// husk's policy (`crate::devices::virtio::fs`).
pub const FILE_SERVER_ONLY: &[Allowed] = &[
    any(libc::SYS_epoll_wait, "the file server's event loop"),
    any(libc::SYS_epoll_pwait, "the same"),
    any(
        libc::SYS_epoll_ctl,
        "virtio-fs registers its queues' eventfds when the guest activates it",
    ),
    any(libc::SYS_read, "eventfds; files for the guest (READ)"),
    any(libc::SYS_readv, "files for the guest (READ)"),
    any(libc::SYS_writev, "files for the guest (WRITE)"),
    any(libc::SYS_pread64, "files for the guest (READ)"),
    any(libc::SYS_pwrite64, "files for the guest (WRITE)"),
    any(libc::SYS_preadv, "the same"),
    any(libc::SYS_pwritev, "the same"),
    any(libc::SYS_preadv2, "the same"),
    any(libc::SYS_pwritev2, "the same"),
    any(
        libc::SYS_fcntl,
        "descriptor flags of files for the guest; duplicating eventfds",
    ),
    one_of(
        libc::SYS_unshare,
        0,
        &[libc::CLONE_FS as u64],
        "the file server's thread gets its own umask",
    ),
    any(
        libc::SYS_umask,
        "the file server serves with umask 0 (the guest applied its own)",
    ),
    any(
        libc::SYS_fchdir,
        "the file server re-imports its share's root (FUSE INIT, DESTROY) from its thread's \
         working directory, set to the share for that call: the share is outside the jail",
    ),
    any(
        libc::SYS_capget,
        "the file server's thread drops CAP_MKNOD and CAP_FSETID",
    ),
    any(libc::SYS_capset, "the same"),
    any(
        libc::SYS_setresuid,
        "the file server acts as each request's user (this thread only)",
    ),
    any(libc::SYS_setresgid, "the same, for the group"),
    any(libc::SYS_getuid, "the passthrough"),
    any(libc::SYS_getgid, "the passthrough"),
    any(libc::SYS_getpid, "the passthrough"),
    any(
        libc::SYS_open,
        "the passthrough reopens inodes through /proc/self/fd",
    ),
    any(libc::SYS_openat, "LOOKUP, CREATE, and READ/WRITE opens"),
    any(libc::SYS_newfstatat, "LOOKUP, GETATTR"),
    any(libc::SYS_fstat, "the same"),
    any(libc::SYS_statx, "the same"),
    any(libc::SYS_fstatfs, "STATFS"),
    any(libc::SYS_statfs, "STATFS"),
    any(libc::SYS_getdents64, "READDIR"),
    any(libc::SYS_lseek, "READDIR, LSEEK"),
    any(libc::SYS_readlinkat, "READLINK"),
    any(libc::SYS_mkdirat, "MKDIR"),
    any(
        libc::SYS_mknodat,
        "MKNOD (no device nodes: the policy refuses them first)",
    ),
    any(libc::SYS_symlinkat, "SYMLINK"),
    any(libc::SYS_linkat, "LINK"),
    any(libc::SYS_unlinkat, "UNLINK, RMDIR"),
    any(libc::SYS_renameat2, "RENAME"),
    any(libc::SYS_fchmod, "SETATTR"),
    any(libc::SYS_fchmodat, "SETATTR"),
    any(libc::SYS_fchown, "SETATTR"),
    any(libc::SYS_fchownat, "SETATTR"),
    any(libc::SYS_utimensat, "SETATTR"),
    any(libc::SYS_ftruncate, "SETATTR size"),
    any(libc::SYS_fallocate, "FALLOCATE"),
    any(libc::SYS_fsync, "FSYNC"),
    any(libc::SYS_fdatasync, "FSYNC"),
    any(libc::SYS_dup, "the passthrough"),
    any(libc::SYS_flock, "SETLK"),
    any(libc::SYS_copy_file_range, "COPY_FILE_RANGE"),
    any(libc::SYS_syncfs, "SYNCFS"),
];

/// A vCPU thread: KVM_RUN and the devices' register handlers.
pub const VCPU_ONLY: &[Allowed] = &[
    one_of(
        libc::SYS_ioctl,
        1,
        &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS],
        "KVM_RUN; the registers for a KVM internal error's report",
    ),
    any(libc::SYS_read, "eventfds"),
    any(
        libc::SYS_fcntl,
        "a device the guest activates duplicates its queues' eventfds (F_DUPFD_CLOEXEC)",
    ),
    any(
        libc::SYS_epoll_ctl,
        "a device activated by the guest registers its queues' eventfds",
    ),
];

/// One list: the common calls, then `only`.
pub fn list(only: &'static [Allowed]) -> Vec<Allowed> {
    COMMON.iter().chain(only).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_numbers_are_the_kernels() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(TIOCGPTN, 0x8004_5430);
        assert_eq!(TIOCSPTLCK, 0x4004_5431);
        assert_eq!(TUNGETIFF, 0x8004_54d2);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
        assert_eq!(TIOCGPTN & KVM_TYPE_MASK, 0x5400);
    }

    #[test]
    fn every_call_says_who_needs_it_and_none_is_listed_twice_in_a_list() {
        for only in [
            SETUP_ONLY,
            MAIN_ONLY,
            AGENT_ONLY,
            RELAY_ONLY,
            DEVICES_ONLY,
            FILE_SERVER_ONLY,
            VCPU_ONLY,
        ] {
            let all = list(only);
            for (i, a) in all.iter().enumerate() {
                assert!(!a.why.trim().is_empty(), "syscall {} has no reason", a.nr);
                assert!(
                    all[..i].iter().all(|b| b.nr != a.nr),
                    "syscall {} ({:?}) is listed twice",
                    a.nr,
                    super::super::names::syscall_name(a.nr)
                );
            }
        }
    }
}
