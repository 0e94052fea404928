//! OCI hooks (runtime spec, "POSIX-platform Hooks"), run by husk on the host.
//!
//! All six kinds run on the host, where their `path` resolves (the spec: "the path MUST resolve
//! in the runtime namespace"): the container's namespaces are inside the microVM, beyond any
//! host program's reach, so husk takes the runtime spec's allowance for VM-based runtimes and
//! runs `createContainer` and `startContainer` in the runtime's namespaces too, as Kata
//! Containers does for its host-side hooks. What a hook can touch of the container is its
//! bundle and rootfs (the guest sees the rootfs through the share, so a file a hook writes
//! there is in the container) and the container's pid, which is the `husk-vmm` process.
//!
//! When they run, with the status their state says:
//!
//! | kind              | when                                              | status     | on failure |
//! |-------------------|---------------------------------------------------|------------|------------|
//! | `prestart`        | `create`, the container made in the guest         | `creating` | error      |
//! | `createRuntime`   | `create`, right after the `prestart` hooks        | `creating` | error      |
//! | `createContainer` | `create`, right after the `createRuntime` hooks   | `creating` | error      |
//! | `startContainer`  | `start`, before the program runs                  | `created`  | error      |
//! | `poststart`       | `start`, once the program runs                    | `running`  | warning    |
//! | `poststop`        | `delete`, once everything of the container is gone | `stopped`  | warning    |
//!
//! One exception to the table, the network hooks of docker: when the spec asks for a new
//! network namespace and has `prestart` or `createRuntime` hooks, those two kinds run during
//! `create` before the microVM is built, with `husk-vmm` waiting in a network namespace of its
//! own as the container's pid (see `commands::create`), so that what they configure there
//! becomes the VM's network card.
//!
//! A failing hook of the first four kinds fails the operation: the container is stopped and
//! removed (`create`) or stopped (`start`), and the `poststop` hooks still run, as the
//! lifecycle says. Each hook gets the state on its stdin, exactly `env` as its environment,
//! the bundle as its working directory, and is killed when its `timeout` passes.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How much of a hook's output an error message quotes.
const OUTPUT_QUOTED: usize = 4096;

/// The kinds of hooks, in the order of the lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl HookKind {
    /// Every kind, in lifecycle order.
    pub const ALL: [HookKind; 6] = [
        HookKind::Prestart,
        HookKind::CreateRuntime,
        HookKind::CreateContainer,
        HookKind::StartContainer,
        HookKind::Poststart,
        HookKind::Poststop,
    ];

    /// The field name in `config.json`'s `hooks`.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Prestart => "prestart",
            HookKind::CreateRuntime => "createRuntime",
            HookKind::CreateContainer => "createContainer",
            HookKind::StartContainer => "startContainer",
            HookKind::Poststart => "poststart",
            HookKind::Poststop => "poststop",
        }
    }

    /// The container status the hooks of this kind see in their state.
    pub fn status(self) -> &'static str {
        match self {
            HookKind::Prestart | HookKind::CreateRuntime | HookKind::CreateContainer => "creating",
            HookKind::StartContainer => "created",
            HookKind::Poststart => "running",
            HookKind::Poststop => "stopped",
        }
    }

    /// Whether a failure of this kind fails the operation (else it is a warning).
    pub fn fatal(self) -> bool {
        !matches!(self, HookKind::Poststart | HookKind::Poststop)
    }
}

/// One hook of `config.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Seconds; none means no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

/// The `hooks` of a container, kept in its state so that `start` and `delete` run them
/// without the bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prestart: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub create_runtime: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub create_container: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start_container: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub poststart: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub poststop: Vec<Hook>,
}

impl Hooks {
    /// The `hooks` of `spec`, checked: each an object with an absolute `path`, `args` and `env`
    /// lists of strings, `env` entries `NAME=value`, a positive integer `timeout`.
    pub fn from_spec(spec: &Value) -> Result<Hooks, String> {
        let mut hooks = Hooks::default();
        let Some(section) = spec.get("hooks") else {
            return Ok(hooks);
        };
        if section.is_null() {
            return Ok(hooks);
        }
        let section = section
            .as_object()
            .ok_or("hooks must be an object".to_string())?;
        for key in section.keys() {
            if !HookKind::ALL.iter().any(|k| k.name() == key) {
                return Err(format!(
                    "hooks.{key}: unknown hook kind (known: prestart, createRuntime, \
                     createContainer, startContainer, poststart, poststop)"
                ));
            }
        }
        for kind in HookKind::ALL {
            let Some(list) = section.get(kind.name()) else {
                continue;
            };
            if list.is_null() {
                continue;
            }
            let list = list
                .as_array()
                .ok_or_else(|| format!("hooks.{} must be a list", kind.name()))?;
            let parsed = list
                .iter()
                .enumerate()
                .map(|(i, hook)| {
                    parse_hook(hook).map_err(|e| format!("hooks.{}[{i}]: {e}", kind.name()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            *hooks.get_mut(kind) = parsed;
        }
        Ok(hooks)
    }

    /// The hooks of `kind`.
    pub fn get(&self, kind: HookKind) -> &[Hook] {
        match kind {
            HookKind::Prestart => &self.prestart,
            HookKind::CreateRuntime => &self.create_runtime,
            HookKind::CreateContainer => &self.create_container,
            HookKind::StartContainer => &self.start_container,
            HookKind::Poststart => &self.poststart,
            HookKind::Poststop => &self.poststop,
        }
    }

    fn get_mut(&mut self, kind: HookKind) -> &mut Vec<Hook> {
        match kind {
            HookKind::Prestart => &mut self.prestart,
            HookKind::CreateRuntime => &mut self.create_runtime,
            HookKind::CreateContainer => &mut self.create_container,
            HookKind::StartContainer => &mut self.start_container,
            HookKind::Poststart => &mut self.poststart,
            HookKind::Poststop => &mut self.poststop,
        }
    }

    /// Whether there are no hooks at all.
    pub fn is_empty(&self) -> bool {
        HookKind::ALL.iter().all(|k| self.get(*k).is_empty())
    }

    /// Runs the hooks of `kind` in order with `state` (its `status` set for the kind) on their
    /// stdin. A fatal kind stops at the first failure and returns it; the others warn through
    /// `warn` for each failure and carry on.
    pub fn run(
        &self,
        kind: HookKind,
        state: &Value,
        cwd: &Path,
        warn: impl Fn(&str),
    ) -> Result<()> {
        let hooks = self.get(kind);
        if hooks.is_empty() {
            return Ok(());
        }
        let mut state = state.clone();
        state["status"] = Value::String(kind.status().into());
        let input = serde_json::to_vec(&state)?;
        for (i, hook) in hooks.iter().enumerate() {
            let result = run_hook(hook, &input, cwd)
                .with_context(|| format!("{} hook {i} ({})", kind.name(), hook.path.display()));
            match result {
                Ok(()) => {}
                Err(e) if kind.fatal() => return Err(e),
                Err(e) => warn(&format!("{e:#}")),
            }
        }
        Ok(())
    }
}

impl Hooks {
    /// The hooks of `create`, once the container exists in the guest: prestart, createRuntime,
    /// createContainer, stopping at the first failure.
    pub fn run_create(&self, state: &Value, cwd: &Path, warn: impl Fn(&str)) -> Result<()> {
        [
            HookKind::Prestart,
            HookKind::CreateRuntime,
            HookKind::CreateContainer,
        ]
        .into_iter()
        .try_for_each(|kind| self.run(kind, state, cwd, &warn))
    }
}

fn parse_hook(hook: &Value) -> Result<Hook, String> {
    let obj = hook.as_object().ok_or("a hook must be an object")?;
    let path = obj
        .get("path")
        .and_then(Value::as_str)
        .ok_or("missing field path")?;
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must be absolute"));
    }
    let strings = |field: &str| -> Result<Vec<String>, String> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or(format!("{field} must be a list of strings"))
                })
                .collect(),
            Some(_) => Err(format!("{field} must be a list of strings")),
        }
    };
    let args = strings("args")?;
    let env = strings("env")?;
    if let Some(bad) = env.iter().find(|e| !e.contains('=')) {
        return Err(format!("env entry {bad:?} is not NAME=value"));
    }
    let timeout = match obj.get("timeout") {
        None | Some(Value::Null) => None,
        Some(t) => match t.as_u64() {
            Some(secs) if secs > 0 => Some(secs),
            _ => return Err(format!("timeout {t} must be a positive number of seconds")),
        },
    };
    Ok(Hook {
        path: PathBuf::from(path),
        args,
        env,
        timeout,
    })
}

/// An unnamed file holding `data` at offset 0, for a hook's stdin (no pipe a hook that never
/// reads could block).
fn memfd_with(name: &str, data: &[u8]) -> Result<std::fs::File> {
    let fd = nix::sys::memfd::memfd_create(
        &std::ffi::CString::new(name)?,
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .context("memfd_create")?;
    let mut file = std::fs::File::from(fd);
    file.write_all(data)?;
    file.rewind()?;
    Ok(file)
}

/// Runs one hook to completion; its stdout and stderr go to a memory file quoted on failure
/// (a file, not a pipe: a child the hook leaves behind cannot hold `husk` up).
fn run_hook(hook: &Hook, state: &[u8], cwd: &Path) -> Result<()> {
    let stdin = memfd_with("husk-hook-state", state)?;
    let mut output = memfd_with("husk-hook-output", b"")?;
    let mut cmd = Command::new(&hook.path);
    if let Some((argv0, rest)) = hook.args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear()
        .envs(hook.env.iter().filter_map(|e| e.split_once('=')))
        .current_dir(cwd)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(output.try_clone()?))
        .stderr(Stdio::from(output.try_clone()?))
        // Its own process group, so that a timeout kills what it started too.
        .process_group(0);
    let mut child = cmd.spawn().context("cannot run it")?;
    let deadline = hook
        .timeout
        .map(|s| Instant::now() + Duration::from_secs(s));
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            bail!(
                "timed out after {} s and was killed{}",
                hook.timeout.unwrap_or(0),
                quoted(&mut output)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if !status.success() {
        bail!("failed ({status}){}", quoted(&mut output));
    }
    Ok(())
}

/// The start of a hook's output, for an error message.
fn quoted(output: &mut std::fs::File) -> String {
    let mut text = Vec::new();
    let _ = output.rewind();
    let _ = output.take(OUTPUT_QUOTED as u64).read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::cell::RefCell;

    fn state() -> Value {
        json!({"ociVersion": "1.2.0", "id": "c1", "status": "x", "pid": 42, "bundle": "/b"})
    }

    #[test]
    fn parses_every_kind_in_order() {
        let spec = json!({"hooks": {
            "prestart": [{"path": "/bin/a"}],
            "createRuntime": [{"path": "/bin/b", "args": ["b", "x"], "env": ["A=1"], "timeout": 3}],
            "poststop": [{"path": "/bin/c"}, {"path": "/bin/d"}],
        }});
        let hooks = Hooks::from_spec(&spec).expect("valid");
        assert_eq!(hooks.get(HookKind::Prestart).len(), 1);
        let b = &hooks.get(HookKind::CreateRuntime)[0];
        assert_eq!(b.args, ["b", "x"]);
        assert_eq!(b.env, ["A=1"]);
        assert_eq!(b.timeout, Some(3));
        assert_eq!(hooks.get(HookKind::Poststop).len(), 2);
        assert!(hooks.get(HookKind::StartContainer).is_empty());
        assert!(!hooks.is_empty());
        assert!(Hooks::from_spec(&json!({})).expect("none").is_empty());
        // Kept in the state and read back unchanged.
        let back: Hooks =
            serde_json::from_value(serde_json::to_value(&hooks).expect("ser")).expect("de");
        assert_eq!(back, hooks);
    }

    #[test]
    fn refuses_malformed_hooks_by_name() {
        for (hooks, needle) in [
            (json!([]), "hooks must be an object"),
            (json!({"prestrat": []}), "hooks.prestrat: unknown hook kind"),
            (json!({"prestart": {}}), "hooks.prestart must be a list"),
            (
                json!({"prestart": [{"args": []}]}),
                "hooks.prestart[0]: missing field path",
            ),
            (json!({"poststart": [{"path": "true"}]}), "must be absolute"),
            (
                json!({"poststop": [{"path": "/t", "args": [1]}]}),
                "args must be a list",
            ),
            (
                json!({"poststop": [{"path": "/t", "env": ["X"]}]}),
                "not NAME=value",
            ),
            (
                json!({"poststop": [{"path": "/t", "timeout": 0}]}),
                "positive number",
            ),
            (
                json!({"poststop": [{"path": "/t", "timeout": -1}]}),
                "positive number",
            ),
        ] {
            let err = Hooks::from_spec(&json!({ "hooks": hooks })).expect_err("refused");
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }

    #[test]
    fn statuses_and_fatality_follow_the_spec() {
        use HookKind::*;
        let table: Vec<_> = HookKind::ALL
            .iter()
            .map(|k| (k.name(), k.status(), k.fatal()))
            .collect();
        assert_eq!(
            table,
            [
                ("prestart", "creating", true),
                ("createRuntime", "creating", true),
                ("createContainer", "creating", true),
                ("startContainer", "created", true),
                ("poststart", "running", false),
                ("poststop", "stopped", false),
            ]
        );
        assert!(Prestart.fatal() && !Poststop.fatal());
    }

    fn hook(script: &str, timeout: Option<u64>) -> Hook {
        Hook {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["HOOK_ENV=yes".into()],
            timeout,
        }
    }

    #[test]
    fn a_hook_gets_the_state_its_env_and_the_bundle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let script = format!(
            "cat > {out}; echo \" $HOOK_ENV $PWD ${{HOME:-nohome}}\" >> {out}",
            out = out.display()
        );
        let hooks = Hooks {
            start_container: vec![hook(&script, Some(10))],
            ..Hooks::default()
        };
        hooks
            .run(HookKind::StartContainer, &state(), dir.path(), |_| {})
            .expect("runs");
        let text = std::fs::read_to_string(&out).expect("output");
        let (json_text, rest) = text.split_once(' ').expect("two parts");
        let seen: Value = serde_json::from_str(json_text).expect("state on stdin");
        assert_eq!(seen["status"], "created");
        assert_eq!(seen["id"], "c1");
        assert_eq!(seen["pid"], 42);
        assert_eq!(
            rest.trim(),
            format!("yes {} nohome", dir.path().display()),
            "exactly the hook's env, in the bundle"
        );
    }

    #[test]
    fn a_fatal_failure_stops_the_rest_and_names_the_hook() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("second-ran");
        let hooks = Hooks {
            prestart: vec![
                hook("echo broken >&2; exit 3", None),
                hook(&format!("touch {}", marker.display()), None),
            ],
            ..Hooks::default()
        };
        let err = hooks
            .run(HookKind::Prestart, &state(), dir.path(), |_| {})
            .expect_err("fails");
        let text = format!("{err:#}");
        assert!(text.contains("prestart hook 0 (/bin/sh)"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("broken"), "{text}");
        assert!(!marker.exists(), "the hooks after a failed one do not run");
    }

    #[test]
    fn a_warning_kind_runs_every_hook() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("second-ran");
        let hooks = Hooks {
            poststop: vec![
                hook("exit 1", None),
                hook(&format!("touch {}", marker.display()), None),
            ],
            ..Hooks::default()
        };
        let warnings = RefCell::new(Vec::new());
        hooks
            .run(HookKind::Poststop, &state(), dir.path(), |w| {
                warnings.borrow_mut().push(w.to_string())
            })
            .expect("warnings only");
        assert!(marker.exists());
        let warnings = warnings.into_inner();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("poststop hook 0"), "{warnings:?}");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hooks = Hooks {
            create_runtime: vec![hook("sleep 100 & sleep 100", Some(1))],
            ..Hooks::default()
        };
        let started = Instant::now();
        let err = hooks
            .run(HookKind::CreateRuntime, &state(), dir.path(), |_| {})
            .expect_err("times out");
        assert!(
            format!("{err:#}").contains("timed out after 1 s"),
            "{err:#}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_missing_hook_binary_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hooks = Hooks {
            create_container: vec![Hook {
                path: "/nonexistent/hook".into(),
                args: Vec::new(),
                env: Vec::new(),
                timeout: None,
            }],
            ..Hooks::default()
        };
        let err = hooks
            .run(HookKind::CreateContainer, &state(), dir.path(), |_| {})
            .expect_err("fails");
        assert!(format!("{err:#}").contains("/nonexistent/hook"), "{err:#}");
    }
}
