//! The host end of the network device: a TAP file descriptor the VMM inherits (the shim opens
//! the TAP in the pod's network namespace and passes it down, so the VMM itself needs neither
//! that namespace nor `CAP_NET_ADMIN`).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use super::{NetBackend, NetError, VNET_HDR_LEN};

/// `TUNGETIFF`: `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// TAP (Ethernet frames), not TUN.
pub const IFF_TAP: i16 = 0x0002;
/// No packet information prefix.
pub const IFF_NO_PI: i16 = 0x1000;
/// Frames carry a `virtio_net_hdr`.
pub const IFF_VNET_HDR: i16 = 0x4000;

/// `struct ifreq`: the interface name, then (for these ioctls) the flags.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// An open TAP device.
pub struct Tap {
    file: File,
}

impl Tap {
    /// Takes the TAP device open as `fd` (inherited; the VMM owns it from now on), checks it is
    /// a TAP opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, sets its header size to the
    /// 12 bytes of `virtio_net_hdr_v1` and makes it non-blocking.
    ///
    /// # Safety
    ///
    /// `fd` must be an open file descriptor that nothing else in this process owns or uses.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<Tap, NetError> {
        // SAFETY: the caller hands us sole ownership of the open descriptor `fd`.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq::default();
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, which is one, and lives for the
        // call; on a file that is not a TUN/TAP the ioctl fails and writes nothing.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF as _, &mut req) };
        if ret < 0 {
            return Err(NetError::NotATap {
                fd,
                source: std::io::Error::last_os_error(),
            });
        }
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & wanted != wanted {
            return Err(NetError::NotATap {
                fd,
                source: std::io::Error::other(format!("its flags are {:#x}", req.flags)),
            });
        }
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points at `size`.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) };
        if ret < 0 {
            return Err(NetError::TapSetup {
                what: "TUNSETVNETHDRSZ",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fcntl on our own open descriptor; F_GETFL only reads its flags.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let set = if flags < 0 {
            -1
        } else {
            // SAFETY: fcntl on our own open descriptor; F_SETFL only changes its flags.
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }
        };
        if set < 0 {
            return Err(NetError::TapSetup {
                what: "O_NONBLOCK",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap { file })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        loop {
            match self.file.read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        loop {
            // A TAP takes a frame in one write, or none of it.
            match self.file.write(frame) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn set_offloads(&mut self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int); no memory is
        // passed.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_tap_is_refused() {
        let file = tempfile::tempfile().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        // SAFETY: `fd` was just released by its File; Tap takes it over (and closes it).
        let err = unsafe { Tap::from_raw_fd(fd) }.err().unwrap();
        assert!(matches!(err, NetError::NotATap { .. }), "{err}");
    }
}
