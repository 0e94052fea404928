//! Request handlers: decode, log, call a `do_*` function, map the result to a [`Response`].
//!
//! A handler also says what the connection does after its response is written ([`After`]): the
//! echo and shutdown requests change the connection's (or the VM's) course.

use crate::container::{AttachJob, ContainerError, Containers};
use crate::sysinfo::{do_handshake, AGENT_VERSION};
use husk_agent_protocol::{
    ExecProcess, Request, Response, PROTOCOL_VERSION, TEST_EXIT_COMMAND, TEST_HOOK_EXIT_ON_EXEC,
};

/// What the connection does once the response is written.
#[derive(Debug)]
pub enum After {
    /// Read the next request.
    Continue,
    /// Become a raw byte echo until the peer closes.
    Echo,
    /// Shut the guest down.
    Shutdown,
    /// Become a process's standard stream.
    Attach(AttachJob),
}

/// A response and what follows it.
#[derive(Debug)]
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
pub fn handle_frame(body: &[u8], containers: Option<&Containers>) -> Reply {
    match serde_json::from_slice::<Request>(body) {
        Ok(request) => handle_request(&request, containers),
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
pub fn handle_request(request: &Request, containers: Option<&Containers>) -> Reply {
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
        Request::Renew(renewal) => match crate::identity::renew(renewal) {
            Ok(()) => Reply::then(Response::Ok, After::Continue),
            Err(err) => {
                let message = error_chain(&err);
                crate::log_error!("renewal failed: {message}");
                Reply::then(Response::Error { message }, After::Continue)
            }
        },
        Request::Shutdown => {
            crate::log_info!("shutdown requested");
            Reply::then(Response::Ok, After::Shutdown)
        }
        other => match containers {
            Some(containers) => container_request(other, containers),
            None => Reply::then(
                Response::Error {
                    message: format!(
                        "{} needs the agent's process reaper, which this agent runs without",
                        op_name(other)
                    ),
                },
                After::Continue,
            ),
        },
    }
}

/// The `op` tag of a request, for messages.
fn op_name(request: &Request) -> String {
    serde_json::to_value(request)
        .ok()
        .and_then(|v| v.get("op").and_then(|op| op.as_str().map(str::to_owned)))
        .unwrap_or_else(|| "this operation".to_string())
}

/// An error and its causes on one line (`writing /x failed: No such file or directory`).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether `req` trips the test hook armed on the kernel command line
/// ([`husk_agent_protocol::TEST_HOOK_EXIT_ON_EXEC`]): an exec of [`TEST_EXIT_COMMAND`].
fn trips_exit_hook(req: &ExecProcess, hook: Option<&str>) -> bool {
    hook == Some(TEST_HOOK_EXIT_ON_EXEC)
        && req
            .process
            .get("args")
            .and_then(|args| args.get(0))
            .and_then(|arg| arg.as_str())
            == Some(TEST_EXIT_COMMAND)
}

/// Handles a container operation.
fn container_request(request: &Request, c: &Containers) -> Reply {
    let result: Result<(Response, After), ContainerError> = match request {
        Request::CreateContainer(req) => c
            .create(req)
            .map(|pid| (Response::Created { pid }, After::Continue)),
        Request::ExecProcess(req) => {
            if trips_exit_hook(req, crate::init::test_hook()) {
                crate::log_error!(
                    "test hook {TEST_HOOK_EXIT_ON_EXEC}: exec of {TEST_EXIT_COMMAND}, the agent exits"
                );
                std::process::exit(134);
            }
            c.exec(req)
                .map(|pid| (Response::Created { pid }, After::Continue))
        }
        Request::AttachStdio(req) => c.attach(req).map(|job| (Response::Ok, After::Attach(job))),
        Request::StartProcess(r) => c.start(r).map(|()| (Response::Ok, After::Continue)),
        Request::WaitProcess(r) => c
            .wait(r)
            .map(|status| (Response::Exited(status), After::Continue)),
        Request::SignalProcess {
            process,
            signal,
            all,
        } => c
            .signal(process, *signal, *all)
            .map(|()| (Response::Ok, After::Continue)),
        Request::ResizePty {
            process,
            rows,
            cols,
        } => c
            .resize(process, *rows, *cols)
            .map(|()| (Response::Ok, After::Continue)),
        Request::CloseStdin(r) => c.close_stdin(r).map(|()| (Response::Ok, After::Continue)),
        Request::ListProcesses { id } => c
            .list_processes(id)
            .map(|pids| (Response::Pids { pids }, After::Continue)),
        Request::Stats { id } => c
            .stats(id)
            .map(|stats| (Response::Stats(stats), After::Continue)),
        Request::Update { id, resources } => c
            .update(id, resources)
            .map(|()| (Response::Ok, After::Continue)),
        Request::Pause { id } => c.freeze(id, true).map(|()| (Response::Ok, After::Continue)),
        Request::Resume { id } => c
            .freeze(id, false)
            .map(|()| (Response::Ok, After::Continue)),
        Request::RemoveContainer { id } => c.remove(id).map(|()| (Response::Ok, After::Continue)),
        Request::ListContainers => Ok((
            Response::Containers {
                containers: c.list(),
            },
            After::Continue,
        )),
        Request::Handshake { .. } | Request::Echo | Request::Shutdown | Request::Renew(_) => Ok((
            Response::Error {
                message: "not a container operation".into(),
            },
            After::Continue,
        )),
    };
    match result {
        Ok((response, after)) => Reply::then(response, after),
        Err(err) => {
            let message = error_chain(&err);
            crate::log_warn!("{} failed: {message}", op_name(request));
            Reply::then(Response::Error { message }, After::Continue)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_armed_hook_and_its_command_trip_the_exit() {
        let exec = |args: serde_json::Value| ExecProcess {
            id: "c".into(),
            exec_id: "e".into(),
            process: serde_json::json!({ "args": args, "cwd": "/" }),
            stdio: Default::default(),
        };
        let trip = exec(serde_json::json!([TEST_EXIT_COMMAND]));
        assert!(trips_exit_hook(&trip, Some(TEST_HOOK_EXIT_ON_EXEC)));
        assert!(!trips_exit_hook(&trip, None), "not armed");
        assert!(!trips_exit_hook(&trip, Some("other-hook")));
        for args in [
            serde_json::json!(["sh", TEST_EXIT_COMMAND]),
            serde_json::json!([]),
            serde_json::json!("husk-test-agent-exit"),
            serde_json::json!([7]),
        ] {
            assert!(
                !trips_exit_hook(&exec(args.clone()), Some(TEST_HOOK_EXIT_ON_EXEC)),
                "{args}"
            );
        }
    }

    #[test]
    fn handshake_reports_our_protocol_version() {
        let reply = handle_frame(br#"{"op":"handshake","protocol_version":1}"#, None);
        assert!(matches!(reply.after, After::Continue));
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
        let echo = handle_request(&Request::Echo, None);
        assert!(matches!(
            (echo.response, echo.after),
            (Response::Ok, After::Echo)
        ));
        let shutdown = handle_request(&Request::Shutdown, None);
        assert!(matches!(
            (shutdown.response, shutdown.after),
            (Response::Ok, After::Shutdown)
        ));
    }

    #[test]
    fn unknown_operation_gets_an_error_and_the_connection_continues() {
        let reply = handle_frame(br#"{"op":"create","id":"web"}"#, None);
        assert!(matches!(reply.after, After::Continue));
        match reply.response {
            Response::Error { message } => {
                assert!(message.contains("unknown variant `create`"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn garbage_gets_an_error() {
        let reply = handle_frame(b"\x00\xffnot json", None);
        assert!(matches!(reply.response, Response::Error { .. }));
        assert!(matches!(reply.after, After::Continue));
    }

    #[test]
    fn error_replies_carry_the_causes() {
        let err =
            crate::container::ContainerError::Cgroup(crate::container::cgroup::CgroupError::Io {
                op: "writing",
                path: "/cg/pids.max".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        assert_eq!(
            error_chain(&err),
            "writing /cg/pids.max failed: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn container_operations_without_a_reaper_are_refused() {
        let reply = handle_frame(br#"{"op":"list_containers"}"#, None);
        match reply.response {
            Response::Error { message } => {
                assert!(message.starts_with("list_containers needs"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
