//! Warm start end to end: containers whose microVMs are restored from one template are each
//! their own (randomness, boot id, clock, memory), the template never changes, and a damaged,
//! mismatched or half-built template is never restored: the container boots, the log says
//! why, and the template is built again.

use husk_tests::oci::OciEnv;
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An environment whose templates live in its own directory.
fn env_with_templates(test: &str) -> Option<(OciEnv, PathBuf)> {
    let env = OciEnv::new(test)?;
    let templates = env.work.path().join("templates");
    env.append_config(&format!(
        "warm_start = true\ntemplate_dir = \"{}\"\n",
        templates.display()
    ));
    Some((env, templates))
}

/// `husk template build`: the template's directory.
fn build_template(env: &OciEnv) -> PathBuf {
    let out = env.run(&["template", "build"]);
    assert!(
        out.status.success(),
        "template build: {}",
        text(&out.stderr)
    );
    let dir = PathBuf::from(text(&out.stdout).trim());
    assert!(
        dir.join("state").is_file() && dir.join("memory").is_file(),
        "{dir:?}"
    );
    dir
}

fn digest(path: &Path) -> String {
    let data = std::fs::read(path).expect("read");
    Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Template files and their digests (the `verified` record excepted: it is a cache).
fn template_digests(dir: &Path) -> Vec<(String, String)> {
    ["state", "memory"]
        .iter()
        .map(|f| (f.to_string(), digest(&dir.join(f))))
        .collect()
}

/// The command line of the container's `husk-vmm`.
fn vmm_cmdline(env: &OciEnv, id: &str) -> String {
    let state = env.state(id).expect("state");
    let pid = state["pid"].as_u64().expect("pid");
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    text(&raw).replace('\0', " ")
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// What a container says about itself: 32 bytes of /dev/urandom and of /dev/random (the
/// getrandom(2) path), a kernel UUID, the boot id, the wall clock, and the marks in its
/// /dev/shm.
#[derive(Debug)]
struct Identity {
    urandom: String,
    random: String,
    uuid: String,
    boot_id: String,
    clock_s: f64,
    marks: String,
}

const REPORT: &str = "od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'; echo; \
     od -An -tx1 -N32 /dev/random | tr -d ' \\n'; echo; \
     cat /proc/sys/kernel/random/uuid; cat /proc/sys/kernel/random/boot_id; \
     date +%s; ls /dev/shm | tr '\\n' ' '; echo";

fn identity(env: &OciEnv, id: &str) -> (Identity, f64, f64) {
    let before = now_s();
    let out = env.run(&["exec", id, "sh", "-c", REPORT]);
    let after = now_s();
    assert!(out.status.success(), "exec {id}: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() >= 6, "report of {id}: {stdout:?}");
    (
        Identity {
            urandom: lines[0].into(),
            random: lines[1].into(),
            uuid: lines[2].into(),
            boot_id: lines[3].into(),
            clock_s: lines[4].trim().parse().expect("date +%s"),
            marks: lines[5].trim().into(),
        },
        before,
        after,
    )
}

#[test]
fn restored_sandboxes_are_each_their_own() {
    let Some((env, _templates)) = env_with_templates("restored_sandboxes_are_each_their_own")
    else {
        return;
    };
    let template = build_template(&env);
    let before = template_digests(&template);
    for id in ["w1", "w2"] {
        let bundle = env.bundle(
            id,
            &[
                "sh",
                "-c",
                &format!("head -c 4096 /dev/urandom > /dev/shm/{id}; exec sleep 1000"),
            ],
            |_| {},
        );
        let out = env.run(&["run", "-d", "--bundle", bundle.to_str().expect("utf-8"), id]);
        assert!(out.status.success(), "run -d {id}: {}", text(&out.stderr));
        let cmdline = vmm_cmdline(&env, id);
        assert!(
            cmdline.contains(&format!("--restore {}", template.display())),
            "{id} was restored from the template: {cmdline}"
        );
    }
    assert!(env.wait_status("w1", "running", Duration::from_secs(60)));
    assert!(env.wait_status("w2", "running", Duration::from_secs(60)));
    let (one, b1, a1) = identity(&env, "w1");
    let (two, b2, a2) = identity(&env, "w2");
    for (a, b, what) in [
        (&one.urandom, &two.urandom, "/dev/urandom"),
        (&one.random, &two.random, "/dev/random"),
        (&one.uuid, &two.uuid, "a kernel UUID"),
        (&one.boot_id, &two.boot_id, "the boot id"),
    ] {
        assert_eq!(a.len(), b.len(), "{what}: {a:?} {b:?}");
        assert!(!a.is_empty(), "{what} read nothing");
        assert_ne!(a, b, "two restored sandboxes read the same {what}");
    }
    // The guest's clock is the host's, within a second (date +%s truncates: one more).
    for (id, clock, before, after) in [("w1", one.clock_s, b1, a1), ("w2", two.clock_s, b2, a2)] {
        assert!(
            clock >= before.floor() - 1.0 && clock <= after + 1.0,
            "{id}: guest clock {clock}, host {before}..{after}"
        );
    }
    // Each guest's memory is its own: each sees only its own file in its tmpfs.
    assert_eq!(one.marks, "w1", "w1's /dev/shm");
    assert_eq!(two.marks, "w2", "w2's /dev/shm");
    for id in ["w1", "w2"] {
        let out = env.run(&["delete", "--force", id]);
        assert!(out.status.success(), "delete {id}: {}", text(&out.stderr));
    }
    assert_eq!(
        template_digests(&template),
        before,
        "the template is unchanged by the sandboxes restored from it"
    );
    assert!(
        env.vmms_left().is_empty(),
        "no VMM left: {:?}",
        env.vmms_left()
    );
}

/// Runs `true` in a new container `id`; returns husk's stderr.
fn run_true(env: &OciEnv, id: &str) -> String {
    let bundle = env.bundle(id, &["true"], |_| {});
    let out = env.run(&["run", "--bundle", bundle.to_str().expect("utf-8"), id]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "run {id}: {stderr}");
    stderr
}

/// Flips the bits of one byte of `path` at `offset`.
fn flip_byte(path: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).expect("read");
    file.write_all_at(&[!byte[0]], offset).expect("write");
}

#[test]
fn a_template_holds_the_kernel_text_its_guest_never_ran() {
    // The boot maps the kernel's text and read-only data from its file and faults in only what
    // the guest runs. A template must still hold all of it: a restored guest has only the
    // template, and may run later what the template's guest never did (a pod's guest, missing
    // such text, oopsed in a cgroup worker when its first member container was deleted).
    let Some((env, _templates)) = env_with_templates("a_template_holds_the_kernel_text") else {
        return;
    };
    // Out of the page cache, as after a reboot: what the guest does not run stays on disk.
    let kernel = std::fs::File::open(&env.artifacts.kernel).expect("open the kernel");
    // SAFETY: posix_fadvise on an open descriptor, plain integers.
    let advised = unsafe {
        use std::os::fd::AsRawFd;
        libc::posix_fadvise(kernel.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
    };
    assert_eq!(advised, 0);
    let dir = build_template(&env);
    let elf = std::fs::read(&env.artifacts.kernel).expect("read the kernel");
    let image = husk_vmm::arch::x86_64::elf::parse_kernel(&kernel, elf.len() as u64)
        .expect("the kernel is an ELF64 vmlinux");
    let memory = std::fs::File::open(dir.join("memory")).expect("open the memory file");
    const PAGE: u64 = 4096;
    let (mut checked, mut same, mut missing) = (0, 0, Vec::new());
    let mut saved = vec![0u8; PAGE as usize];
    for segment in image.segments.iter().filter(|s| !s.writable) {
        let (addr, offset, size) = (segment.guest_addr, segment.file_offset, segment.file_size);
        // Whole pages of the segment (a 128 MiB guest's memory file is its RAM from 0).
        let first = addr.div_ceil(PAGE) * PAGE;
        let mut page = first;
        while page + PAGE <= addr + size {
            let at = (offset + page - addr) as usize;
            let file_page = &elf[at..at + PAGE as usize];
            if file_page.iter().any(|b| *b != 0) {
                memory
                    .read_exact_at(&mut saved, page)
                    .expect("read the memory file");
                checked += 1;
                if saved == file_page {
                    same += 1;
                } else if saved.iter().all(|b| *b == 0) {
                    missing.push(page);
                }
            }
            page += PAGE;
        }
    }
    assert!(
        checked > 1000,
        "only {checked} pages of kernel text and read-only data"
    );
    // A page the guest patched as it booted (alternatives, static keys) differs from the
    // file's; none may be missing.
    assert!(
        missing.is_empty(),
        "{} of {checked} kernel pages are zeros in the template (first at {:#x}); {same} are \
         as in the file",
        missing.len(),
        missing[0]
    );
    assert!(same > 0, "no kernel page of the template is as in the file");
}

#[test]
fn a_damaged_or_mismatched_template_is_never_restored() {
    let Some((env, templates)) =
        env_with_templates("a_damaged_or_mismatched_template_is_never_restored")
    else {
        return;
    };
    type Damage = fn(&Path);
    let damages: [(&str, &str, Damage); 3] = [
        ("memory", "corrupt", |dir| {
            flip_byte(&dir.join("memory"), 0x100_0000 + 0x123)
        }),
        ("state", "truncated", |dir| {
            let state = dir.join("state");
            let len = std::fs::metadata(&state).expect("stat").len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&state)
                .and_then(|f| f.set_len(len / 2))
                .expect("truncate");
        }),
        ("state", "corrupt", |dir| {
            let state = dir.join("state");
            let len = std::fs::metadata(&state).expect("stat").len();
            flip_byte(&state, len / 2);
        }),
    ];
    for (n, (file, word, damage)) in damages.iter().enumerate() {
        let template = build_template(&env);
        damage(&template);
        let stderr = run_true(&env, &format!("d{n}"));
        assert!(
            stderr.contains("warm start:") && stderr.contains(word) && stderr.contains(file),
            "a {word} {file} is named in the log: {stderr}"
        );
        assert!(
            !template.exists(),
            "the refused template is thrown away ({word} {file})"
        );
        // The next container builds it again and starts from it, without a word.
        let stderr = run_true(&env, &format!("r{n}"));
        assert!(!stderr.contains("warm start:"), "{stderr}");
        assert!(
            template.join("state").is_file(),
            "rebuilt after the {word} {file}"
        );
    }

    // A template made for another shape, put where this shape's would be.
    let template = build_template(&env);
    let out = env.run(&["template", "build", "--mem-mib", "192"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let other = PathBuf::from(text(&out.stdout).trim());
    std::fs::remove_dir_all(&template).expect("remove");
    std::fs::rename(&other, &template).expect("swap");
    let stderr = run_true(&env, "m1");
    assert!(
        stderr.contains("warm start:") && stderr.contains("memory (MiB) 192"),
        "the mismatch is named: {stderr}"
    );
    assert!(!template.exists());
    assert!(templates.exists());
}

#[test]
fn the_first_sandbox_records_the_write_set_and_a_damaged_one_is_dropped() {
    let Some((env, _templates)) =
        env_with_templates("the_first_sandbox_records_the_write_set_and_a_damaged_one_is_dropped")
    else {
        return;
    };
    let template = build_template(&env);
    let write_set = template.join("write-set");
    assert!(!write_set.exists(), "a new template has no write set yet");
    let before = template_digests(&template);
    run_true(&env, "ws1");
    let meta = std::fs::metadata(&write_set).expect("the first sandbox recorded the write set");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "root-only");
    // Header (84 bytes), one range at least (16), the digest (32).
    assert!(meta.len() >= 84 + 16 + 32, "{} bytes", meta.len());
    let recorded = digest(&write_set);
    let stderr = run_true(&env, "ws2");
    assert!(!stderr.contains("warm start:"), "{stderr}");
    assert_eq!(digest(&write_set), recorded, "recorded once");

    // A damaged write set: the sandbox still restores from the template, the VMM's log says
    // why the write set was not used, and it is gone (the next sandbox records it again).
    flip_byte(&write_set, 90);
    let bundle = env.bundle("ws3", &["sleep", "1000"], |_| {});
    let out = env.run(&[
        "run",
        "-d",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "ws3",
    ]);
    assert!(out.status.success(), "run -d ws3: {}", text(&out.stderr));
    assert!(
        vmm_cmdline(&env, "ws3").contains(&format!("--restore {}", template.display())),
        "restored from the template"
    );
    let logs = env.logs();
    assert!(
        logs.contains("ignoring the template's write set (removed)") && logs.contains("digest"),
        "{logs}"
    );
    let out = env.run(&["exec", "ws3", "true"]);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    let out = env.run(&["delete", "--force", "ws3"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    run_true(&env, "ws4");
    assert!(write_set.is_file(), "recorded again");
    assert_eq!(
        template_digests(&template),
        before,
        "the template's state and memory are unchanged"
    );
    env.assert_nothing_left("after the write set's sandboxes");
}

/// `husk --debug` keeps the guest's console, so its sandboxes restore from a template of their
/// own (booted with the console): the others' template is neither refused nor thrown away.
#[test]
fn a_debug_sandbox_leaves_the_others_template_alone() {
    let Some((env, _templates)) =
        env_with_templates("a_debug_sandbox_leaves_the_others_template_alone")
    else {
        return;
    };
    let template = build_template(&env);
    let before = template_digests(&template);
    let bundle = env.bundle("dbg", &["true"], |_| {});
    let out = env.run(&[
        "--debug",
        "run",
        "--bundle",
        bundle.to_str().expect("utf-8"),
        "dbg",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "run --debug: {stderr}");
    assert!(
        !stderr.contains("warm start:"),
        "nothing refused, nothing booted: {stderr}"
    );
    let out = env.run(&["--debug", "template", "build"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let debug_template = PathBuf::from(text(&out.stdout).trim());
    assert_ne!(debug_template, template);
    assert!(
        stderr.contains(&format!("\"--restore\" \"{}\"", debug_template.display())),
        "restored from the console's template: {stderr}"
    );
    assert!(
        template.join("state").is_file(),
        "the others' template stays"
    );
    assert_eq!(template_digests(&template), before);
    let stderr = run_true(&env, "plain");
    assert!(!stderr.contains("warm start:"), "{stderr}");
}

#[test]
fn a_template_build_killed_half_way_leaves_nothing_to_restore() {
    let Some((env, templates)) =
        env_with_templates("a_template_build_killed_half_way_leaves_nothing_to_restore")
    else {
        return;
    };
    let mut build = env.husk(&["template", "build"]);
    build
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = build.spawn().expect("husk template build");
    // Kill it once its guest is booting (the build directory exists).
    let building = husk_tests::wait_until(Duration::from_secs(120), || {
        std::fs::read_dir(&templates)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".build-"))
    });
    assert!(building, "the build started");
    child.kill().expect("kill -9");
    let _ = child.wait();
    let complete: Vec<String> = std::fs::read_dir(&templates)
        .expect("templates")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    assert!(
        complete.is_empty(),
        "no template from a killed build: {complete:?}"
    );
    // The template VMM died with its builder.
    assert!(
        husk_tests::wait_until(Duration::from_secs(10), || env.vmms_left().is_empty()
            && !vmm_building(&templates)),
        "the template's husk-vmm is gone"
    );
    let stderr = run_true(&env, "after-kill");
    assert!(!stderr.contains("warm start:"), "{stderr}");
    let leftovers: Vec<String> = std::fs::read_dir(&templates)
        .expect("templates")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".build-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the killed build's files are gone: {leftovers:?}"
    );
}

/// Whether a `husk-vmm --template-out` under `templates` still runs.
fn vmm_building(templates: &Path) -> bool {
    let needle = templates.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| text(&c))
        .any(|c| c.contains("--template-out") && c.contains(&needle))
}

/// `husk run` of a container with no hook between its creation and its start has husk-vmm
/// start it as soon as it exists (one step, no separate start), once the template's write set
/// is recorded; a program that cannot run fails the `run` with its name and leaves nothing;
/// a hook between creation and start still runs before the program.
#[test]
fn run_starts_at_once_when_nothing_runs_in_between() {
    let Some((env, _templates)) =
        env_with_templates("run_starts_at_once_when_nothing_runs_in_between")
    else {
        return;
    };
    build_template(&env);
    let log = env.work.path().join("husk.log");
    let log_text = log.to_str().expect("utf-8");
    let debug_run = |id: &str, bundle: &Path| {
        env.run(&[
            "--debug",
            "--log",
            log_text,
            "run",
            "--bundle",
            bundle.to_str().expect("utf-8"),
            id,
        ])
    };
    let said = |id: &str, what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&format!("container {id} {what}"))
    };

    // The template's first sandbox records its write set before it is started.
    let first = env.bundle("first", &["true"], |_| {});
    let out = debug_run("first", &first);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(said(
        "first",
        "is started after its creation, not with it: its template's write set"
    ));

    let talk = env.bundle(
        "talk",
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        |_| {},
    );
    let out = debug_run("talk", &talk);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));
    assert!(said("talk", "created and started in one step"));

    let missing = env.bundle("missing", &["/no/such/program"], |_| {});
    let out = debug_run("missing", &missing);
    assert!(
        !out.status.success(),
        "a program that is not there fails run"
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("/no/such/program"), "{stderr}");
    env.assert_nothing_left("after a run whose program could not start");

    // A createContainer hook writes into the rootfs before the program reads it.
    let marker = env.work.path().join("rootfs/written-by-hook");
    let hooked = env.bundle("hooked", &["cat", "/written-by-hook"], |spec| {
        spec["hooks"] = serde_json::json!({
            "createContainer": [{
                "path": "/bin/sh",
                "args": ["sh", "-c", format!("echo from-the-hook > {}", marker.display())],
            }],
        });
    });
    let out = debug_run("hooked", &hooked);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from-the-hook\n");
    assert!(said(
        "hooked",
        "is started after its creation, not with it: hooks run in between"
    ));
    env.assert_nothing_left("after the runs");
}
