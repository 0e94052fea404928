//! Reaching a container's agent through the state directory's vsock socket.

use crate::container::StateDir;
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::{ProcessRef, Request, Response};
use std::time::Duration;

/// How long a command waits for the agent of a running VM.
pub const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of talking to a container's agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent of container {id:?}: {message}")]
    Connect { id: String, message: String },
    #[error("{what}: {message}")]
    Request { what: String, message: String },
}

/// Connects to the agent of the container in `dir`.
pub fn connect(dir: &StateDir) -> Result<AgentClient, AgentError> {
    AgentClient::connect(&dir.vsock_socket(), AGENT_CONNECT_TIMEOUT)
        .map(|(client, _)| client)
        .map_err(|e| AgentError::Connect {
            id: dir.id.clone(),
            message: husk_vmm::supervisor::chain(&e),
        })
}

/// Sends `request` and returns its reply; an agent error becomes [`AgentError::Request`].
pub fn call(
    client: &mut AgentClient,
    what: &str,
    request: &Request,
) -> Result<Response, AgentError> {
    let err = |message: String| AgentError::Request {
        what: what.to_string(),
        message,
    };
    match client.request(request) {
        Ok(Response::Error { message }) => Err(err(message)),
        Ok(other) => Ok(other),
        Err(e) => Err(err(husk_vmm::supervisor::chain(&e))),
    }
}

/// Sends `request`, which must be answered with `Ok`.
pub fn call_ok(client: &mut AgentClient, what: &str, request: &Request) -> Result<(), AgentError> {
    match call(client, what, request)? {
        Response::Ok => Ok(()),
        other => Err(AgentError::Request {
            what: what.to_string(),
            message: format!("unexpected {} reply", other.kind()),
        }),
    }
}

/// The container's init.
pub fn init_process(id: &str) -> ProcessRef {
    ProcessRef {
        id: id.to_string(),
        exec_id: None,
    }
}
