//! containerd's stdio FIFOs relayed to a guest process's streams.
//!
//! Each stream the task has (a non-empty FIFO path) is attached to the agent on its own vsock
//! connection before the process starts ([`attach`]); one thread per direction then copies with
//! blocking writes, so a slow reader (`kubectl logs`, a paused `ctr`) holds the guest back
//! through vsock's flow control instead of losing bytes.
//!
//! - Output FIFOs are opened write-only in their relay thread (the open waits for containerd's
//!   reader). When the guest closes the stream, every byte has been written and the FIFO is
//!   closed, which is the EOF containerd waits for before it reports the exit.
//! - The stdin FIFO is opened non-blocking and polled: a FIFO whose writer has not connected yet
//!   reads as EOF, so the relay reads only once poll saw data or a writer that went away.
//!   `CloseIO` ([`ProcessIo::close_stdin`]) makes the relay forward what is buffered and then
//!   close the guest's stdin.
//! - With a terminal there is one pty stream both ways; stdout receives the terminal's output.

use husk_agent_protocol::{ProcessRef, StdioConfig, StreamKind};
use husk_vmm::supervisor::{open_stream, pump};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The FIFOs containerd gave for a process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl IoPaths {
    /// The streams the agent should give the process.
    pub fn stdio_config(&self) -> StdioConfig {
        if self.terminal {
            StdioConfig {
                terminal: true,
                ..StdioConfig::default()
            }
        } else {
            StdioConfig {
                terminal: false,
                stdin: !self.stdin.is_empty(),
                stdout: !self.stdout.is_empty(),
                stderr: !self.stderr.is_empty(),
            }
        }
    }
}

/// Errors of attaching the streams.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("attaching the process's streams")]
    Attach(#[source] husk_vmm::supervisor::SupervisorError),
    #[error("FIFO {0}")]
    Fifo(PathBuf, #[source] io::Error),
    #[error("starting a relay thread")]
    Thread(#[source] io::Error),
}

/// The relays of one process.
pub struct ProcessIo {
    /// Output relays (end when the guest closes its side).
    outputs: Vec<Output>,
    /// Clones of the guest streams, shut down to end relays that outlive the drain timeout.
    streams: Vec<UnixStream>,
    /// Write end of the stdin relay's close pipe (`CloseIO`).
    stdin_close: Mutex<Option<OwnedFd>>,
}

impl ProcessIo {
    /// Forwards what stdin has buffered, then closes the process's stdin.
    pub fn close_stdin(&self) {
        let fd = self
            .stdin_close
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(fd) = fd {
            let _ = File::from(fd).write_all(b"x");
        }
    }

    /// Lets the output relays drain, then cuts what is left, so that every output FIFO is
    /// closed (or its relay detached) when this returns. A relay that keeps moving bytes - a slow
    /// reader - is waited for; one that moved nothing for `stall_timeout` (the guest stream is
    /// held open by a leftover process, or nobody reads the FIFO) is cut.
    pub fn finish(self, stall_timeout: Duration) {
        let moved = |outputs: &[Output]| -> u64 {
            outputs
                .iter()
                .map(|o| o.progress.load(Ordering::Relaxed))
                .sum()
        };
        let mut last = (moved(&self.outputs), Instant::now());
        while !self.outputs.iter().all(|o| o.handle.is_finished()) {
            let now = moved(&self.outputs);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= stall_timeout {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.close_stdin();
        for stream in &self.streams {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for output in self.outputs {
            if !output.handle.is_finished() {
                if let Some(path) = &output.fifo {
                    // A relay still waiting in open() for a reader: be that reader for a moment;
                    // its first write then fails and it drains into the void.
                    let _ = OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(path);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            while !output.handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            if output.handle.is_finished() {
                let _ = output.handle.join();
            } else {
                log::warn!("an output relay is stuck writing its FIFO; leaving it behind");
            }
        }
    }
}

/// Attaches the streams `paths` names to `process` (created, not started) through the VM's
/// vsock `socket` and starts the relays.
pub fn attach(socket: &Path, process: &ProcessRef, paths: &IoPaths) -> Result<ProcessIo, IoError> {
    let mut io = ProcessIo {
        outputs: Vec::new(),
        streams: Vec::new(),
        stdin_close: Mutex::new(None),
    };
    let open = |kind| open_stream(socket, process, kind).map_err(IoError::Attach);
    let clone = |s: &UnixStream| s.try_clone().map_err(IoError::Thread);
    if paths.terminal {
        let pty = open(StreamKind::Pty)?;
        io.streams.push(clone(&pty)?);
        if !paths.stdin.is_empty() {
            let to_guest = clone(&pty)?;
            io.start_stdin(&paths.stdin, to_guest, false)?;
        }
        if paths.stdout.is_empty() {
            // Nobody reads the terminal: drain it so that the program never blocks on it.
            io.outputs.push(spawn_output(pty, None)?);
        } else {
            io.outputs
                .push(spawn_output(pty, Some(PathBuf::from(&paths.stdout)))?);
        }
        return Ok(io);
    }
    if !paths.stdin.is_empty() {
        let stream = open(StreamKind::Stdin)?;
        io.streams.push(clone(&stream)?);
        io.start_stdin(&paths.stdin, stream, true)?;
    }
    for (path, kind) in [
        (&paths.stdout, StreamKind::Stdout),
        (&paths.stderr, StreamKind::Stderr),
    ] {
        if path.is_empty() {
            continue;
        }
        let stream = open(kind)?;
        io.streams.push(clone(&stream)?);
        io.outputs
            .push(spawn_output(stream, Some(PathBuf::from(path)))?);
    }
    Ok(io)
}

impl ProcessIo {
    fn start_stdin(
        &mut self,
        path: &str,
        to_guest: UnixStream,
        shutdown_on_eof: bool,
    ) -> Result<(), IoError> {
        let fifo = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| IoError::Fifo(PathBuf::from(path), e))?;
        let (close_read, close_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| IoError::Thread(e.into()))?;
        *self.stdin_close.lock().unwrap_or_else(|p| p.into_inner()) = Some(close_write);
        thread::Builder::new()
            .name("husk-shim-stdin".into())
            .spawn(move || {
                let mut to_guest = to_guest;
                relay_stdin(&fifo, &close_read, &mut to_guest);
                if shutdown_on_eof {
                    let _ = to_guest.shutdown(std::net::Shutdown::Write);
                }
            })
            .map_err(IoError::Thread)?;
        Ok(())
    }
}

/// Copies the (non-blocking) stdin FIFO into `to` until the FIFO's writer closed it, or until
/// `close` becomes readable and the FIFO has nothing more buffered.
fn relay_stdin(fifo: &File, close: &OwnedFd, to: &mut impl Write) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut closing = false;
    loop {
        let timeout = if closing {
            PollTimeout::ZERO
        } else {
            PollTimeout::NONE
        };
        let (fifo_ready, close_ready) = {
            let mut fds = [
                PollFd::new(fifo.as_fd(), PollFlags::POLLIN),
                PollFd::new(close.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(_) => return,
            }
            let ready = |fd: &PollFd| !fd.revents().unwrap_or(PollFlags::empty()).is_empty();
            (ready(&fds[0]), ready(&fds[1]))
        };
        if close_ready {
            closing = true;
        }
        if !fifo_ready {
            if closing {
                return;
            }
            continue;
        }
        match (&*fifo).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if closing {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// One output relay.
struct Output {
    handle: JoinHandle<()>,
    /// Bytes written to the FIFO so far.
    progress: Arc<AtomicU64>,
    fifo: Option<PathBuf>,
}

/// A writer that counts what it wrote.
struct Counting<'a, W> {
    inner: W,
    count: &'a AtomicU64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Copies `from` into the FIFO at `path` (opened write-only here, waiting for the reader), or
/// discards it when there is no FIFO.
fn spawn_output(from: UnixStream, path: Option<PathBuf>) -> Result<Output, IoError> {
    let progress = Arc::new(AtomicU64::new(0));
    let counter = progress.clone();
    let fifo = path.clone();
    let handle = thread::Builder::new()
        .name("husk-shim-out".into())
        .spawn(move || {
            let mut from = from;
            let fifo = path.and_then(|path| match OpenOptions::new().write(true).open(&path) {
                Ok(f) => Some(f),
                Err(e) => {
                    log::warn!("cannot open {}: {e}", path.display());
                    None
                }
            });
            if let Some(fifo) = fifo {
                let mut to = Counting {
                    inner: fifo,
                    count: &counter,
                };
                pump(&mut from, &mut to);
            }
            // No FIFO, or its reader went away: keep draining so the guest never blocks.
            pump(&mut from, &mut io::sink());
        })
        .map_err(IoError::Thread)?;
    Ok(Output {
        handle,
        progress,
        fifo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        path
    }

    #[test]
    fn stdio_config_follows_the_fifos() {
        let paths = IoPaths {
            stdin: String::new(),
            stdout: "/o".into(),
            stderr: "/e".into(),
            terminal: false,
        };
        let cfg = paths.stdio_config();
        assert!(!cfg.stdin && cfg.stdout && cfg.stderr && !cfg.terminal);
        let tty = IoPaths {
            terminal: true,
            ..paths
        };
        assert_eq!(
            tty.stdio_config(),
            StdioConfig {
                terminal: true,
                ..StdioConfig::default()
            }
        );
    }

    #[test]
    fn stdin_relay_waits_for_a_writer_and_forwards_everything_until_eof() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = fifo(dir.path(), "stdin");
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .expect("open");
        let (close_read, _close_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let relay = thread::spawn(move || {
            let mut out = Vec::new();
            relay_stdin(&file, &close_read, &mut out);
            out
        });
        // No writer for a while: the relay must not take that for EOF.
        thread::sleep(Duration::from_millis(50));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = OpenOptions::new().write(true).open(&path).expect("writer");
        writer.write_all(&data).expect("write");
        drop(writer);
        let out = relay.join().expect("relay");
        assert_eq!(out, data);
    }

    #[test]
    fn close_stdin_forwards_buffered_bytes_then_ends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = fifo(dir.path(), "stdin");
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .expect("open");
        let mut writer = OpenOptions::new().write(true).open(&path).expect("writer");
        writer.write_all(b"last words").expect("write");
        let (close_read, close_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        File::from(close_write).write_all(b"x").expect("close");
        let mut out = Vec::new();
        relay_stdin(&file, &close_read, &mut out);
        assert_eq!(out, b"last words");
        drop(writer);
    }

    fn relays(outputs: Vec<Output>, streams: Vec<UnixStream>) -> ProcessIo {
        ProcessIo {
            outputs,
            streams,
            stdin_close: Mutex::new(None),
        }
    }

    #[test]
    fn finish_waits_for_a_slow_reader_and_loses_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = fifo(dir.path(), "stdout");
        let (mut guest, host) = UnixStream::pair().expect("pair");
        let keep = host.try_clone().expect("clone");
        let output = spawn_output(host, Some(path.clone())).expect("relay");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let writer_data = data.clone();
        let writer = thread::spawn(move || {
            guest.write_all(&writer_data).expect("write");
        });
        let reader = thread::spawn(move || {
            let mut file = File::open(&path).expect("reader");
            let mut all = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            loop {
                // Far slower than the relay: the whole copy takes longer than the stall timeout.
                thread::sleep(Duration::from_millis(5));
                match file.read(&mut buf).expect("read") {
                    0 => break,
                    n => all.extend_from_slice(&buf[..n]),
                }
            }
            all
        });
        relays(vec![output], vec![keep]).finish(Duration::from_millis(100));
        writer.join().expect("writer");
        assert_eq!(reader.join().expect("reader"), data);
    }

    #[test]
    fn finish_cuts_a_relay_nobody_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = fifo(dir.path(), "stdout");
        let (mut guest, host) = UnixStream::pair().expect("pair");
        let keep = host.try_clone().expect("clone");
        let output = spawn_output(host, Some(path)).expect("relay");
        guest.write_all(b"nobody reads this").expect("write");
        let started = Instant::now();
        relays(vec![output], vec![keep]).finish(Duration::from_millis(100));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn output_relay_copies_to_the_fifo_and_closes_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = fifo(dir.path(), "stdout");
        let reader_path = path.clone();
        let reader = thread::spawn(move || {
            let mut all = Vec::new();
            File::open(&reader_path)
                .expect("reader")
                .read_to_end(&mut all)
                .expect("read");
            all
        });
        let (mut guest, host) = UnixStream::pair().expect("pair");
        let output = spawn_output(host, Some(path)).expect("relay");
        let data = vec![7u8; 300_000];
        guest.write_all(&data).expect("write");
        drop(guest);
        output.handle.join().expect("relay thread");
        assert_eq!(output.progress.load(Ordering::Relaxed), 300_000);
        assert_eq!(reader.join().expect("reader"), data);
    }
}
