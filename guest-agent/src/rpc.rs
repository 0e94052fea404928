//! Request handlers: decode, log, call a `do_*` function, map the result to a [`Response`].
//!
//! A handler also says what the connection does after its response is written ([`After`]): the
//! echo and shutdown requests change the connection's (or the VM's) course.

use crate::sysinfo::{do_handshake, AGENT_VERSION};
use husk_agent_protocol::{Request, Response, PROTOCOL_VERSION};

/// What the connection does once the response is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Read the next request.
    Continue,
    /// Become a raw byte echo until the peer closes.
    Echo,
    /// Shut the guest down.
    Shutdown,
}

/// A response and what follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub response: Response,
    pub after: After,
}

impl Reply {
    fn then(response: Response, after: After) -> Self {
        Self { response, after }
    }
}

/// Handles one frame body. A body that is not a known [`Request`] (garbage, or an operation of
/// a newer host) gets a [`Response::Error`]; the connection stays usable.
pub fn handle_frame(body: &[u8]) -> Reply {
    match serde_json::from_slice::<Request>(body) {
        Ok(request) => handle_request(&request),
        Err(err) => {
            crate::log_warn!("rejected a request: {err}");
            Reply::then(
                Response::Error {
                    message: format!("unsupported or malformed request: {err}"),
                },
                After::Continue,
            )
        }
    }
}

/// Handles one decoded request.
pub fn handle_request(request: &Request) -> Reply {
    match request {
        Request::Handshake { protocol_version } => {
            if *protocol_version != PROTOCOL_VERSION {
                // Answered anyway: the host compares versions and reports the mismatch.
                crate::log_warn!(
                    "host speaks protocol version {protocol_version}, agent {AGENT_VERSION} \
                     speaks {PROTOCOL_VERSION}"
                );
            }
            Reply::then(Response::Handshake(do_handshake()), After::Continue)
        }
        Request::Echo => Reply::then(Response::Ok, After::Echo),
        Request::Shutdown => {
            crate::log_info!("shutdown requested");
            Reply::then(Response::Ok, After::Shutdown)
        }
        // Container operations are part of the protocol; this agent does not run containers yet
        // and says so rather than pretending.
        other => {
            let op = serde_json::to_value(other)
                .ok()
                .and_then(|v| v.get("op").and_then(|op| op.as_str().map(str::to_owned)))
                .unwrap_or_else(|| "this operation".to_string());
            Reply::then(
                Response::Error {
                    message: format!("{op} is not supported by this agent"),
                },
                After::Continue,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_reports_our_protocol_version() {
        let reply = handle_frame(br#"{"op":"handshake","protocol_version":1}"#);
        assert_eq!(reply.after, After::Continue);
        match reply.response {
            Response::Handshake(hs) => {
                assert_eq!(hs.protocol_version, PROTOCOL_VERSION);
                assert_eq!(hs.agent_version, AGENT_VERSION);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn echo_and_shutdown_reply_ok_then_change_course() {
        assert_eq!(
            handle_request(&Request::Echo),
            Reply::then(Response::Ok, After::Echo)
        );
        assert_eq!(
            handle_request(&Request::Shutdown),
            Reply::then(Response::Ok, After::Shutdown)
        );
    }

    #[test]
    fn unknown_operation_gets_an_error_and_the_connection_continues() {
        let reply = handle_frame(br#"{"op":"create","id":"web"}"#);
        assert_eq!(reply.after, After::Continue);
        match reply.response {
            Response::Error { message } => {
                assert!(message.contains("unknown variant `create`"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_gets_an_error() {
        let reply = handle_frame(b"\x00\xffnot json");
        assert!(matches!(reply.response, Response::Error { .. }));
        assert_eq!(reply.after, After::Continue);
    }
}
