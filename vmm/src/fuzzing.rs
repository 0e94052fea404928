//! Fuzzing harnesses for everything a guest hands the VMM (`cargo xtask fuzz`, targets in
//! `fuzz/`). Built with the `fuzzing` feature, and in this crate's tests, which replay every
//! input kept under `fuzz/regressions/`.
//!
//! [`guest`] plays a hostile guest against one device, the way `husk-vmm` serves a real one:
//! the device sits behind its virtio-mmio transport and runs in an event loop of its own; the
//! "guest" reads and writes the transport's registers, writes descriptor tables, rings and
//! buffers into guest memory (two regions with a hole between them), notifies queues and lets
//! the event loop run. The input is a program of such operations ([`Op`]), so the fuzzer can
//! both follow the protocol far enough to reach the device's request handling (a driver
//! initialisation, well-formed chains around fuzzed bytes) and break it anywhere (raw ring
//! entries, any register at any time, pokes into rings the device is using). What must hold:
//! - nothing panics, and every input ends (libFuzzer's `-timeout` catches a hang, its
//!   `-rss_limit_mb` unbounded buffering);
//! - the file server never reaches outside its share: the share holds symlinks that point out
//!   of it, and after every input the directory beside the share must be exactly as it was
//!   ([`Confinement`]).
//!
//! [`net_handoff`] feeds the text of the runtime's network handoff to its parser.

#![allow(clippy::unwrap_used)] // A harness failure is a finding: panicking is the report.

use std::collections::VecDeque;
use std::io::Write as _;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::BusDevice;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::fs::{CacheTimes, Fs, DEFAULT_MAX_INODES};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::net::{Net, NetBackend};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;

/// The device a [`guest`] input is played against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// virtio-rng.
    Rng,
    /// virtio-net over an in-memory backend that the input can make deliver frames.
    Net,
    /// virtio-vsock over the real Unix-socket backend, with a host listener on port
    /// [`HOST_PORT`] that the input can accept, write to and close.
    Vsock,
    /// virtio-fs over a share laid out as husk lays out a container's.
    Fs,
    /// The memory balloon (inflate, deflate, free page reporting), discarding guest memory.
    Balloon,
}

/// The host port a [`Device::Vsock`] guest can connect to.
pub const HOST_PORT: u32 = 1024;
const GUEST_CID: u64 = 3;

/// Guest memory: two regions with a hole between them, so buffers can straddle a hole.
const REGIONS: [(u64, usize); 2] = [(0, 0x8_0000), (0x10_0000, 0x4_0000)];
/// Queue `q`'s descriptor table, avail ring and used ring are at `q * QUEUE_STRIDE` and the
/// next two pages.
const QUEUE_STRIDE: u64 = 0x4000;
/// Buffers of well-formed chains are placed in `[DATA_START, DATA_END)`, round robin.
const DATA_START: u64 = 0x2_0000;
const DATA_END: u64 = 0x8_0000;
/// The largest buffer an operation writes (a chain's descriptor may claim more).
const MAX_BUFFER: usize = 0x2000;
/// Operations per input, event loop turns per pump.
const MAX_OPS: usize = 512;
const MAX_TURNS: usize = 64;
/// virtio status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
/// `fuse_in_header` is 40 bytes; its first field is the request's length.
const FUSE_IN_HEADER_LEN: usize = 40;

/// Plays `data` as a guest program against a fresh `device`.
pub fn guest(device: Device, data: &[u8]) {
    // The share is one per process; tests run in parallel.
    let _share = (device == Device::Fs).then(|| Confinement::get().lock());
    drop(play(device, data));
    if device == Device::Fs {
        Confinement::get().check();
    }
}

/// Runs `data` and returns the guest as it ended, its device still there.
fn play(device: Device, data: &[u8]) -> Guest {
    let mut guest = Guest::new(device);
    let mut input = Input(data);
    for _ in 0..MAX_OPS {
        let Some(op) = Op::decode(&mut input) else {
            break;
        };
        guest.run(op, &mut input);
    }
    guest.pump();
    guest
}

/// Parses `data` as the text of a network handoff (see [`crate::net_handoff`]), with no
/// descriptor beside it, with one and with two; and as the value of `husk-vmm --net-card`.
pub fn net_handoff(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::net_handoff::parse(text, Vec::new());
    for count in 1..=2 {
        let fds = (0..count)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect();
        let _ = crate::net_handoff::parse(text, fds);
    }
    let _ = crate::net_handoff::parse_card(text, true);
}

/// The input, read front to back; reads past its end give zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let take = n.min(self.0.len());
        let mut out = self.0[..take].to_vec();
        self.0 = &self.0[take..];
        out.resize(n, 0);
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes(8).try_into().unwrap())
    }
}

/// One step of a guest program; its operands follow it in the input.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Reset, then the whole driver initialisation: status, features (what the device offers,
    /// masked by a u64 operand), every queue (size 2^(u8 % 9)), DRIVER_OK.
    Init,
    /// A register write: offset u16, width u8, value u64.
    Write,
    /// A register read: offset u16, width u8.
    Read,
    /// Guest memory written at address u32 (anywhere, holes included): length u8, bytes.
    Poke,
    /// A well-formed chain on queue u8: descriptor count u8, then per descriptor a length u16
    /// and flags u8 (bit 0 device-writable, bit 1 in the second region, bit 2 a raw address
    /// u32 follows, bit 3 on a first readable buffer of virtio-fs: its first u32 becomes the
    /// readable length, as a FUSE header's `len`), and a readable buffer's bytes. Published
    /// and notified.
    Chain,
    /// A raw avail ring entry on queue u8: head u16. Published and notified.
    Raw,
    /// A queue notification: queue u8.
    Notify,
    /// The host side acts: see [`Guest::host`].
    Host,
}

impl Op {
    fn decode(input: &mut Input) -> Option<Op> {
        if input.is_empty() {
            return None;
        }
        Some(match input.u8() % 8 {
            0 => Op::Init,
            1 => Op::Write,
            2 => Op::Read,
            3 => Op::Poke,
            4 => Op::Chain,
            5 => Op::Raw,
            6 => Op::Notify,
            _ => Op::Host,
        })
    }
}

/// The driver's view of one queue it set up.
#[derive(Clone, Copy, Debug, Default)]
struct DriverQueue {
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

type FuzzEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

struct Guest {
    device: Device,
    mem: GuestMemoryMmap<()>,
    transport: MmioTransport,
    em: FuzzEventManager,
    queues: Vec<DriverQueue>,
    next_data: u64,
    host: Host,
}

/// What the host side of the device holds for the input to act on.
enum Host {
    None,
    Net(Arc<Mutex<VecDeque<Vec<u8>>>>, Arc<EventFd>),
    Vsock {
        dir: tempfile::TempDir,
        listener: UnixListener,
        streams: Vec<UnixStream>,
    },
}

impl Guest {
    fn new(device: Device) -> Guest {
        let mem = GuestMemoryMmap::from_ranges(
            &REGIONS
                .iter()
                .map(|&(a, l)| (GuestAddress(a), l))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let mut em = FuzzEventManager::new().unwrap();
        let (dev, host): (Arc<Mutex<dyn VirtioDevice>>, Host) = match device {
            Device::Rng => {
                let d = Arc::new(Mutex::new(Rng::new().unwrap()));
                em.add_subscriber(d.clone());
                (d, Host::None)
            }
            Device::Net => {
                let frames = Arc::new(Mutex::new(VecDeque::new()));
                let evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
                let backend = FuzzNetBackend {
                    frames: frames.clone(),
                    evt: evt.clone(),
                };
                let d = Arc::new(Mutex::new(
                    Net::new(backend, [2, 0, 0, 0, 0, 1], Some(1500)).unwrap(),
                ));
                em.add_subscriber(d.clone());
                (d, Host::Net(frames, evt))
            }
            Device::Vsock => {
                let dir = tempfile::tempdir().unwrap();
                let uds = dir.path().join("v.sock");
                let listener = UnixListener::bind(port_path(&uds, HOST_PORT)).unwrap();
                listener.set_nonblocking(true).unwrap();
                let d = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &uds).unwrap()));
                em.add_subscriber(d.clone());
                (
                    d,
                    Host::Vsock {
                        dir,
                        listener,
                        streams: Vec::new(),
                    },
                )
            }
            Device::Fs => {
                let share = Confinement::get().fresh_share();
                let cache = CacheTimes {
                    rootfs: Duration::from_secs(86_400),
                    other: Duration::from_secs(1),
                };
                let d = Arc::new(Mutex::new(
                    Fs::with_options(&share, "fuzz", cache, DEFAULT_MAX_INODES).unwrap(),
                ));
                em.add_subscriber(d.clone());
                (d, Host::None)
            }
            Device::Balloon => {
                let d = Arc::new(Mutex::new(Balloon::new().unwrap()));
                em.add_subscriber(d.clone());
                (d, Host::None)
            }
        };
        let transport = MmioTransport::new(mem.clone(), dev).unwrap();
        Guest {
            device,
            mem,
            transport,
            em,
            queues: Vec::new(),
            next_data: DATA_START,
            host,
        }
    }

    /// Runs the device's event loop until it is idle, for at most [`MAX_TURNS`] turns.
    fn pump(&mut self) {
        for _ in 0..MAX_TURNS {
            match self.em.run_with_timeout(0) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn run(&mut self, op: Op, input: &mut Input) {
        match op {
            Op::Init => {
                let mask = input.u64();
                let sizes = input.bytes(4);
                self.init(mask, &sizes);
            }
            Op::Write => {
                let offset = u64::from(input.u16() % 0x200);
                let width = width(input.u8());
                let value = input.u64().to_le_bytes();
                self.transport.write(offset, &value[..width]);
            }
            Op::Read => {
                let offset = u64::from(input.u16() % 0x200);
                let mut data = [0u8; 8];
                let width = width(input.u8());
                self.transport.read(offset, &mut data[..width]);
            }
            Op::Poke => {
                let addr = u64::from(input.u32() % 0x18_0000);
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                let _ = self.mem.write_slice(&bytes, GuestAddress(addr));
            }
            Op::Chain => self.chain(input),
            Op::Raw => {
                let q = input.u8();
                let head = input.u16();
                if let Some(q) = self.queue_index(q) {
                    self.publish(q, head);
                    self.notify(q);
                }
            }
            Op::Notify => {
                let q = input.u8();
                self.write_reg(mmio::VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(q % 4));
                self.pump();
            }
            Op::Host => self.host(input),
        }
    }

    /// The driver initialisation Linux's virtio-mmio driver performs.
    fn init(&mut self, feature_mask: u64, sizes: &[u8]) {
        self.write_reg(mmio::VIRTIO_MMIO_STATUS, 0);
        self.pump();
        self.queues.clear();
        for &(addr, len) in &REGIONS {
            let _ = self.mem.write_slice(&vec![0u8; len], GuestAddress(addr));
        }
        self.next_data = DATA_START;
        self.write_reg(mmio::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        self.write_reg(mmio::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        let mut features = 0u64;
        for sel in 0..2u32 {
            self.write_reg(mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            let word = self.read_reg(mmio::VIRTIO_MMIO_DEVICE_FEATURES);
            features |= u64::from(word) << (32 * sel);
        }
        let accepted = features & !feature_mask;
        for sel in 0..2u32 {
            self.write_reg(mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write_reg(
                mmio::VIRTIO_MMIO_DRIVER_FEATURES,
                (accepted >> (32 * sel)) as u32,
            );
        }
        self.write_reg(mmio::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let count = match self.device {
            Device::Rng => 1,
            Device::Net | Device::Fs => 2,
            Device::Vsock | Device::Balloon => 3,
        };
        for q in 0..count {
            self.write_reg(mmio::VIRTIO_MMIO_QUEUE_SEL, q);
            let max = self.read_reg(mmio::VIRTIO_MMIO_QUEUE_NUM_MAX);
            let wanted = 1u32 << (sizes.get(q as usize).copied().unwrap_or(0) % 9);
            let size = wanted.min(max.max(1)) as u16;
            let base = u64::from(q) * QUEUE_STRIDE;
            self.write_reg(mmio::VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
            for (low, addr) in [
                (mmio::VIRTIO_MMIO_QUEUE_DESC_LOW, base),
                (mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000),
                (mmio::VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000),
            ] {
                self.write_reg(low, addr as u32);
                self.write_reg(low + 4, (addr >> 32) as u32);
            }
            self.write_reg(mmio::VIRTIO_MMIO_QUEUE_READY, 1);
            self.queues.push(DriverQueue {
                size,
                ..DriverQueue::default()
            });
        }
        self.write_reg(
            mmio::VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        self.pump();
    }

    fn queue_index(&self, q: u8) -> Option<usize> {
        if self.queues.is_empty() {
            return None;
        }
        Some(usize::from(q) % self.queues.len())
    }

    /// Room for `len` bytes of buffer in the data area.
    fn alloc(&mut self, len: usize) -> u64 {
        let len = (len as u64).min(MAX_BUFFER as u64).max(1);
        if self.next_data + len > DATA_END {
            self.next_data = DATA_START;
        }
        let addr = self.next_data;
        self.next_data += len.next_multiple_of(16);
        addr
    }

    fn chain(&mut self, input: &mut Input) {
        let q = input.u8();
        let count = 1 + usize::from(input.u8() % 8);
        let Some(q) = self.queue_index(q) else {
            return;
        };
        let DriverQueue {
            size, next_desc, ..
        } = self.queues[q];
        let base = q as u64 * QUEUE_STRIDE;
        let mut readable = Vec::new();
        for i in 0..count {
            let len = input.u16();
            let flags = input.u8();
            let write = flags & 1 != 0;
            let addr = if flags & 4 != 0 {
                u64::from(input.u32())
            } else if flags & 2 != 0 {
                REGIONS[1].0 + u64::from(input.u16()) * 16
            } else {
                self.alloc(usize::from(len))
            };
            if !write {
                let mut bytes = input.bytes(usize::from(len).min(MAX_BUFFER));
                if self.device == Device::Fs
                    && flags & 8 != 0
                    && readable.is_empty()
                    && bytes.len() >= FUSE_IN_HEADER_LEN
                {
                    bytes[..4].copy_from_slice(&u32::from(len).to_le_bytes());
                }
                let _ = self.mem.write_slice(&bytes, GuestAddress(addr));
                readable.push(addr);
            }
            let index = (next_desc + i as u16) % size;
            let last = i + 1 == count;
            let mut desc_flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                desc_flags |= VRING_DESC_F_NEXT;
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&u32::from(len).to_le_bytes());
            raw[12..14].copy_from_slice(&desc_flags.to_le_bytes());
            raw[14..16].copy_from_slice(&((index + 1) % size).to_le_bytes());
            let _ = self
                .mem
                .write_slice(&raw, GuestAddress(base + 16 * u64::from(index)));
        }
        self.queues[q].next_desc = (next_desc + count as u16) % size;
        self.publish(q, next_desc);
        self.notify(q);
    }

    /// Puts `head` in queue `q`'s avail ring and moves its index.
    fn publish(&mut self, q: usize, head: u16) {
        let queue = &mut self.queues[q];
        let avail = q as u64 * QUEUE_STRIDE + 0x1000;
        let slot = u64::from(queue.avail_idx % queue.size);
        let _ = self.mem.write_obj(head, GuestAddress(avail + 4 + 2 * slot));
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        let _ = self.mem.write_obj(queue.avail_idx, GuestAddress(avail + 2));
    }

    fn notify(&mut self, q: usize) {
        self.write_reg(mmio::VIRTIO_MMIO_QUEUE_NOTIFY, q as u32);
        self.pump();
    }

    /// The host side acts, by device:
    /// - net: a frame of u16 % 2048 bytes arrives from the network (at most 64 wait);
    /// - vsock: by a u8, accept the guest's connections to [`HOST_PORT`], write bytes (u8
    ///   length) to one, close one, or connect from the host with a `CONNECT` line (u8 length);
    /// - rng, fs, balloon: nothing.
    fn host(&mut self, input: &mut Input) {
        match &mut self.host {
            Host::None => {}
            Host::Net(frames, evt) => {
                let len = usize::from(input.u16() % 2048);
                let frame = input.bytes(len);
                let mut frames = frames.lock().unwrap();
                if frames.len() < 64 {
                    frames.push_back(frame);
                    evt.write(1).unwrap();
                }
            }
            Host::Vsock {
                dir,
                listener,
                streams,
            } => {
                let what = input.u8();
                let which = usize::from(input.u8());
                match what % 4 {
                    0 => {
                        while let Ok((stream, _)) = listener.accept() {
                            stream.set_nonblocking(true).unwrap();
                            if streams.len() < 8 {
                                streams.push(stream);
                            }
                        }
                    }
                    1 => {
                        let len = usize::from(input.u8());
                        let bytes = input.bytes(len);
                        if !streams.is_empty() {
                            let n = which % streams.len();
                            let _ = streams[n].write(&bytes);
                        }
                    }
                    2 => {
                        if !streams.is_empty() {
                            let n = which % streams.len();
                            streams.swap_remove(n);
                        }
                    }
                    _ => {
                        let len = usize::from(input.u8() % 40);
                        let line = input.bytes(len);
                        if streams.len() < 8 {
                            if let Ok(mut s) = UnixStream::connect(dir.path().join("v.sock")) {
                                s.set_nonblocking(true).unwrap();
                                let _ = s.write(&line);
                                streams.push(s);
                            }
                        }
                    }
                }
            }
        }
        self.pump();
    }
}

fn width(b: u8) -> usize {
    [4, 1, 2, 8][usize::from(b % 4)]
}

fn port_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// An in-memory network: frames the input makes arrive, and a sink for what the guest sends.
struct FuzzNetBackend {
    frames: Arc<Mutex<VecDeque<Vec<u8>>>>,
    evt: Arc<EventFd>,
}

impl AsRawFd for FuzzNetBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

impl NetBackend for FuzzNetBackend {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let mut frames = self.frames.lock().unwrap();
        let Some(frame) = frames.pop_front() else {
            let _ = self.evt.read();
            return Ok(None);
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(Some(n))
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        assert!(frame.len() <= crate::devices::virtio::net::MAX_FRAME_LEN);
        Ok(true)
    }

    fn set_offloads(&mut self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// The virtio-fs share and what lies beside it. The share is laid out as husk lays out a
/// container's (`<id>/rootfs`, `<id>/mounts/0`) and holds what a hostile image can hold:
/// symlinks out of the share, absolute and relative, to the directory `outside` beside it,
/// a FIFO, a setuid file. After every input, `outside` and the share's parent must be exactly
/// as they were: anything else is an escape.
struct Confinement {
    _dir: tempfile::TempDir,
    root: PathBuf,
    share: PathBuf,
    outside: PathBuf,
    /// The secret's mode, owner and group.
    secret_meta: (u32, u32, u32),
    /// Held by whoever uses the share.
    in_use: Mutex<()>,
}

const SECRET: &[u8] = b"nothing of the host may be read or changed from the guest\n";

impl Confinement {
    fn get() -> &'static Confinement {
        static CONFINEMENT: OnceLock<Confinement> = OnceLock::new();
        CONFINEMENT.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            let outside = root.join("outside");
            std::fs::create_dir(&outside).unwrap();
            std::fs::write(outside.join("secret"), SECRET).unwrap();
            let meta = std::fs::metadata(outside.join("secret")).unwrap();
            Confinement {
                secret_meta: (meta.mode(), meta.uid(), meta.gid()),
                in_use: Mutex::new(()),
                share: root.join("share"),
                root,
                outside,
                _dir: dir,
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The share, made anew.
    fn fresh_share(&self) -> PathBuf {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let _ = std::fs::remove_dir_all(&self.share);
        let rootfs = self.share.join("c1/rootfs");
        for dir in ["bin", "etc", "tmp"] {
            std::fs::create_dir_all(rootfs.join(dir)).unwrap();
        }
        std::fs::create_dir_all(self.share.join("c1/mounts/0/sub")).unwrap();
        std::fs::write(rootfs.join("etc/hostname"), b"fuzz\n").unwrap();
        std::fs::write(self.share.join("c1/mounts/0/data"), b"data\n").unwrap();
        let suid = rootfs.join("bin/suid");
        std::fs::write(&suid, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        symlink(&self.outside, rootfs.join("abs")).unwrap();
        symlink(self.outside.join("secret"), rootfs.join("etc/secret")).unwrap();
        symlink("../../../outside", rootfs.join("up")).unwrap();
        symlink(
            "../../../../outside/secret",
            self.share.join("c1/mounts/0/sub/up"),
        )
        .unwrap();
        nix::unistd::mkfifo(
            &rootfs.join("tmp/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        self.share.clone()
    }

    /// Panics if anything beside the share changed.
    fn check(&self) {
        let mut beside: Vec<_> = std::fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        beside.sort();
        assert_eq!(beside, ["outside", "share"], "the share's parent changed");
        let names: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            ["secret"],
            "a file appeared or went outside the share"
        );
        let secret = self.outside.join("secret");
        assert_eq!(
            std::fs::read(&secret).unwrap(),
            SECRET,
            "the file outside changed"
        );
        let meta = std::fs::symlink_metadata(&secret).unwrap();
        assert!(meta.is_file(), "the file outside was replaced");
        assert_eq!(
            (meta.mode(), meta.uid(), meta.gid()),
            self.secret_meta,
            "the file outside changed mode or owner"
        );
    }
}

/// Starting inputs for each target, kept as files under `fuzz/seeds/<target>/` (written and
/// checked by this crate's tests): programs that get each device far, so that the fuzzer
/// starts from working requests rather than finding the protocol byte by byte.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let rx = |len: u16| Program::new().init().chain(0, &[Buf::Write(len)]);
    out.push((
        "virtio_rng",
        "read",
        rx(64).chain(0, &[Buf::Write(16), Buf::Write(4096)]).0,
    ));

    let frame = {
        let mut f = vec![0u8; 12];
        f.extend([0xff; 6]);
        f.extend([2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.resize(12 + 60, 0);
        f
    };
    out.push((
        "virtio_net",
        "both-ways",
        rx(1526)
            .chain(
                1,
                &[
                    Buf::Read(frame[..12].to_vec()),
                    Buf::Read(frame[12..].to_vec()),
                ],
            )
            .host_frame(&frame)
            .0,
    ));

    let hdr = |op: u16, len: u32, flags: u32| {
        let mut h = Vec::with_capacity(44);
        h.extend(GUEST_CID.to_le_bytes());
        h.extend(2u64.to_le_bytes());
        h.extend(5000u32.to_le_bytes());
        h.extend(HOST_PORT.to_le_bytes());
        h.extend(len.to_le_bytes());
        h.extend(1u16.to_le_bytes());
        h.extend(op.to_le_bytes());
        h.extend(flags.to_le_bytes());
        h.extend(65536u32.to_le_bytes());
        h.extend(0u32.to_le_bytes());
        h
    };
    let connected = Program::new()
        .init()
        .chain(0, &[Buf::Write(4140)])
        .chain(0, &[Buf::Write(4140)])
        .chain(1, &[Buf::Read(hdr(1, 0, 0))])
        .host(&[0, 0]);
    out.push((
        "virtio_vsock",
        "guest-connects",
        connected
            .clone()
            .host(&[1, 0, 5, b'h', b'e', b'l', b'l', b'o'])
            .chain(1, &[Buf::Read(hdr(5, 4, 0)), Buf::Read(b"ping".to_vec())])
            .chain(1, &[Buf::Read(hdr(4, 0, 3))])
            .0,
    ));
    let line = b"CONNECT 52\n";
    let mut host = vec![3, 0, line.len() as u8];
    host.extend(line);
    out.push((
        "virtio_vsock",
        "host-connects",
        Program::new()
            .init()
            .chain(0, &[Buf::Write(4140)])
            .host(&host)
            .chain(0, &[Buf::Write(4140)])
            .0,
    ));

    let fuse = |opcode: u32, unique: u64, nodeid: u64, body: &[u8]| {
        let mut m = Vec::new();
        m.extend(((FUSE_IN_HEADER_LEN + body.len()) as u32).to_le_bytes());
        m.extend(opcode.to_le_bytes());
        m.extend(unique.to_le_bytes());
        m.extend(nodeid.to_le_bytes());
        m.extend([0u8; 16]);
        m.extend(body);
        m
    };
    let init = {
        let mut body = Vec::new();
        body.extend(7u32.to_le_bytes());
        body.extend(31u32.to_le_bytes());
        body.extend((1u32 << 20).to_le_bytes());
        body.extend(u32::MAX.to_le_bytes());
        body.extend([0u8; 48]);
        fuse(26, 1, 0, &body)
    };
    let request = |p: Program, m: Vec<u8>| p.chain(1, &[Buf::Read(m), Buf::Write(4096)]);
    let session = request(Program::new().init(), init);
    let mut walk = session.clone();
    for (i, name) in ["c1", "rootfs", "etc", "secret"].iter().enumerate() {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        // Node ids count up from the root (1) as each lookup finds a new inode.
        walk = request(walk, fuse(1, 2 + i as u64, 1 + i as u64, &body));
    }
    walk = request(walk, fuse(5, 10, 5, &[])); // READLINK of `secret`
    out.push(("virtio_fs", "lookup-walk", walk.0));
    let mut mkdir_body = Vec::new();
    mkdir_body.extend(0o755u32.to_le_bytes());
    mkdir_body.extend(0o022u32.to_le_bytes());
    mkdir_body.extend(b"made\0");
    // fuse_read_in: no handle (opens take no round trip), offset 0, 3000 bytes.
    let mut readdir_body = vec![0u8; 16];
    readdir_body.extend(3000u32.to_le_bytes());
    readdir_body.resize(40, 0);
    out.push((
        "virtio_fs",
        "dir-ops",
        request(
            request(
                request(session.clone(), fuse(3, 2, 1, &[0u8; 16])), // GETATTR /
                fuse(9, 3, 1, &mkdir_body),                          // MKDIR /made
            ),
            fuse(28, 4, 1, &readdir_body), // READDIR /
        )
        .0,
    ));

    // A page poked, then handed back by a free page report; another by inflating it.
    out.push((
        "virtio_balloon",
        "report-and-inflate",
        Program::new()
            .init()
            .poke(0x3_0000, &[0xee; 16])
            .poke(0x3_1000, &[0xee; 16])
            .chain(2, &[Buf::WriteAt(0x3_0000, 0x1000)])
            .chain(0, &[Buf::Read(0x31u32.to_le_bytes().to_vec())])
            .0,
    ));

    for (name, text) in [
        (
            "full",
            "mac=02:00:0a:00:00:05 ip=10.0.0.5/24 gateway=10.0.0.1 ip6=fd00::5/64 gateway6=fd00::1",
        ),
        ("none", "none"),
    ] {
        out.push(("net_handoff", name, text.as_bytes().to_vec()));
    }
    out
}

/// One descriptor of a [`Program`]'s chain.
enum Buf {
    /// A device-readable buffer with these bytes.
    Read(Vec<u8>),
    /// A device-writable buffer of this length.
    Write(u16),
    /// A device-writable buffer of this length at this address.
    WriteAt(u32, u16),
}

/// A guest program in [`Op`] encoding, built for [`seeds`].
#[derive(Clone)]
struct Program(Vec<u8>);

impl Program {
    fn new() -> Program {
        Program(Vec::new())
    }

    /// [`Op::Init`]: every feature accepted, queues of 256.
    fn init(mut self) -> Program {
        self.0.push(0);
        self.0.extend([0u8; 8]);
        self.0.extend([8u8; 4]);
        self
    }

    /// [`Op::Chain`] on queue `q`.
    fn chain(mut self, q: u8, bufs: &[Buf]) -> Program {
        self.0.extend([4, q, (bufs.len() - 1) as u8]);
        for buf in bufs {
            match buf {
                Buf::Read(bytes) => {
                    self.0.extend((bytes.len() as u16).to_le_bytes());
                    self.0.push(0);
                    self.0.extend(bytes);
                }
                Buf::Write(len) => {
                    self.0.extend(len.to_le_bytes());
                    self.0.push(1);
                }
                Buf::WriteAt(addr, len) => {
                    self.0.extend(len.to_le_bytes());
                    self.0.push(1 | 4);
                    self.0.extend(addr.to_le_bytes());
                }
            }
        }
        self
    }

    /// [`Op::Poke`]: `bytes` (at most 255) written at `addr`.
    fn poke(mut self, addr: u32, bytes: &[u8]) -> Program {
        self.0.push(3);
        self.0.extend(addr.to_le_bytes());
        self.0.push(bytes.len() as u8);
        self.0.extend(bytes);
        self
    }

    /// [`Op::Host`] with these operands.
    fn host(mut self, operands: &[u8]) -> Program {
        self.0.push(7);
        self.0.extend(operands);
        self
    }

    /// [`Op::Host`] for virtio-net: `frame` arrives.
    fn host_frame(mut self, frame: &[u8]) -> Program {
        self.0.push(7);
        self.0.extend((frame.len() as u16).to_le_bytes());
        self.0.extend(frame);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    /// Every input kept under `fuzz/regressions/<target>/` (crashes found and fixed) and
    /// `fuzz/seeds/<target>/` still passes.
    fn replay(target: &str, run: impl Fn(&[u8])) {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        for kind in ["regressions", "seeds"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                eprintln!("replaying {}", path.display());
                run(&std::fs::read(&path).unwrap());
            }
        }
    }

    /// The seed files are what [`seeds`] makes; `HUSK_WRITE_SEEDS=1` writes them.
    #[test]
    fn seed_files_are_current() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let write = std::env::var_os("HUSK_WRITE_SEEDS").is_some();
        for (target, name, bytes) in seeds() {
            let path = dir.join(target).join(name);
            if write {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "{} is not what `seeds()` makes: run this test with HUSK_WRITE_SEEDS=1",
                path.display()
            );
        }
    }

    #[test]
    fn regressions_and_seeds_replay() {
        replay("virtio_rng", |d| guest(Device::Rng, d));
        replay("virtio_net", |d| guest(Device::Net, d));
        replay("virtio_vsock", |d| guest(Device::Vsock, d));
        replay("virtio_fs", |d| guest(Device::Fs, d));
        replay("virtio_balloon", |d| guest(Device::Balloon, d));
        replay("net_handoff", net_handoff);
    }

    /// The used ring entries `(id, len)` of queue `q` after `guest` ran.
    fn used(guest: &Guest, q: u64) -> Vec<(u32, u32)> {
        let used = q * QUEUE_STRIDE + 0x2000;
        let idx: u16 = guest.mem.read_obj(GuestAddress(used + 2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let at = GuestAddress(used + 4 + 8 * i);
                let id: u32 = guest.mem.read_obj(at).unwrap();
                let len: u32 = guest.mem.read_obj(GuestAddress(at.0 + 4)).unwrap();
                (id, len)
            })
            .collect()
    }

    fn seed(target: &str, name: &str) -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(t, n, _)| *t == target && *n == name)
            .unwrap()
            .2
    }

    /// The seeds get past the transport and the protocol: the harness reaches each device's
    /// real work.
    #[test]
    fn the_seeds_reach_each_device() {
        let rng = play(Device::Rng, &seed("virtio_rng", "read"));
        assert_eq!(used(&rng, 0), [(0, 64), (1, 16 + 4096)]);

        let net = play(Device::Net, &seed("virtio_net", "both-ways"));
        assert_eq!(used(&net, 0), [(0, 12 + 60)], "the frame reached the guest");
        assert_eq!(used(&net, 1), [(0, 0)], "the guest's frame was sent");

        let vsock = play(Device::Vsock, &seed("virtio_vsock", "guest-connects"));
        let Host::Vsock { streams, .. } = &vsock.host else {
            unreachable!()
        };
        assert_eq!(streams.len(), 1, "the host accepted the guest's connection");
        let mut got = [0u8; 4];
        (&streams[0]).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");

        let balloon = play(
            Device::Balloon,
            &seed("virtio_balloon", "report-and-inflate"),
        );
        assert_eq!(used(&balloon, 2), [(0, 0)], "the report was served");
        assert_eq!(used(&balloon, 0), [(0, 0)], "the inflation was served");
        for page in [0x3_0000, 0x3_1000] {
            let mut bytes = [0xffu8; 16];
            balloon
                .mem
                .read_slice(&mut bytes, GuestAddress(page))
                .unwrap();
            assert_eq!(bytes, [0; 16], "page {page:#x} was handed back");
        }

        let _share = Confinement::get().lock();
        let fs = play(Device::Fs, &seed("virtio_fs", "lookup-walk"));
        let replies = used(&fs, 1);
        assert_eq!(replies.len(), 6);
        // A FUSE reply header is 16 bytes; an error is only that.
        assert!(replies.iter().all(|&(_, len)| len > 16), "{replies:?}");
        drop(fs);
        let fs = play(Device::Fs, &seed("virtio_fs", "dir-ops"));
        let replies = used(&fs, 1);
        assert!(replies.iter().all(|&(_, len)| len > 16), "{replies:?}");
        assert!(Confinement::get().share.join("made").is_dir());
    }

    #[test]
    fn the_share_is_checked_for_escapes() {
        guest(Device::Fs, &[]);
        let c = Confinement::get();
        let _share = c.lock();
        std::fs::write(c.outside.join("planted"), b"x").unwrap();
        let caught = std::panic::catch_unwind(|| c.check());
        std::fs::remove_file(c.outside.join("planted")).unwrap();
        assert!(caught.is_err(), "a file outside the share went unnoticed");
        c.check();
    }
}
