//! Packages from a Debian suite the host's apt does not track (`bookworm-backports`), fetched
//! with a private apt state under the cache dir: the host's own Debian mirror, checked against
//! the archive keys like any apt download, and nothing of the host's apt configuration changed.

use crate::util::{output, run};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The suite of newer packages built for the rig's and the host's Debian release.
pub const BACKPORTS: &str = "bookworm-backports";

/// An apt state of its own in `dir`, knowing one suite of the host's Debian mirror.
pub struct PrivateApt {
    dir: PathBuf,
    suite: String,
    opts: Vec<String>,
}

impl PrivateApt {
    /// Sets up the state in `dir` (emptied first) and reads the suite's package lists.
    pub fn new(dir: &Path, suite: &str) -> Result<PrivateApt> {
        let mirror = crate::rig::host_debian_mirror()
            .context("the host's apt sources name no Debian mirror")?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "deb",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let sources = dir.join("sources.list");
        std::fs::write(&sources, format!("deb {mirror} {suite} main\n"))?;
        let opts = vec![
            format!("-oDir::State::Lists={}", dir.join("lists").display()),
            format!("-oDir::Etc::SourceList={}", sources.display()),
            format!(
                "-oDir::Etc::SourceParts={}",
                dir.join("sources.list.d").display()
            ),
            format!("-oDir::Cache={}", dir.join("cache").display()),
            // The download lands in a root-owned folder; apt's `_apt` user could not write there.
            "-oAPT::Sandbox::User=root".to_string(),
        ];
        run(Command::new("apt-get").args(&opts).args(["-q", "update"]))?;
        Ok(PrivateApt {
            dir: dir.to_path_buf(),
            suite: suite.to_string(),
            opts,
        })
    }

    /// The packages `package` (in this suite) depends on, as apt names them.
    pub fn depends(&self, package: &str) -> Result<Vec<String>> {
        let text = output(Command::new("apt-cache").args(&self.opts).args([
            "depends",
            "--no-recommends",
            "--no-suggests",
            &format!("{package}/{}", self.suite),
        ]))?;
        Ok(parse_depends(&text))
    }

    /// Downloads `package` from this suite and returns the `.deb`'s path.
    pub fn download(&self, package: &str) -> Result<PathBuf> {
        let deb_dir = self.dir.join("deb").join(package);
        std::fs::create_dir_all(&deb_dir)?;
        run(Command::new("apt-get")
            .current_dir(&deb_dir)
            .args(&self.opts)
            .args(["-q", "download", &format!("{package}/{}", self.suite)]))?;
        only_deb(&deb_dir)
    }
}

/// The `Depends:` names of `apt-cache depends` output.
fn parse_depends(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|d| {
            d.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
        .collect()
}

fn only_deb(dir: &Path) -> Result<PathBuf> {
    let debs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    match debs.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one .deb in {}, found {}",
            dir.display(),
            debs.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_apt_cache_output() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.12.48+deb12-cloud-amd64\n  \
                    Depends: <virtual-thing>\n  Breaks: foo\n";
        assert_eq!(
            parse_depends(text),
            vec!["linux-image-6.12.48+deb12-cloud-amd64", "virtual-thing"]
        );
    }
}
