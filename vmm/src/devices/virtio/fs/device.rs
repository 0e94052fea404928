//! [`Fs`]: the `VirtioDevice` side of the file system device.

use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use tracing::debug;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::handle_chain;
use super::{
    ConfinedFs, FsError, CONFIG_SIZE, DEFAULT_TAG, HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE, TAG_LEN,
};
use crate::devices::virtio::{
    signal_used_queue, ActivateError, ActiveState, IrqTrigger, RateLimitedLog, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_ID_FS,
};

/// The virtio file system device, sharing one host directory.
pub struct Fs {
    pub(super) acked_features: u64,
    pub(super) queue_sizes: [u16; 2],
    pub(super) config: [u8; CONFIG_SIZE],
    pub(super) fs: Arc<ConfinedFs>,
    pub(super) server: Server<Arc<ConfinedFs>>,
    pub(super) activate_evt: EventFd,
    pub(super) active: Option<ActiveState>,
    /// Whether the active queue eventfds are registered with the device thread.
    pub(super) queue_evts_registered: bool,
    /// Queue eventfds of a reset activation, still to be unregistered on the device thread.
    pub(super) stale_queue_evts: Vec<EventFd>,
    /// The FUSE session ended with a reset: forget the guest's inodes and handles.
    pub(super) session_reset_pending: bool,
    pub(super) bad_request_log: RateLimitedLog,
    /// Requests answered.
    pub(super) requests: u64,
}

impl Fs {
    /// Shares `shared_dir` with the tag [`DEFAULT_TAG`].
    pub fn new(shared_dir: &Path) -> Result<Self, FsError> {
        Self::with_tag(shared_dir, DEFAULT_TAG)
    }

    /// Shares `shared_dir` with `tag` (1 to [`TAG_LEN`] bytes).
    pub fn with_tag(shared_dir: &Path, tag: &str) -> Result<Self, FsError> {
        let fs = Arc::new(ConfinedFs::new(shared_dir)?);
        Ok(Self {
            acked_features: 0,
            queue_sizes: [HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE],
            config: config_space(tag)?,
            server: Server::new(fs.clone()),
            fs,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd)?,
            active: None,
            queue_evts_registered: false,
            stale_queue_evts: Vec::new(),
            session_reset_pending: false,
            bad_request_log: RateLimitedLog::default(),
            requests: 0,
        })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Serves every available request of queue `index`; interrupts the guest if any was
    /// completed.
    pub(super) fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let written = match handle_chain(&self.server, &active.mem, chain) {
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
        if used_any {
            signal_used_queue(queue, &active.mem, &active.interrupt);
        }
    }

    /// Drops the old session's inodes and open files (device thread, after a reset).
    pub(super) fn finish_session_reset(&mut self) {
        if std::mem::take(&mut self.session_reset_pending) {
            self.fs.destroy();
        }
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

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            if let Some(v) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o))
            {
                *byte = *v;
            }
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The configuration space is read-only.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
        interrupt: Arc<IrqTrigger>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActivated);
        }
        let expected = self.queue_sizes.len();
        if queues.len() != expected || queue_evts.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        self.active = Some(ActiveState {
            mem,
            interrupt,
            queues,
            queue_evts,
        });
        self.activate_evt
            .write(1)
            .map_err(ActivateError::ActivateEvent)
    }

    fn reset(&mut self) -> bool {
        if let Some(active) = self.active.take() {
            // The device thread unregisters the old eventfds and ends the session when woken.
            self.stale_queue_evts.extend(active.queue_evts);
            self.session_reset_pending = true;
            if let Err(e) = self.activate_evt.write(1) {
                tracing::warn!("virtio-fs: failed to signal the reset: {e}");
            }
        }
        self.acked_features = 0;
        true
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}
