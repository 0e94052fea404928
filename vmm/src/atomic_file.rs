//! Files written whole or not at all: a temporary file beside the target, then `rename(2)`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How many names [`write_atomic`] tries for its temporary file before it gives up.
const MAX_TRIES: u32 = 64;

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a part.
///
/// The temporary file beside `path` is made with `O_EXCL` under a name no other writer holds.
/// A name with the writer's pid would not do: every jailed husk-vmm is pid 1 of its own pid
/// namespace, and VMMs restored from one template write beside each other.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o666)
}

/// [`write_atomic`], the file made with `mode` (less the umask): 0o600 for a file only root
/// may read.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let (tmp, mut file) = create_beside(path, start, mode)?;
    let result = file
        .write_all(bytes)
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A new file `.<name>.tmp.<n>` in `path`'s directory, for the first free `n` from `start`
/// ([`write_atomic`] takes it from the clock: concurrent writers seldom try one name first).
fn create_beside(path: &Path, start: u32, mode: u32) -> io::Result<(PathBuf, File)> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    for n in 0..MAX_TRIES {
        let tmp = dir.join(format!(
            ".{}.tmp.{:08x}",
            name.to_string_lossy(),
            start.wrapping_add(n)
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "no free temporary name beside {} after {MAX_TRIES} tries",
            path.display()
        ),
    ))
}

#[cfg(test)]
// House style allows unwrap in tests: a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["report.json"]);
    }

    #[test]
    fn a_name_another_writer_holds_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("verified");
        let (held, _file) = create_beside(&path, 7, 0o666).unwrap();
        assert_eq!(held, dir.path().join(".verified.tmp.00000007"));
        let (next, _next_file) = create_beside(&path, 7, 0o666).unwrap();
        assert_eq!(next, dir.path().join(".verified.tmp.00000008"));
        for n in 9..7 + MAX_TRIES {
            File::create(dir.path().join(format!(".verified.tmp.{n:08x}"))).unwrap();
        }
        let err = create_beside(&path, 7, 0o666).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(
            err.to_string().contains("no free temporary name beside"),
            "{err}"
        );
    }

    #[test]
    fn a_private_file_is_made_with_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("write-set");
        write_atomic_mode(&path, b"x", 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomic(&dir.path().join("gone/file"), b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
