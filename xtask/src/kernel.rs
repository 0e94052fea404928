//! The guest kernel: an uncompressed `vmlinux` built from Debian's `linux-source-6.1` with the
//! checked-in configuration in `kernel-config/` and the patches in `kernel-config/patches/`.
//!
//! Two entry points:
//! - [`build`]: returns the cached `vmlinux` for the current inputs, building it when missing.
//!   Inputs are the full config, the fragments, the patches and the installed source package
//!   version; the artifact is `<cache>/kernel/<key>/vmlinux`. A warm cache only hashes a few
//!   small files.
//! - [`regen_config`]: rebuilds `kernel-config/config-6.1-x86_64` from the fragments
//!   (`make allnoconfig` with `KCONFIG_ALLCONFIG`), and fails when a fragment's request did not
//!   survive Kconfig's dependency resolution.
//!
//! Cache layout (under [`util::cache_dir`]):
//! - `kernel/src/<tree>/`: the unpacked source tree with the patches applied, shared by every
//!   build of that version and patch set; `<tree>` is the version, plus a hash of the patches
//!   when there are any ([`tree_name`])
//! - `kernel/obj/<tree>/`: the out-of-tree object dir (`make O=`), reused so that a config
//!   change rebuilds incrementally
//! - `kernel/<key>/vmlinux` (+ `config`): the finished artifact
//! - `kernel/lock`: held while building, so two builds never share an object dir

use crate::util;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Debian package holding the kernel source tarball.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// The tarball that package installs.
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The top folder inside the tarball.
const SOURCE_TOP_DIR: &str = "linux-source-6.1";
/// Everything the build needs, installed with apt when missing.
const BUILD_PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "make",
    "gcc",
    "xz-utils",
    "binutils",
    "patch",
];
/// Name of the checked-in full configuration inside `kernel-config/`.
const FULL_CONFIG: &str = "config-6.1-x86_64";
/// Fragments are the files in `kernel-config/` ending in this.
const FRAGMENT_SUFFIX: &str = ".config";
/// Patches to the source are the files in `kernel-config/patches/` ending in this, applied in
/// file-name order with `patch -p1`.
const PATCH_SUFFIX: &str = ".patch";
/// Kbuild architecture. `x86_64` (not `x86`) pins a 64-bit kernel.
const ARCH: &str = "x86_64";
/// Bump when the build recipe changes in a way that changes the artifact (strip flags, make
/// variables), so that old cache entries are not reused.
const RECIPE_VERSION: &str = "1";

/// Returns the path of the guest `vmlinux`, building it if the cache does not have it.
pub fn build() -> Result<PathBuf> {
    util::apt_install(BUILD_PACKAGES)?;
    let config_dir = config_dir();
    let full_config_path = config_dir.join(FULL_CONFIG);
    let full_config = std::fs::read_to_string(&full_config_path)
        .with_context(|| format!("reading {}", full_config_path.display()))?;
    let fragments = read_fragments(&config_dir)?;
    let patches = read_patches(&config_dir.join("patches"))?;
    // Cheap and catches a fragment edited without regenerating the full config.
    check_config(&fragments, &full_config).with_context(|| {
        format!(
            "{} does not match the fragments; run xtask's kernel regen-config and commit the result",
            full_config_path.display()
        )
    })?;
    let version = source_version()?;
    let key = cache_key(&full_config, &fragments, &patches, &version);
    let kernel_dir = util::cache_dir()?.join("kernel");
    let artifact_dir = kernel_dir.join(&key);
    let vmlinux = artifact_dir.join("vmlinux");
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }

    let started = Instant::now();
    std::fs::create_dir_all(&kernel_dir)
        .with_context(|| format!("creating {}", kernel_dir.display()))?;
    let _lock = lock(&kernel_dir)?;
    // Another build may have finished it while we waited for the lock.
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }
    let tree = tree_name(&version, &patches);
    let src = source_tree(&kernel_dir, &tree, &patches)?;
    let obj = kernel_dir.join("obj").join(&tree);
    std::fs::create_dir_all(&obj).with_context(|| format!("creating {}", obj.display()))?;

    let dot_config = obj.join(".config");
    std::fs::write(&dot_config, &full_config)
        .with_context(|| format!("writing {}", dot_config.display()))?;
    util::run(make(&src, &obj).arg("olddefconfig"))?;
    let settled = std::fs::read_to_string(&dot_config)
        .with_context(|| format!("reading {}", dot_config.display()))?;
    if settled != full_config {
        print_diff(&full_config_path, &dot_config);
        bail!(
            "make olddefconfig changed {} (different compiler or source version?); \
             regenerate it with xtask's kernel regen-config and commit the result",
            full_config_path.display()
        );
    }

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    util::run(
        Command::new("nice")
            .args(["-n", "10"])
            .arg("make")
            .args(make_args(&src, &obj))
            .arg(format!("-j{jobs}"))
            .arg("vmlinux")
            .envs(reproducible_env()),
    )?;

    let built = obj.join("vmlinux");
    std::fs::create_dir_all(&artifact_dir)
        .with_context(|| format!("creating {}", artifact_dir.display()))?;
    let stripped = artifact_dir.join(format!("vmlinux.strip.{}", std::process::id()));
    util::run(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(&built),
    )?;
    // The VMM boots through the PVH note: never publish an image without it.
    let image =
        std::fs::read(&stripped).with_context(|| format!("reading {}", stripped.display()))?;
    let entry = pvh_entry(&image).with_context(|| format!("parsing {}", stripped.display()))?;
    let Some(entry) = entry else {
        bail!(
            "{} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH on?",
            built.display()
        );
    };
    util::copy_atomic(&dot_config, &artifact_dir.join("config"))?;
    // The rename publishes the artifact: a present `vmlinux` is always complete.
    std::fs::rename(&stripped, &vmlinux)
        .with_context(|| format!("renaming {} to {}", stripped.display(), vmlinux.display()))?;
    let size = std::fs::metadata(&vmlinux)
        .with_context(|| format!("reading metadata of {}", vmlinux.display()))?
        .len();
    eprintln!(
        "xtask: kernel built in {:.0?}: {} ({} bytes, PVH entry {entry:#x})",
        started.elapsed(),
        vmlinux.display(),
        size
    );
    remove_other_trees(&kernel_dir, &path_safe(&version), &tree);
    Ok(vmlinux)
}

/// Removes the source trees and object dirs of `version` other than `keep` (another patch
/// set's, or the unpatched one): 1.5 GB or more each, and only a change of the patches back
/// would use one again. Called with the build lock held, so no build is using them.
fn remove_other_trees(kernel_dir: &Path, version: &str, keep: &str) {
    for sub in ["src", "obj"] {
        let Ok(entries) = std::fs::read_dir(kernel_dir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_tree_of(&name, version) && name != keep {
                eprintln!(
                    "xtask: removing the kernel tree {} (another patch set)",
                    entry.path().display()
                );
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    eprintln!("xtask: cannot remove {}: {e}", entry.path().display());
                }
            }
        }
    }
}

/// Whether a tree name ([`tree_name`]) is one of `version`'s: the version alone, or with a
/// patch set's `+p` hash.
fn is_tree_of(name: &str, version: &str) -> bool {
    match name.strip_prefix(version) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix("+p")
            .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit())),
        None => false,
    }
}

/// Regenerates `kernel-config/config-6.1-x86_64` from the fragments: `make allnoconfig` with the
/// concatenated fragments as `KCONFIG_ALLCONFIG`, then checks that every option a fragment asks
/// for got the asked value and that `olddefconfig` leaves the result unchanged.
pub fn regen_config() -> Result<()> {
    util::apt_install(BUILD_PACKAGES)?;
    let config_dir = config_dir();
    let fragments = read_fragments(&config_dir)?;
    let patches = read_patches(&config_dir.join("patches"))?;
    let version = source_version()?;
    let kernel_dir = util::cache_dir()?.join("kernel");
    std::fs::create_dir_all(&kernel_dir)
        .with_context(|| format!("creating {}", kernel_dir.display()))?;
    let _lock = lock(&kernel_dir)?;
    let src = source_tree(&kernel_dir, &tree_name(&version, &patches), &patches)?;

    let work = kernel_dir.join(format!("regen.{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = regen_in(&src, &work, &fragments, &config_dir.join(FULL_CONFIG));
    // Best effort: a leftover scratch dir is harmless.
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn regen_in(src: &Path, work: &Path, fragments: &[Fragment], out: &Path) -> Result<()> {
    let all = work.join("fragments.config");
    let mut merged = String::new();
    for fragment in fragments {
        merged.push_str(&format!("# ---- {} ----\n", fragment.name));
        merged.push_str(&fragment.text);
        merged.push('\n');
    }
    std::fs::write(&all, merged).with_context(|| format!("writing {}", all.display()))?;
    util::run(
        make(src, work)
            .arg(format!("KCONFIG_ALLCONFIG={}", all.display()))
            .arg("allnoconfig"),
    )?;
    let dot_config = work.join(".config");
    let generated = std::fs::read_to_string(&dot_config)
        .with_context(|| format!("reading {}", dot_config.display()))?;
    check_config(fragments, &generated)?;
    util::run(make(src, work).arg("olddefconfig"))?;
    let settled = std::fs::read_to_string(&dot_config)
        .with_context(|| format!("reading {}", dot_config.display()))?;
    if settled != generated {
        bail!("olddefconfig changed the allnoconfig result; the config is not a fixed point");
    }
    util::write_atomic(out, settled.as_bytes())?;
    eprintln!("xtask: wrote {}", out.display());
    Ok(())
}

/// One fragment file of `kernel-config/`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fragment {
    name: String,
    text: String,
}

/// What a fragment asks of one option.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    /// `CONFIG_X=value` (value as written: `y`, `64`, `"-husk"`).
    Value(String),
    /// `# CONFIG_X is not set`: off, or absent because its dependencies are off.
    Off,
}

/// The files of `dir` whose names end in `suffix`, as (name, path, text), sorted by name.
fn read_files(dir: &Path, suffix: &str) -> Result<Vec<(String, PathBuf, String)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(suffix) || !entry.path().is_file() {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())
            .with_context(|| format!("reading {}", entry.path().display()))?;
        files.push((name, entry.path(), text));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// Reads the fragments (`*.config` in `dir`), sorted by file name so the merge is stable.
fn read_fragments(dir: &Path) -> Result<Vec<Fragment>> {
    let fragments: Vec<Fragment> = read_files(dir, FRAGMENT_SUFFIX)?
        .into_iter()
        .map(|(name, _, text)| Fragment { name, text })
        .collect();
    if fragments.is_empty() {
        bail!("no *{FRAGMENT_SUFFIX} fragments in {}", dir.display());
    }
    Ok(fragments)
}

/// One patch of `kernel-config/patches/`: why it is there is the text before its first diff.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Patch {
    name: String,
    path: PathBuf,
    text: String,
}

/// Reads the patches (`*.patch` in `dir`, which may be missing), sorted by file name: the
/// order they are applied in.
fn read_patches(dir: &Path) -> Result<Vec<Patch>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    Ok(read_files(dir, PATCH_SUFFIX)?
        .into_iter()
        .map(|(name, path, text)| Patch { name, path, text })
        .collect())
}

/// The name of the source tree (and object dir) for a source version and patch set: the
/// version alone when nothing is patched, else the version and the first 16 hex digits of a
/// hash of the patches, so a tree is never shared by two patch sets.
fn tree_name(version: &str, patches: &[Patch]) -> String {
    let version = path_safe(version);
    if patches.is_empty() {
        return version;
    }
    let hash = util::hash_inputs(patches.iter().map(|p| (p.name.as_str(), p.text.as_bytes())));
    format!("{version}+p{}", &hash[..16])
}

/// Parses one line of a Kconfig file into (symbol, setting); `None` for comments and blanks.
fn parse_line(line: &str) -> Option<(&str, Wanted)> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("# ") {
        let symbol = rest.strip_suffix(" is not set")?;
        return symbol
            .starts_with("CONFIG_")
            .then_some((symbol, Wanted::Off));
    }
    let (symbol, value) = line.split_once('=')?;
    symbol
        .starts_with("CONFIG_")
        .then(|| (symbol, Wanted::Value(value.to_string())))
}

/// Collects what all fragments ask for; two fragments asking different things is an error.
fn wanted_settings(fragments: &[Fragment]) -> Result<BTreeMap<String, (Wanted, String)>> {
    let mut wanted: BTreeMap<String, (Wanted, String)> = BTreeMap::new();
    for fragment in fragments {
        for line in fragment.text.lines() {
            let Some((symbol, setting)) = parse_line(line) else {
                continue;
            };
            if let Some((earlier, where_)) = wanted.get(symbol) {
                if *earlier != setting {
                    bail!(
                        "{symbol}: {} asks for {earlier:?} but {} asks for {setting:?}",
                        where_,
                        fragment.name
                    );
                }
                continue;
            }
            wanted.insert(symbol.to_string(), (setting, fragment.name.clone()));
        }
    }
    Ok(wanted)
}

/// One option whose value in the full config differs from what a fragment asks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mismatch {
    symbol: String,
    fragment: String,
    wanted: Wanted,
    /// The value in the full config; `None` when it is off or absent.
    got: Option<String>,
}

/// Compares the fragments' requests with a full config; returns every mismatch.
fn find_mismatches(fragments: &[Fragment], full: &str) -> Result<Vec<Mismatch>> {
    let wanted = wanted_settings(fragments)?;
    let actual: BTreeMap<&str, &str> = full
        .lines()
        .filter_map(|line| match parse_line(line)? {
            (symbol, Wanted::Value(_)) => line.trim().split_once('=').map(|(_, v)| (symbol, v)),
            (_, Wanted::Off) => None,
        })
        .collect();
    let mut mismatches = Vec::new();
    for (symbol, (setting, fragment)) in wanted {
        let got = actual.get(symbol.as_str()).map(|v| v.to_string());
        let ok = match &setting {
            Wanted::Value(value) => got.as_deref() == Some(value.as_str()),
            Wanted::Off => got.as_deref().is_none_or(|v| v == "n"),
        };
        if !ok {
            mismatches.push(Mismatch {
                symbol,
                fragment,
                wanted: setting,
                got,
            });
        }
    }
    Ok(mismatches)
}

/// Fails, listing every mismatch, when the full config does not give the fragments what they ask.
fn check_config(fragments: &[Fragment], full: &str) -> Result<()> {
    let mismatches = find_mismatches(fragments, full)?;
    if mismatches.is_empty() {
        return Ok(());
    }
    for m in &mismatches {
        let wanted = match &m.wanted {
            Wanted::Value(v) => format!("={v}"),
            Wanted::Off => " off".to_string(),
        };
        let got = m
            .got
            .as_deref()
            .map_or(" off/absent".to_string(), |v| format!("={v}"));
        eprintln!(
            "xtask: {}: {} wants{wanted}, config has{got} (a dependency is missing or it is forced)",
            m.fragment, m.symbol
        );
    }
    bail!(
        "{} kernel option(s) did not get the value their fragment asks for",
        mismatches.len()
    )
}

/// The installed version of the kernel source package (part of the cache key).
fn source_version() -> Result<String> {
    let version =
        util::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    let version = version.trim();
    if version.is_empty() {
        bail!("{SOURCE_PACKAGE} is not installed");
    }
    Ok(version.to_string())
}

/// The cache key of a kernel: everything that decides its bytes.
fn cache_key(
    full_config: &str,
    fragments: &[Fragment],
    patches: &[Patch],
    source_version: &str,
) -> String {
    let labels: Vec<String> = fragments
        .iter()
        .map(|f| format!("fragment:{}", f.name))
        .collect();
    let patch_labels: Vec<String> = patches
        .iter()
        .map(|p| format!("patch:{}", p.name))
        .collect();
    let mut parts: Vec<(&str, &[u8])> = vec![
        ("recipe", RECIPE_VERSION.as_bytes()),
        ("arch", ARCH.as_bytes()),
        ("source-version", source_version.as_bytes()),
        ("full-config", full_config.as_bytes()),
    ];
    for (label, fragment) in labels.iter().zip(fragments) {
        parts.push((label.as_str(), fragment.text.as_bytes()));
    }
    for (label, patch) in patch_labels.iter().zip(patches) {
        parts.push((label.as_str(), patch.text.as_bytes()));
    }
    util::hash_inputs(parts)
}

/// A package version made safe for a directory name (Debian versions may hold `:` and `~`).
fn path_safe(version: &str) -> String {
    version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The unpacked source tree `name` with `patches` applied, unpacking and patching when it is
/// not there yet. The tree is made in a scratch dir and renamed into place, so a present tree
/// is whole and patched.
fn source_tree(kernel_dir: &Path, name: &str, patches: &[Patch]) -> Result<PathBuf> {
    let src_root = kernel_dir.join("src");
    let tree = src_root.join(name);
    if tree.join("Makefile").is_file() {
        return Ok(tree);
    }
    let scratch = src_root.join(format!("unpack.{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let started = Instant::now();
    util::run(
        Command::new("tar")
            .arg("-C")
            .arg(&scratch)
            .arg("-xf")
            .arg(SOURCE_TARBALL),
    )?;
    let top = scratch.join(SOURCE_TOP_DIR);
    for patch in patches {
        let applied = util::run(
            Command::new("patch")
                .current_dir(&top)
                .args(["-p1", "--batch", "--forward", "--silent", "-i"])
                .arg(&patch.path),
        );
        if let Err(e) = applied {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e).with_context(|| {
                format!(
                    "applying {} to {SOURCE_TARBALL}: does it still match the source version?",
                    patch.path.display()
                )
            });
        }
    }
    if tree.exists() {
        // An incomplete tree (no Makefile) from an older, interrupted layout: replace it.
        std::fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    std::fs::rename(&top, &tree)
        .with_context(|| format!("renaming {} to {}", top.display(), tree.display()))?;
    // Best effort: only an empty scratch dir is left.
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!(
        "xtask: unpacked {SOURCE_TARBALL} ({} patch(es)) in {:.0?}",
        patches.len(),
        started.elapsed()
    );
    Ok(tree)
}

/// Takes the kernel build lock (released when the file is dropped).
fn lock(kernel_dir: &Path) -> Result<File> {
    util::lock_file(&kernel_dir.join("lock"))
}

/// Arguments of every `make` call: source dir, object dir, architecture.
fn make_args(src: &Path, obj: &Path) -> Vec<String> {
    vec![
        "-C".to_string(),
        src.display().to_string(),
        format!("O={}", obj.display()),
        format!("ARCH={ARCH}"),
    ]
}

/// A `make` command in the source tree building into `obj`.
fn make(src: &Path, obj: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.args(make_args(src, obj)).envs(reproducible_env());
    cmd
}

/// Fixed build metadata so the same inputs give the same `uname -v` and image bytes.
fn reproducible_env() -> [(&'static str, &'static str); 3] {
    [
        ("KBUILD_BUILD_USER", "husk"),
        ("KBUILD_BUILD_HOST", "husk"),
        ("KBUILD_BUILD_TIMESTAMP", "1970-01-01"),
    ]
}

/// Shows what olddefconfig changed (best effort, for the error message).
fn print_diff(expected: &Path, actual: &Path) {
    let _ = Command::new("diff")
        .arg("-u")
        .arg(expected)
        .arg(actual)
        .status();
}

/// ELF note name of Xen notes.
const XEN_NOTE_NAME: &[u8] = b"Xen\0";
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical entry point used for PVH boot.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 0x12;
const PT_NOTE: u32 = 4;

/// Finds the PVH entry point (the `XEN_ELFNOTE_PHYS32_ENTRY` note) in a little-endian ELF64
/// image. `Ok(None)` when the image has no such note.
fn pvh_entry(elf: &[u8]) -> Result<Option<u64>> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice())
        || elf.get(4) != Some(&2)
        || elf.get(5) != Some(&1)
    {
        bail!("not a little-endian ELF64 file");
    }
    let phoff = read_u64(elf, 0x20)?;
    let phentsize = u64::from(read_u16(elf, 0x36)?);
    let phnum = u64::from(read_u16(elf, 0x38)?);
    for i in 0..phnum {
        let ph = to_usize(phoff + i * phentsize)?;
        if read_u32(elf, ph)? != PT_NOTE {
            continue;
        }
        let offset = to_usize(read_u64(elf, ph + 0x08)?)?;
        let size = to_usize(read_u64(elf, ph + 0x20)?)?;
        let notes = elf
            .get(offset..offset.checked_add(size).context("note segment overflows")?)
            .context("note segment out of the file")?;
        if let Some(entry) = find_pvh_note(notes)? {
            return Ok(Some(entry));
        }
    }
    Ok(None)
}

/// Walks the notes of one PT_NOTE segment (4-byte aligned name and descriptor).
fn find_pvh_note(notes: &[u8]) -> Result<Option<u64>> {
    let mut pos = 0usize;
    while pos + 12 <= notes.len() {
        let namesz = to_usize(u64::from(read_u32(notes, pos)?))?;
        let descsz = to_usize(u64::from(read_u32(notes, pos + 4)?))?;
        let kind = read_u32(notes, pos + 8)?;
        let name_start = pos + 12;
        let desc_start = name_start + align4(namesz);
        let next = desc_start + align4(descsz);
        let name = notes
            .get(name_start..name_start + namesz)
            .context("note name truncated")?;
        let desc = notes
            .get(desc_start..desc_start + descsz)
            .context("note descriptor truncated")?;
        if name == XEN_NOTE_NAME && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            return match descsz {
                4 => Ok(Some(u64::from(read_u32(desc, 0)?))),
                8 => Ok(Some(read_u64(desc, 0)?)),
                other => bail!("PVH entry note has a {other}-byte descriptor"),
            };
        }
        pos = next;
    }
    Ok(None)
}

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

fn to_usize(n: u64) -> Result<usize> {
    usize::try_from(n).context("ELF offset does not fit in usize")
}

fn read_bytes<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N]> {
    bytes
        .get(at..at.checked_add(N).context("ELF offset overflows")?)
        .and_then(|s| s.try_into().ok())
        .with_context(|| format!("ELF file truncated at offset {at:#x}"))
}

fn read_u16(bytes: &[u8], at: usize) -> Result<u16> {
    read_bytes(bytes, at).map(u16::from_le_bytes)
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32> {
    read_bytes(bytes, at).map(u32::from_le_bytes)
}

fn read_u64(bytes: &[u8], at: usize) -> Result<u64> {
    read_bytes(bytes, at).map(u64::from_le_bytes)
}

/// `kernel-config/` in the workspace.
fn config_dir() -> PathBuf {
    util::workspace_root().join("kernel-config")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(name: &str, text: &str) -> Fragment {
        Fragment {
            name: name.to_string(),
            text: text.to_string(),
        }
    }

    #[test]
    fn parse_line_reads_values_off_lines_and_skips_comments() {
        assert_eq!(
            parse_line("CONFIG_PVH=y"),
            Some(("CONFIG_PVH", Wanted::Value("y".into())))
        );
        assert_eq!(
            parse_line("CONFIG_LOCALVERSION=\"-husk\""),
            Some(("CONFIG_LOCALVERSION", Wanted::Value("\"-husk\"".into())))
        );
        assert_eq!(
            parse_line("# CONFIG_ACPI is not set"),
            Some(("CONFIG_ACPI", Wanted::Off))
        );
        assert_eq!(parse_line("# PVH needs no Xen"), None);
        assert_eq!(parse_line("# x=y is not set"), None);
        assert_eq!(parse_line(""), None);
    }

    #[test]
    fn full_config_satisfying_every_request_has_no_mismatches() {
        let fragments = [
            fragment("a.config", "# why\nCONFIG_A=y\n# CONFIG_B is not set\n"),
            fragment("b.config", "CONFIG_N=64\n# CONFIG_GONE is not set\n"),
        ];
        let full = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=64\nCONFIG_OTHER=y\n";
        assert_eq!(
            find_mismatches(&fragments, full).expect("no conflicts"),
            vec![]
        );
    }

    #[test]
    fn option_dropped_by_kconfig_is_reported_with_its_fragment() {
        let fragments = [fragment(
            "fs.config",
            "CONFIG_VIRTIO_FS=y\n# CONFIG_SCHED_SMT is not set\n",
        )];
        let full = "# CONFIG_VIRTIO_FS is not set\nCONFIG_SCHED_SMT=y\n";
        assert_eq!(
            find_mismatches(&fragments, full).expect("no conflicts"),
            vec![
                Mismatch {
                    symbol: "CONFIG_SCHED_SMT".into(),
                    fragment: "fs.config".into(),
                    wanted: Wanted::Off,
                    got: Some("y".into()),
                },
                Mismatch {
                    symbol: "CONFIG_VIRTIO_FS".into(),
                    fragment: "fs.config".into(),
                    wanted: Wanted::Value("y".into()),
                    got: None,
                },
            ]
        );
        assert!(check_config(&fragments, full).is_err());
    }

    #[test]
    fn fragments_asking_opposite_things_are_rejected() {
        let fragments = [
            fragment("a.config", "CONFIG_X=y\n"),
            fragment("b.config", "# CONFIG_X is not set\n"),
        ];
        let err = wanted_settings(&fragments).expect_err("conflict");
        assert_eq!(
            err.to_string(),
            "CONFIG_X: a.config asks for Value(\"y\") but b.config asks for Off"
        );
    }

    fn patch(name: &str, text: &str) -> Patch {
        Patch {
            name: name.to_string(),
            path: PathBuf::from(name),
            text: text.to_string(),
        }
    }

    #[test]
    fn cache_key_changes_with_each_input() {
        let frags = || vec![fragment("a.config", "CONFIG_A=y\n")];
        let patches = || vec![patch("0001-x.patch", "--- a/x\n+++ b/x\n")];
        let base = cache_key("CONFIG_A=y\n", &frags(), &patches(), "6.1.1-1");
        assert_eq!(
            base,
            cache_key("CONFIG_A=y\n", &frags(), &patches(), "6.1.1-1")
        );
        let others = [
            cache_key("CONFIG_A=n\n", &frags(), &patches(), "6.1.1-1"),
            cache_key(
                "CONFIG_A=y\n",
                &[fragment("a.config", "# a\nCONFIG_A=y\n")],
                &patches(),
                "6.1.1-1",
            ),
            cache_key(
                "CONFIG_A=y\n",
                &[fragment("b.config", "CONFIG_A=y\n")],
                &patches(),
                "6.1.1-1",
            ),
            cache_key("CONFIG_A=y\n", &frags(), &patches(), "6.1.1-2"),
            cache_key("CONFIG_A=y\n", &frags(), &[], "6.1.1-1"),
            cache_key(
                "CONFIG_A=y\n",
                &frags(),
                &[patch("0001-x.patch", "--- a/x\n+++ b/y\n")],
                "6.1.1-1",
            ),
            cache_key(
                "CONFIG_A=y\n",
                &frags(),
                &[patch("0002-x.patch", "--- a/x\n+++ b/x\n")],
                "6.1.1-1",
            ),
        ];
        for other in others {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn tree_name_is_the_version_alone_without_patches_and_differs_per_patch_set() {
        assert_eq!(tree_name("1:6.1.192-3", &[]), "1_6.1.192-3");
        let one = tree_name("6.1.192-3", &[patch("0001-a.patch", "a")]);
        let other = tree_name("6.1.192-3", &[patch("0001-a.patch", "b")]);
        assert!(one.starts_with("6.1.192-3+p"), "{one}");
        assert_eq!(one.len(), "6.1.192-3+p".len() + 16);
        assert_ne!(one, other);
        assert_eq!(one, tree_name("6.1.192-3", &[patch("0001-a.patch", "a")]));
    }

    #[test]
    fn other_trees_of_the_version_are_told_apart() {
        assert!(is_tree_of("6.1.192-3", "6.1.192-3"));
        assert!(is_tree_of("6.1.192-3+p1b4d607dbcf1d8cd", "6.1.192-3"));
        assert!(!is_tree_of("6.1.192-30", "6.1.192-3"));
        assert!(!is_tree_of("6.1.192-3+p1b4d", "6.1.192-3"));
        assert!(!is_tree_of("unpack.123", "6.1.192-3"));
        let root = std::env::temp_dir().join(format!("husk-xtask-trees-{}", std::process::id()));
        for sub in ["src", "obj"] {
            for tree in [
                "6.1.192-3",
                "6.1.192-3+p1b4d607dbcf1d8cd",
                "6.1.192-3+pd9b079625390508a",
                "6.1.200-1",
            ] {
                std::fs::create_dir_all(root.join(sub).join(tree)).expect("mkdir");
            }
        }
        remove_other_trees(&root, "6.1.192-3", "6.1.192-3+pd9b079625390508a");
        for sub in ["src", "obj"] {
            let mut left: Vec<String> = std::fs::read_dir(root.join(sub))
                .expect("list")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            assert_eq!(left, ["6.1.192-3+pd9b079625390508a", "6.1.200-1"]);
        }
        std::fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn the_checked_in_patches_are_read_in_order_with_their_reasons() {
        let patches = read_patches(&config_dir().join("patches")).expect("patches");
        assert!(!patches.is_empty());
        let mut names: Vec<_> = patches.iter().map(|p| p.name.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            patches.iter().map(|p| p.name.clone()).collect::<Vec<_>>()
        );
        for patch in &patches {
            let reason = patch.text.split("\n--- a/").next().unwrap_or_default();
            assert!(
                reason.trim().lines().count() >= 3,
                "{} has no explanation before its diff",
                patch.name
            );
        }
        assert!(read_patches(Path::new("/nonexistent/patches"))
            .expect("a missing dir is no patches")
            .is_empty());
    }

    #[test]
    fn path_safe_replaces_epoch_colon_and_tilde() {
        assert_eq!(path_safe("1:6.1.192-2~bpo"), "1_6.1.192-2_bpo");
        assert_eq!(path_safe("6.1.192-2"), "6.1.192-2");
    }

    /// A minimal ELF64 with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // ELFDATA2LSB
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 0x40;
        elf[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        elf[ph + 0x08..ph + 0x10].copy_from_slice(&(0x78u64).to_le_bytes()); // p_offset
        elf[ph + 0x20..ph + 0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes()); // p_filesz
        elf.extend_from_slice(notes);
        elf
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    #[test]
    fn pvh_entry_is_found_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", 6, b"linux\0"));
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0a40u32.to_le_bytes(),
        ));
        assert_eq!(
            pvh_entry(&elf_with_notes(&notes)).expect("valid ELF"),
            Some(0x0100_0a40)
        );
    }

    #[test]
    fn image_without_pvh_note_has_no_entry() {
        let notes = note(b"Xen\0", 6, b"linux\0");
        assert_eq!(pvh_entry(&elf_with_notes(&notes)).expect("valid ELF"), None);
    }

    #[test]
    fn truncated_or_foreign_files_are_errors() {
        assert!(pvh_entry(b"\x7fELF").is_err());
        assert!(pvh_entry(b"MZ not an elf at all, but long enough to read a header").is_err());
        let mut notes = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4]);
        notes.truncate(notes.len() - 2);
        let mut elf = elf_with_notes(&notes);
        // Claim the segment is longer than the file.
        elf[0x40 + 0x20..0x40 + 0x28].copy_from_slice(&0x1000u64.to_le_bytes());
        assert!(pvh_entry(&elf).is_err());
    }
}
