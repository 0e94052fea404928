//! [`Fs`]: the `VirtioDevice` side of the file system device.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::api::server::Server;
use tracing::debug;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::request::handle_chain;
use super::{
    CacheTimes, ConfinedFs, FsError, CONFIG_SIZE, DEFAULT_MAX_INODES, DEFAULT_TAG,
    HIPRIO_NOTIFY_EVERY, HIPRIO_QUEUE, HIPRIO_QUEUE_SIZE, REQUEST_QUEUE, REQUEST_QUEUE_SIZE,
    TAG_LEN,
};
use crate::devices::virtio::{
    arm_after, pop_or_rearm, read_config_bytes, wants_interrupt, RateLimitedLog, VirtioDevice,
    VirtioDeviceState, VIRTIO_ID_FS, VIRTIO_RING_F_EVENT_IDX,
};

/// The virtio file system device, sharing one host directory.
pub struct Fs {
    /// Features, activation and reset; its `reset_pending` means: forget the guest's inodes
    /// and handles, the FUSE session ended with a reset.
    pub(super) state: VirtioDeviceState,
    pub(super) queue_sizes: [u16; 2],
    pub(super) config: [u8; CONFIG_SIZE],
    pub(super) fs: Arc<ConfinedFs>,
    pub(super) server: Server<Arc<ConfinedFs>>,
    pub(super) bad_request_log: RateLimitedLog,
    /// Requests answered.
    pub(super) requests: u64,
    /// Kept when [`PROFILE_ENV`] is set.
    pub(super) profile: Option<Profile>,
}

/// `HUSK_VMM_FS_PROFILE=1`: the device counts the requests it serves by FUSE opcode with the
/// host time each took, and logs the totals (at most every [`PROFILE_EVERY`], after a queue run).
pub const PROFILE_ENV: &str = "HUSK_VMM_FS_PROFILE";
/// How often a profiling device logs its totals.
const PROFILE_EVERY: Duration = Duration::from_secs(2);

/// Requests served by FUSE opcode and the host time they took, to tell the file server's
/// own cost from the transport's (the guest's time per operation less this).
#[derive(Debug)]
pub struct Profile {
    /// Per opcode: requests and host time serving them.
    ops: BTreeMap<u32, (u64, Duration)>,
    /// Queue runs that served a request: each followed a notification (a VM exit) and ended
    /// with one interrupt at most (a run of the request queue serves the high-priority
    /// queue's waiting chains too).
    runs: u64,
    /// When the totals were last logged, and the request count then.
    logged: (Instant, u64),
}

impl Profile {
    fn new() -> Self {
        Profile {
            ops: BTreeMap::new(),
            runs: 0,
            logged: (Instant::now(), 0),
        }
    }

    fn record(&mut self, opcode: u32, took: Duration) {
        let op = self.ops.entry(opcode).or_default();
        op.0 += 1;
        op.1 += took;
    }

    /// The totals in one line: `runs N; LOOKUP n=.. host=.. ms (.. us each); ...`.
    pub fn summary(&self) -> String {
        let mut line = format!("queue runs {}", self.runs);
        for (&opcode, &(count, took)) in &self.ops {
            line.push_str(&format!(
                "; {} n={count} host={:.1} ms ({:.0} us each)",
                opcode_name(opcode),
                took.as_secs_f64() * 1e3,
                took.as_secs_f64() * 1e6 / count.max(1) as f64
            ));
        }
        line
    }
}

/// A FUSE opcode's name (`OP42` for one this table lacks).
fn opcode_name(opcode: u32) -> String {
    const NAMES: [(u32, &str); 32] = [
        (1, "LOOKUP"),
        (2, "FORGET"),
        (3, "GETATTR"),
        (4, "SETATTR"),
        (5, "READLINK"),
        (6, "SYMLINK"),
        (8, "MKNOD"),
        (9, "MKDIR"),
        (10, "UNLINK"),
        (11, "RMDIR"),
        (12, "RENAME"),
        (13, "LINK"),
        (14, "OPEN"),
        (15, "READ"),
        (16, "WRITE"),
        (17, "STATFS"),
        (18, "RELEASE"),
        (20, "FSYNC"),
        (25, "FLUSH"),
        (26, "INIT"),
        (27, "OPENDIR"),
        (28, "READDIR"),
        (29, "RELEASEDIR"),
        (30, "FSYNCDIR"),
        (34, "ACCESS"),
        (35, "CREATE"),
        (36, "INTERRUPT"),
        (38, "DESTROY"),
        (42, "BATCH_FORGET"),
        (43, "FALLOCATE"),
        (44, "READDIRPLUS"),
        (45, "RENAME2"),
    ];
    NAMES
        .iter()
        .find(|(op, _)| *op == opcode)
        .map_or_else(|| format!("OP{opcode}"), |(_, name)| (*name).to_string())
}

/// The opcode of the FUSE request a chain starts with (its header's second word), if its
/// first descriptor holds it.
fn peek_opcode(chain: &DescriptorChain<&GuestMemoryMmap<()>>) -> Option<u32> {
    let first = chain.clone().next()?;
    if first.is_write_only() || first.len() < 8 {
        return None;
    }
    let at = first.addr().checked_add(4)?;
    chain.memory().read_obj::<u32>(at).ok().map(u32::from_le)
}

impl Fs {
    /// Shares `shared_dir` with the tag [`DEFAULT_TAG`].
    pub fn new(shared_dir: &Path) -> Result<Self, FsError> {
        Self::with_tag(shared_dir, DEFAULT_TAG)
    }

    /// Shares `shared_dir` with `tag` (1 to [`TAG_LEN`] bytes).
    pub fn with_tag(shared_dir: &Path, tag: &str) -> Result<Self, FsError> {
        Self::with_options(shared_dir, tag, CacheTimes::default(), DEFAULT_MAX_INODES)
    }

    /// Shares `shared_dir` with `tag` (1 to [`TAG_LEN`] bytes), the guest caching as `cache`
    /// says and holding at most `max_inodes` inodes (see
    /// [Inodes held](super#inodes-held-bounded)).
    pub fn with_options(
        shared_dir: &Path,
        tag: &str,
        cache: CacheTimes,
        max_inodes: usize,
    ) -> Result<Self, FsError> {
        let fs = Arc::new(ConfinedFs::with_limits(shared_dir, cache, max_inodes)?);
        let mut state = VirtioDeviceState::new("virtio-fs").map_err(FsError::EventFd)?;
        state.avail_features |= 1 << VIRTIO_RING_F_EVENT_IDX;
        Ok(Self {
            state,
            queue_sizes: [HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE],
            config: config_space(tag)?,
            server: Server::new(fs.clone()),
            fs,
            bad_request_log: RateLimitedLog::default(),
            requests: 0,
            profile: std::env::var_os(PROFILE_ENV)
                .is_some_and(|v| v == "1")
                .then(Profile::new),
        })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Serves the chains the driver made available: on a notification of the request queue,
    /// the high-priority queue's first (the FORGETs waiting there, see [`HIPRIO_NOTIFY_EVERY`])
    /// and then the requests; on one of the high-priority queue, its chains. Interrupts the
    /// guest once if it wants an interrupt for any of the buffers used.
    pub(super) fn process_queue(&mut self, index: usize) {
        if index != HIPRIO_QUEUE && index != REQUEST_QUEUE {
            return;
        }
        let (mut used_any, mut wants_irq) = self.serve_queue(HIPRIO_QUEUE);
        if index == REQUEST_QUEUE {
            let (used, wants) = self.serve_queue(REQUEST_QUEUE);
            used_any |= used;
            wants_irq |= wants;
        }
        let Some(active) = self.state.active.as_ref() else {
            return;
        };
        if wants_irq {
            if let Err(e) = active.interrupt.trigger_queue() {
                debug!("virtio-fs: failed to signal a used queue: {e}");
            }
        }
        if let (Some(profile), true) = (self.profile.as_mut(), used_any) {
            profile.runs += 1;
            if profile.logged.0.elapsed() >= PROFILE_EVERY && profile.logged.1 != self.requests {
                profile.logged = (Instant::now(), self.requests);
                // At warn: the VMM logs little else unless debugging, and this was asked for.
                tracing::warn!("virtio-fs profile: {}", profile.summary());
            }
        }
    }

    /// Serves every available chain of queue `index` and re-arms its notification; says
    /// whether any buffer was used, and whether the driver wants an interrupt for them.
    fn serve_queue(&mut self, index: usize) -> (bool, bool) {
        let Some(active) = self.state.active.as_mut() else {
            return (false, false);
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return (false, false);
        };
        // The high-priority queue, with event indices, notifies once per HIPRIO_NOTIFY_EVERY
        // chains; its chains otherwise wait for the next request.
        let batched = index == HIPRIO_QUEUE && queue.event_idx_enabled();
        let every = HIPRIO_NOTIFY_EVERY.min(queue.size() / 2);
        let mut used_any = false;
        let mut after_arming = false;
        loop {
            let mut served = false;
            loop {
                let chain = if batched {
                    queue.pop_descriptor_chain(&active.mem)
                } else {
                    pop_or_rearm(queue, &active.mem)
                };
                let Some(chain) = chain else { break };
                served = true;
                let head = chain.head_index();
                let started = self
                    .profile
                    .as_ref()
                    .map(|_| (peek_opcode(&chain), Instant::now()));
                let result = handle_chain(&self.server, &active.mem, chain);
                if let (Some(profile), Some((opcode, at))) = (self.profile.as_mut(), started) {
                    profile.record(opcode.unwrap_or(0), at.elapsed());
                }
                let written = match result {
                    Ok(n) => n,
                    Err(e) => {
                        if self.bad_request_log.should_log() {
                            debug!(
                                count = self.bad_request_log.count(),
                                "virtio-fs: bad request: {e}"
                            );
                        }
                        0
                    }
                };
                self.requests += 1;
                if let Err(e) = queue.add_used(&active.mem, head, written) {
                    debug!("virtio-fs: add_used failed: {e}");
                    continue;
                }
                used_any = true;
            }
            // After arming said chains were there, a pass that took none ends the loop: the
            // ring's index is past its size (a hostile driver), and looking again would spin.
            if after_arming && !served {
                break;
            }
            // The mark goes ahead of the next index; chains that passed it meanwhile may have
            // come without a notification, so they are taken now.
            if !batched || !arm_after(queue, &active.mem, every) {
                break;
            }
            after_arming = true;
        }
        if !used_any {
            return (false, false);
        }
        (true, wants_interrupt(queue, &active.mem))
    }
}

/// The configuration space: the tag, NUL-padded, then one request queue.
fn config_space(tag: &str) -> Result<[u8; CONFIG_SIZE], FsError> {
    let bytes = tag.as_bytes();
    if bytes.is_empty() || bytes.len() > TAG_LEN || bytes.contains(&0) {
        return Err(FsError::BadTag(tag.to_string()));
    }
    let mut config = [0u8; CONFIG_SIZE];
    config[..bytes.len()].copy_from_slice(bytes);
    config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
    Ok(config)
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn state_mut(&mut self) -> &mut VirtioDeviceState {
        &mut self.state
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The configuration space is read-only.
    }
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use fuse_backend_rs::abi::fuse_abi::{EntryOut, InHeader, InitIn, Opcode, OutHeader, ROOT_ID};
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::{ActivateError, IrqTrigger};
    use std::sync::Arc;

    use crate::devices::virtio::fs::MAX_REQUEST_BYTES;
    use crate::devices::virtio::test_utils::{test_memory, GuestQueue};
    use vm_memory::GuestMemoryMmap;
    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    type TestEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    const REQ_ADDR: u64 = 0x40000;
    const REPLY_ADDR: u64 = 0x50000;
    const REPLY_LEN: u32 = 0x1000;

    /// An activated device over a temporary share, its driver-side queues and event loop.
    struct Harness {
        _dir: tempfile::TempDir,
        fs: Arc<Mutex<Fs>>,
        hiprio: GuestQueue,
        requests: GuestQueue,
        mem: GuestMemoryMmap<()>,
        irq: Arc<IrqTrigger>,
        em: TestEventManager,
        evts: Vec<EventFd>,
        unique: u64,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_features(0)
        }

        /// With the driver having accepted `features`.
        fn with_features(features: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("sub")).unwrap();
            let mem = test_memory();
            let hiprio = GuestQueue::new(&mem, 0x10000, 16);
            let requests = GuestQueue::new(&mem, 0x20000, 16);
            let fs = Arc::new(Mutex::new(Fs::new(dir.path()).unwrap()));
            fs.lock().unwrap().set_acked_features(features);
            let irq = Arc::new(IrqTrigger::new().unwrap());
            let evts: Vec<EventFd> = (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect();
            let mut em = TestEventManager::new().unwrap();
            em.add_subscriber(fs.clone());
            fs.lock()
                .unwrap()
                .activate(
                    mem.clone(),
                    irq.clone(),
                    vec![hiprio.create_queue(), requests.create_queue()],
                    evts.iter().map(|e| e.try_clone().unwrap()).collect(),
                )
                .unwrap();
            em.run_with_timeout(100).unwrap();
            Self {
                _dir: dir,
                fs,
                hiprio,
                requests,
                mem,
                irq,
                em,
                evts,
                unique: 0,
            }
        }

        fn notify(&mut self, queue: usize) {
            self.evts[queue].write(1).unwrap();
            self.em.run_with_timeout(100).unwrap();
        }

        /// Writes a FUSE request (header, then `body`) at REQ_ADDR; returns its length.
        fn write_request(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> u32 {
            self.unique += 1;
            let len = (std::mem::size_of::<InHeader>() + body.len()) as u32;
            let header = InHeader {
                len,
                opcode,
                unique: self.unique,
                nodeid,
                uid: 0,
                gid: 0,
                pid: 1,
                padding: 0,
            };
            self.mem
                .write_slice(header.as_slice(), GuestAddress(REQ_ADDR))
                .unwrap();
            let body_addr = REQ_ADDR + std::mem::size_of::<InHeader>() as u64;
            self.mem.write_slice(body, GuestAddress(body_addr)).unwrap();
            len
        }

        /// Sends a well-formed request on the request queue; returns the used length and
        /// the reply header.
        fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (u32, OutHeader) {
            let len = self.write_request(opcode, nodeid, body);
            self.requests
                .add_chain(&[(REQ_ADDR, len, false), (REPLY_ADDR, REPLY_LEN, true)]);
            self.notify(REQUEST_QUEUE);
            let used = self.requests.take_used();
            assert_eq!(used.len(), 1);
            let out: OutHeader = self.mem.read_obj(GuestAddress(REPLY_ADDR)).unwrap();
            (used[0].1, out)
        }

        fn init(&mut self) {
            let init = InitIn {
                major: 7,
                minor: 31,
                max_readahead: 0x20000,
                flags: 0,
            };
            let (used, out) = self.call(Opcode::Init as u32, 0, init.as_slice());
            assert_eq!(out.error, 0);
            assert_eq!(out.unique, self.unique);
            assert_eq!(used, out.len);
            assert!(used > std::mem::size_of::<OutHeader>() as u32);
        }

        /// Sends a raw chain on the request queue; returns the used length.
        fn raw(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
            self.requests.add_chain(bufs);
            self.notify(REQUEST_QUEUE);
            let used = self.requests.take_used();
            assert_eq!(used.len(), 1, "every chain is returned");
            used[0].1
        }
    }

    fn lookup_body(name: &str) -> Vec<u8> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        body
    }

    #[test]
    fn config_space_holds_tag_and_one_request_queue() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Fs::new(dir.path()).unwrap();
        let mut config = [0xffu8; CONFIG_SIZE];
        fs.read_config(0, &mut config);
        assert_eq!(&config[..5], b"husk\0");
        assert!(config[4..TAG_LEN].iter().all(|b| *b == 0));
        assert_eq!(&config[TAG_LEN..], &1u32.to_le_bytes());
        let mut past_end = [0xaau8; 4];
        fs.read_config(CONFIG_SIZE as u64, &mut past_end);
        assert_eq!(past_end, [0xaa; 4]);
        assert_eq!(fs.device_type(), VIRTIO_ID_FS);
        assert_eq!(
            fs.queue_max_sizes(),
            &[HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE]
        );
    }

    #[test]
    fn bad_tags_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for tag in ["", "a\0b", &"x".repeat(TAG_LEN + 1)] {
            assert!(matches!(
                Fs::with_tag(dir.path(), tag),
                Err(FsError::BadTag(_))
            ));
        }
        assert!(Fs::with_tag(dir.path(), &"x".repeat(TAG_LEN)).is_ok());
    }

    #[test]
    fn init_and_lookup_are_answered() {
        let mut h = Harness::new();
        h.init();
        let (used, out) = h.call(Opcode::Lookup as u32, ROOT_ID, &lookup_body("sub"));
        assert_eq!(out.error, 0);
        assert_eq!(used, out.len);
        assert_eq!(h.irq.irq_status(), 1);
        let (_, out) = h.call(Opcode::Lookup as u32, ROOT_ID, &lookup_body("missing"));
        assert_eq!(out.error, 0, "a negative entry");
        let entry: EntryOut = h.mem.read_obj(GuestAddress(REPLY_ADDR + 16)).unwrap();
        assert_eq!((entry.nodeid, entry.entry_valid), (0, 1));
        assert_eq!(h.fs.lock().unwrap().requests(), 3);
    }

    #[test]
    fn the_profile_counts_requests_by_opcode() {
        let mut h = Harness::new();
        h.fs.lock().unwrap().profile = Some(Profile::new());
        h.init();
        h.call(Opcode::Lookup as u32, ROOT_ID, &lookup_body("sub"));
        h.call(Opcode::Lookup as u32, ROOT_ID, &lookup_body("missing"));
        // A chain whose first descriptor is too short for the header's opcode.
        h.raw(&[(REQ_ADDR, 4, false), (REPLY_ADDR, REPLY_LEN, true)]);
        let fs = h.fs.lock().unwrap();
        let profile = fs.profile.as_ref().unwrap();
        let counts: Vec<(u32, u64)> = profile.ops.iter().map(|(&op, &(n, _))| (op, n)).collect();
        assert_eq!(
            counts,
            vec![(0, 1), (Opcode::Lookup as u32, 2), (Opcode::Init as u32, 1)]
        );
        assert_eq!(
            profile.runs, 4,
            "one run a request: INIT, two LOOKUPs, the bad chain"
        );
        let line = profile.summary();
        assert!(line.starts_with("queue runs 4; OP0 n=1"), "{line}");
        assert!(line.contains("; LOOKUP n=2 host="), "{line}");
        assert!(line.contains("; INIT n=1 host="), "{line}");
    }

    #[test]
    fn dot_dot_lookup_is_refused_through_the_queue() {
        let mut h = Harness::new();
        h.init();
        let (used, out) = h.call(Opcode::Lookup as u32, ROOT_ID, &lookup_body(".."));
        assert_eq!(out.error, -libc::EINVAL);
        assert_eq!(used, std::mem::size_of::<OutHeader>() as u32);
    }

    #[test]
    fn malformed_chains_are_returned_empty_and_the_device_keeps_serving() {
        let mut h = Harness::new();
        h.init();
        let len = h.write_request(Opcode::Lookup as u32, ROOT_ID, &lookup_body("sub"));
        // No request part.
        assert_eq!(h.raw(&[(REPLY_ADDR, REPLY_LEN, true)]), 0);
        // Request after the reply part.
        assert_eq!(
            h.raw(&[(REPLY_ADDR, REPLY_LEN, true), (REQ_ADDR, len, false)]),
            0
        );
        // Outside guest memory, and straddling its end.
        assert_eq!(
            h.raw(&[
                (0xffff_ffff_0000, len, false),
                (REPLY_ADDR, REPLY_LEN, true)
            ]),
            0
        );
        let end = crate::devices::virtio::test_utils::TEST_MEM_SIZE as u64;
        assert_eq!(
            h.raw(&[(end - 8, 64, false), (REPLY_ADDR, REPLY_LEN, true)]),
            0
        );
        // Larger than any request may be.
        let big = (MAX_REQUEST_BYTES / 2 + 1) as u32;
        assert_eq!(
            h.raw(&[
                (0x100000, big, false),
                (0x300000, big, false),
                (REPLY_ADDR, REPLY_LEN, true)
            ]),
            0
        );
        // A truncated FUSE header.
        assert_eq!(
            h.raw(&[(REQ_ADDR, 8, false), (REPLY_ADDR, REPLY_LEN, true)]),
            0
        );
        // A header claiming a huge message is answered with an error.
        let mut header: InHeader = h.mem.read_obj(GuestAddress(REQ_ADDR)).unwrap();
        header.len = u32::MAX;
        h.mem.write_obj(header, GuestAddress(REQ_ADDR)).unwrap();
        let used = h.raw(&[(REQ_ADDR, len, false), (REPLY_ADDR, REPLY_LEN, true)]);
        let out: OutHeader = h.mem.read_obj(GuestAddress(REPLY_ADDR)).unwrap();
        assert_eq!((used, out.error), (16, -libc::ENOMEM));
        // An unknown opcode.
        let (_, out) = h.call(9999, ROOT_ID, &[]);
        assert_eq!(out.error, -libc::ENOSYS);
        // A reply buffer too small for the reply.
        let len = h.write_request(Opcode::Lookup as u32, ROOT_ID, &lookup_body("sub"));
        assert_eq!(h.raw(&[(REQ_ADDR, len, false), (REPLY_ADDR, 4, true)]), 0);
        // Still serving.
        let (_, out) = h.call(Opcode::Lookup as u32, ROOT_ID, &lookup_body("sub"));
        assert_eq!(out.error, 0);
        assert!(h.fs.lock().unwrap().bad_request_log.count() >= 7);
    }

    #[test]
    fn forget_on_the_hiprio_queue_gets_no_reply_bytes() {
        let mut h = Harness::new();
        h.init();
        let len = h.write_request(Opcode::Forget as u32, ROOT_ID, &1u64.to_le_bytes());
        h.hiprio.add_chain(&[(REQ_ADDR, len, false)]);
        h.notify(0);
        assert_eq!(h.hiprio.take_used(), vec![(0, 0)]);
    }

    /// Interrupts raised since the last call (the eventfd's count).
    fn interrupts(h: &Harness) -> u64 {
        h.irq.irq_evt().read().unwrap_or(0)
    }

    #[test]
    fn with_event_indices_forgets_wait_for_the_next_request_and_share_its_interrupt() {
        let mut h = Harness::with_features(1 << VIRTIO_RING_F_EVENT_IDX);
        assert_ne!(
            h.fs.lock().unwrap().avail_features() & (1 << VIRTIO_RING_F_EVENT_IDX),
            0
        );
        // Activation served both queues: the high-priority queue's mark lies half its size
        // (8 of 16) ahead, the request queue's at the next chain.
        assert_eq!(h.hiprio.avail_event(), 7);
        assert_eq!(h.requests.avail_event(), 0);
        h.init();
        assert_eq!(interrupts(&h), 1);
        h.requests.set_used_event(1);
        h.hiprio.set_used_event(0);
        // Two FORGETs, which the driver does not notify (its index stays below the mark).
        let forget = |h: &mut Harness, addr: u64| {
            let len = h.write_request(Opcode::Forget as u32, ROOT_ID, &1u64.to_le_bytes());
            let mut bytes = vec![0u8; len as usize];
            h.mem
                .read_slice(&mut bytes, GuestAddress(REQ_ADDR))
                .unwrap();
            h.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            h.hiprio.add_chain(&[(addr, len, false)]);
        };
        forget(&mut h, 0x58000);
        forget(&mut h, 0x59000);
        assert!(h.hiprio.take_used().is_empty());
        // The next request's pass serves them first, and one interrupt covers both queues.
        let (_, out) = h.call(Opcode::Lookup as u32, ROOT_ID, &lookup_body("sub"));
        assert_eq!(out.error, 0);
        assert_eq!(h.hiprio.take_used(), vec![(0, 0), (1, 0)]);
        assert_eq!(interrupts(&h), 1);
        assert_eq!(h.hiprio.avail_event(), 2 + 7);
        assert_eq!(h.requests.avail_event(), 2);
        assert_eq!(h.fs.lock().unwrap().requests(), 4);
        // The driver notifies when it passes the mark (8 waiting): all are served then, and
        // the mark moves on.
        h.hiprio.set_used_event(2);
        for i in 0..8u64 {
            forget(&mut h, 0x58000 + 0x100 * i);
        }
        h.notify(HIPRIO_QUEUE);
        assert_eq!(h.hiprio.take_used().len(), 8);
        assert_eq!(interrupts(&h), 1);
        assert_eq!(h.hiprio.avail_event(), 10 + 7);
    }

    #[test]
    fn a_high_priority_ring_index_past_its_size_does_not_spin_the_device() {
        let mut h = Harness::with_features(1 << VIRTIO_RING_F_EVENT_IDX);
        h.init();
        // The index says 1,000 chains, more than the ring holds: none can be taken.
        h.mem
            .write_obj(1000u16, GuestAddress(h.hiprio.avail_addr() + 2))
            .unwrap();
        h.notify(HIPRIO_QUEUE);
        let (_, out) = h.call(Opcode::Lookup as u32, ROOT_ID, &lookup_body("sub"));
        assert_eq!(out.error, 0, "the request queue is still served");
        assert!(h.hiprio.take_used().is_empty());
    }

    #[test]
    fn reset_ends_the_session_and_reactivation_serves_again() {
        let mut h = Harness::new();
        h.init();
        assert!(h.fs.lock().unwrap().reset());
        assert!(!h.fs.lock().unwrap().is_activated());
        h.em.run_with_timeout(100).unwrap();
        assert!(!h.fs.lock().unwrap().state.reset_pending);
        let hiprio = GuestQueue::new(&h.mem, 0x60000, 16);
        let requests = GuestQueue::new(&h.mem, 0x70000, 16);
        h.fs.lock()
            .unwrap()
            .activate(
                h.mem.clone(),
                h.irq.clone(),
                vec![hiprio.create_queue(), requests.create_queue()],
                h.evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            )
            .unwrap();
        h.em.run_with_timeout(100).unwrap();
        h.hiprio = hiprio;
        h.requests = requests;
        h.init();
        let (_, out) = h.call(Opcode::Lookup as u32, ROOT_ID, &lookup_body("sub"));
        assert_eq!(out.error, 0);
    }

    #[test]
    fn activate_rejects_wrong_queue_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = Fs::new(dir.path()).unwrap();
        let err = fs
            .activate(
                test_memory(),
                Arc::new(IrqTrigger::new().unwrap()),
                vec![],
                vec![],
            )
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 2,
                got: 0
            }
        ));
    }
}
