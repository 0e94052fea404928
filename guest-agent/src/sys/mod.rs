//! The agent's syscall layer.
//!
//! Everything the agent asks of the kernel that a unit test wants to observe goes through the
//! [`Syscall`] trait: [`LinuxSyscall`] is the real implementation, [`test_utils::RecordingSyscall`]
//! records the calls and plays back scripted results (the pattern of youki's `trait Syscall`).
//! The container work (mount namespaces, `pivot_root`, ...) adds its calls here.
//!
//! Operations that end the VM ([`reset_vm`], [`reboot_autoboot`]) are free functions: there is
//! nothing to observe after them.

pub mod test_utils;

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use std::path::Path;

/// The kernel calls the agent makes, behind a trait so tests can fake them.
pub trait Syscall: Send + Sync {
    /// `mkdir(2)`.
    fn mkdir(&self, path: &Path, mode: u32) -> Result<(), Errno>;

    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno>;

    /// `waitpid(-1, WNOHANG)`: reaps one exited child if there is one.
    fn wait_any_nohang(&self) -> Result<WaitStatus, Errno>;
}

/// The real syscalls.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mkdir(&self, path: &Path, mode: u32) -> Result<(), Errno> {
        nix::unistd::mkdir(path, Mode::from_bits_truncate(mode))
    }

    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Errno> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn wait_any_nohang(&self) -> Result<WaitStatus, Errno> {
        nix::sys::wait::waitpid(None, Some(WaitPidFlag::WNOHANG))
    }
}

/// Brings the loopback interface `lo` up (`SIOCSIFFLAGS` with `IFF_UP`).
pub fn bring_up_loopback() -> Result<(), Errno> {
    bring_up("lo")
}

/// A datagram socket of `family`, for interface ioctls.
fn ioctl_socket(family: nix::sys::socket::AddressFamily) -> Result<std::os::fd::OwnedFd, Errno> {
    nix::sys::socket::socket(
        family,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Brings interface `name` up (`SIOCSIFFLAGS` with `IFF_UP`).
pub fn bring_up(name: &str) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let mut req = ifreq(name)?;
    let sock = ioctl_socket(nix::sys::socket::AddressFamily::Inet)?;
    // SAFETY: SIOCGIFFLAGS fills the flags of `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(Errno::last());
    }
    // SAFETY: the flags member of the union is the one SIOCGIFFLAGS just set.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// An `ifreq` naming interface `name`, or `EINVAL` when the name is too long.
fn ifreq(name: &str) -> Result<libc::ifreq, Errno> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(Errno::EINVAL);
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// Sets interface `name`'s MAC address (`SIOCSIFHWADDR`; virtio-net takes it up or down).
pub fn set_mac(name: &str, mac: [u8; 6]) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let mut req = ifreq(name)?;
    let sock = ioctl_socket(nix::sys::socket::AddressFamily::Inet)?;
    // SAFETY: writing the hwaddr member of the union, a plain sockaddr, of a zeroed ifreq.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
    }
    // SAFETY: SIOCSIFHWADDR reads `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR, &req) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Sets interface `name`'s MTU (`SIOCSIFMTU`).
pub fn set_mtu(name: &str, mtu: u32) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = libc::c_int::try_from(mtu).map_err(|_| Errno::EINVAL)?;
    let sock = ioctl_socket(nix::sys::socket::AddressFamily::Inet)?;
    // SAFETY: SIOCSIFMTU reads `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Adds IPv4 address `addr/prefix` to interface `name` (`SIOCSIFADDR`, then `SIOCSIFNETMASK`):
/// with `alias` 0 as its address, else as its alias `name:alias`, which the kernel makes a
/// secondary address when it is in the subnet of one the interface has, a primary one (with
/// its own prefix route) when not.
pub fn add_ipv4(name: &str, alias: u32, addr: std::net::Ipv4Addr, prefix: u8) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    if prefix == 0 || prefix > 32 {
        return Err(Errno::EINVAL);
    }
    let label = if alias == 0 {
        name.to_string()
    } else {
        format!("{name}:{alias}")
    };
    let named = ifreq(&label)?;
    let sock = ioctl_socket(nix::sys::socket::AddressFamily::Inet)?;
    let request = |value: std::net::Ipv4Addr| {
        let mut req = named;
        let sin = sockaddr_in(value);
        // SAFETY: a sockaddr_in fits in the sockaddr member of the union (both 16 bytes), which
        // SIOCSIFADDR and SIOCSIFNETMASK read as a sockaddr_in on an AF_INET socket.
        unsafe {
            std::ptr::write_unaligned(
                std::ptr::addr_of_mut!(req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
                sin,
            );
        }
        req
    };
    let mask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix)));
    for (op, value) in [(libc::SIOCSIFADDR, addr), (libc::SIOCSIFNETMASK, mask)] {
        let req = request(value);
        // SAFETY: the request reads `req`, a valid ifreq that outlives the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), op, &req) } != 0 {
            return Err(Errno::last());
        }
    }
    Ok(())
}

/// `struct in6_ifreq` (linux/ipv6.h).
#[repr(C)]
struct In6Ifreq {
    addr: [u8; 16],
    prefixlen: u32,
    ifindex: libc::c_int,
}

/// `struct in6_rtmsg` (linux/ipv6_route.h).
#[repr(C)]
struct In6Rtmsg {
    dst: [u8; 16],
    src: [u8; 16],
    gateway: [u8; 16],
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

/// Adds IPv6 address `addr/prefix` to interface `name` (`SIOCSIFADDR` on an IPv6 socket), and
/// a default route through `gateway` when there is one (`SIOCADDRT`).
pub fn add_ipv6(
    name: &str,
    addr: std::net::Ipv6Addr,
    prefix: u8,
    gateway: Option<std::net::Ipv6Addr>,
) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let name_c = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
    // SAFETY: if_nametoindex reads the NUL-terminated name, valid for the call.
    let index = unsafe { libc::if_nametoindex(name_c.as_ptr()) };
    if index == 0 {
        return Err(Errno::last());
    }
    let ifindex = libc::c_int::try_from(index).map_err(|_| Errno::EINVAL)?;
    let sock = ioctl_socket(nix::sys::socket::AddressFamily::Inet6)?;
    let req = In6Ifreq {
        addr: addr.octets(),
        prefixlen: u32::from(prefix),
        ifindex,
    };
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads a `struct in6_ifreq`, which `req` is
    // (repr(C), the kernel's layout), valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) } != 0 {
        return Err(Errno::last());
    }
    if let Some(gateway) = gateway {
        add_route(
            name,
            std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            0,
            Some(std::net::IpAddr::V6(gateway)),
            0,
        )?;
    }
    Ok(())
}

/// `struct rtentry` (linux/route.h): an IPv4 route for `SIOCADDRT`.
#[repr(C)]
struct Rtentry {
    pad1: libc::c_ulong,
    dst: libc::sockaddr_in,
    gateway: libc::sockaddr_in,
    genmask: libc::sockaddr_in,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

fn sockaddr_in(addr: std::net::Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Adds a route to `dst/prefix` through interface `name`: through `via` if given, else on
/// the link, with `metric` (0: the family's default, 0 for IPv4 and 1024 for IPv6, what `ip
/// route add` gives) (`SIOCADDRT`; IPv4 and IPv6, the destination's family). An IPv4 metric
/// above 32766 is refused (`EINVAL`): `struct rtentry` holds it, plus one, in a `short`.
pub fn add_route(
    name: &str,
    dst: std::net::IpAddr,
    prefix: u8,
    via: Option<std::net::IpAddr>,
    metric: u32,
) -> Result<(), Errno> {
    use std::net::IpAddr;
    use std::os::fd::AsRawFd;
    let name_c = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
    let gateway_flag = if via.is_some() { libc::RTF_GATEWAY } else { 0 };
    match (dst, via) {
        (IpAddr::V4(dst), None | Some(IpAddr::V4(_))) => {
            if prefix > 32 {
                return Err(Errno::EINVAL);
            }
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            let host = if prefix == 32 { libc::RTF_HOST } else { 0 };
            let gateway = match via {
                Some(IpAddr::V4(via)) => via,
                _ => std::net::Ipv4Addr::UNSPECIFIED,
            };
            let route = Rtentry {
                pad1: 0,
                dst: sockaddr_in(dst),
                gateway: sockaddr_in(gateway),
                genmask: sockaddr_in(std::net::Ipv4Addr::from(mask)),
                flags: (libc::RTF_UP | gateway_flag | host) as libc::c_ushort,
                pad2: 0,
                pad3: 0,
                pad4: std::ptr::null_mut(),
                // The kernel takes the route's priority as this minus one.
                metric: match metric {
                    0 => 0,
                    m => m
                        .checked_add(1)
                        .and_then(|v| libc::c_short::try_from(v).ok())
                        .ok_or(Errno::EINVAL)?,
                },
                dev: name_c.as_ptr().cast_mut(),
                mtu: 0,
                window: 0,
                irtt: 0,
            };
            let sock = ioctl_socket(nix::sys::socket::AddressFamily::Inet)?;
            // SAFETY: SIOCADDRT on an AF_INET socket reads a `struct rtentry`, which `route` is
            // (repr(C), the kernel's layout), and the NUL-terminated device name it points to;
            // both outlive the call.
            if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) } != 0 {
                return Err(Errno::last());
            }
            Ok(())
        }
        (IpAddr::V6(dst), None | Some(IpAddr::V6(_))) => {
            if prefix > 128 {
                return Err(Errno::EINVAL);
            }
            // SAFETY: if_nametoindex reads the NUL-terminated name, valid for the call.
            let index = unsafe { libc::if_nametoindex(name_c.as_ptr()) };
            if index == 0 {
                return Err(Errno::last());
            }
            let gateway = match via {
                Some(IpAddr::V6(via)) => via.octets(),
                _ => [0; 16],
            };
            let route = In6Rtmsg {
                dst: dst.octets(),
                src: [0; 16],
                gateway,
                kind: 0,
                dst_len: u16::from(prefix),
                src_len: 0,
                // IP6_RT_PRIO_USER, what `ip -6 route add` uses, unless told otherwise.
                metric: if metric == 0 { 1024 } else { metric },
                info: 0,
                flags: (libc::RTF_UP | gateway_flag) as u32,
                ifindex: libc::c_int::try_from(index).map_err(|_| Errno::EINVAL)?,
            };
            let sock = ioctl_socket(nix::sys::socket::AddressFamily::Inet6)?;
            // SAFETY: SIOCADDRT on an AF_INET6 socket reads a `struct in6_rtmsg`, which `route`
            // is (repr(C), the kernel's layout), valid for the call.
            if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) } != 0 {
                return Err(Errno::last());
            }
            Ok(())
        }
        _ => Err(Errno::EINVAL),
    }
}

/// The i8042 keyboard controller's command port.
const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042 command that pulses the CPU reset line.
const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// Resets the VM through the i8042 controller (port 0x64, command 0xFE), the way the guest
/// kernel does with `reboot=k`. husk-vmm treats that write as "the guest is done" and exits 0.
///
/// Why the agent does it itself: the kernel runs with `reboot=t panic=-1`, so a kernel panic
/// reboots at once by triple fault, which the VMM reports as a crash. A clean shutdown must be
/// told apart from that, so it takes the other road, the i8042 reset, issued from here.
///
/// Only returns if the reset could not be issued (no I/O port access) or the VMM ignored it.
pub fn reset_vm() -> Errno {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ioperm only changes this thread's I/O permission bitmap for one port; it
        // touches no memory of ours. It needs CAP_SYS_RAWIO, which PID 1 has.
        let ret = unsafe { libc::ioperm(libc::c_ulong::from(I8042_COMMAND_PORT), 1, 1) };
        if ret != 0 {
            return Errno::last();
        }
        // SAFETY: a single `out` to the i8042 command port, which ioperm just opened for this
        // thread. It touches no memory, stack or flags; its only effect is the VM reset we ask for.
        unsafe {
            std::arch::asm!(
                "out dx, al",
                in("dx") I8042_COMMAND_PORT,
                in("al") I8042_CMD_RESET_CPU,
                options(nomem, nostack, preserves_flags)
            );
        }
        // Still running: the VMM did not act on the reset.
        Errno::EIO
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Errno::ENOSYS
    }
}

/// `reboot(RB_AUTOBOOT)`: with the kernel's `reboot=t` this ends in a triple fault, which the VMM
/// reports as a crash; only a fallback when [`reset_vm`] failed. Returns only on failure.
pub fn reboot_autoboot() -> Errno {
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Err(errno) => errno,
        Ok(never) => match never {},
    }
}
