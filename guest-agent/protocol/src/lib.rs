//! Wire types and framing of the husk agent protocol, shared by `husk-agent` (in the guest) and
//! the host (`husk-vmm`, the runtime, tests).
//!
//! The agent listens on vsock port [`AGENT_VSOCK_PORT`]. Every message is one frame: a `u32`
//! big-endian body length followed by a JSON body (see [`frame`]). A connection starts with a
//! [`Request::Handshake`] answered by [`Response::Handshake`]; then the host sends requests and
//! reads one response for each.
//!
//! This crate depends only on std and serde: no guest-only code lives here. The host side
//! ([`client`]) treats every reply as untrusted (size limits, timeouts, exact types).

pub mod client;
pub mod frame;

use serde::{Deserialize, Serialize};

pub use client::{AgentClient, ClientError};
pub use frame::{read_frame, read_frame_bytes, write_frame, FrameError, MAX_FRAME_LEN};

/// Version of the wire protocol. Bumped on every incompatible change; both sides compare it in
/// the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// A request from the host to the agent.
///
/// Encoded as a JSON object tagged by `"op"`, e.g. `{"op":"handshake","protocol_version":1}`.
/// The agent answers a request it does not know (a newer host) with [`Response::Error`] and
/// keeps serving the connection. Container operations (create, start, exec, wait, signal, ...)
/// will be added here as new variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First request of a connection; the agent answers with [`Response::Handshake`].
    Handshake {
        /// The protocol version the host speaks ([`PROTOCOL_VERSION`]).
        protocol_version: u32,
    },
    /// Shut the guest down cleanly. The agent replies [`Response::Ok`], then syncs and resets
    /// the VM, which the VMM reports as a clean exit.
    Shutdown,
    /// Diagnostics: after the [`Response::Ok`] reply the connection stops carrying frames and
    /// becomes a raw byte echo until the host closes its write side. Tests and benchmarks use
    /// it to push bulk data through vsock.
    Echo,
}

/// A response from the agent to one [`Request`].
///
/// Encoded as a JSON object tagged by `"type"`, e.g. `{"type":"ok"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Handshake`].
    Handshake(Handshake),
    /// The request succeeded and has no result.
    Ok,
    /// The request failed (or was not understood); the connection stays usable.
    Error {
        /// What went wrong, for logs and users.
        message: String,
    },
}

impl Response {
    /// A short name of the variant, for error messages (never the untrusted payload).
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Handshake(_) => "handshake",
            Response::Ok => "ok",
            Response::Error { .. } => "error",
        }
    }
}

/// What the agent reports about itself and the guest in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// The protocol version the agent speaks ([`PROTOCOL_VERSION`] of its build).
    pub protocol_version: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// Guest time since boot (`CLOCK_BOOTTIME`), in microseconds, when the handshake was served.
    pub uptime_us: u64,
    /// Online guest CPUs.
    pub cpus: u32,
    /// `MemTotal` of the guest's `/proc/meminfo` (RAM the kernel manages), in KiB.
    pub mem_total_kib: u64,
    /// Sum of the "System RAM" ranges of the guest's `/proc/iomem`: the RAM the VMM gave the
    /// guest, in KiB.
    pub mem_phys_kib: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_is_tagged_by_op() {
        let json = serde_json::to_string(&Request::Handshake {
            protocol_version: 1,
        })
        .expect("serializable");
        assert_eq!(json, r#"{"op":"handshake","protocol_version":1}"#);
        assert_eq!(
            serde_json::to_string(&Request::Shutdown).expect("serializable"),
            r#"{"op":"shutdown"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"echo"}"#).expect("valid"),
            Request::Echo
        );
    }

    #[test]
    fn unknown_request_op_fails_to_decode() {
        let err =
            serde_json::from_str::<Request>(r#"{"op":"create","id":"x"}"#).expect_err("unknown op");
        assert!(err.to_string().contains("unknown variant"), "{err}");
    }

    #[test]
    fn handshake_response_round_trips_flat() {
        let resp = Response::Handshake(Handshake {
            protocol_version: 1,
            agent_version: "0.1.0".into(),
            uptime_us: 12,
            cpus: 2,
            mem_total_kib: 100,
            mem_phys_kib: 128,
        });
        let json = serde_json::to_string(&resp).expect("serializable");
        assert_eq!(
            json,
            r#"{"type":"handshake","protocol_version":1,"agent_version":"0.1.0","uptime_us":12,"cpus":2,"mem_total_kib":100,"mem_phys_kib":128}"#
        );
        assert_eq!(
            serde_json::from_str::<Response>(&json).expect("valid"),
            resp
        );
        assert_eq!(
            serde_json::to_string(&Response::Error {
                message: "no".into()
            })
            .expect("serializable"),
            r#"{"type":"error","message":"no"}"#
        );
    }
}
