//! Initramfs build (being written).
use anyhow::{bail, Result};
use std::path::PathBuf;
pub fn build() -> Result<PathBuf> {
    bail!("initramfs build not written yet")
}
