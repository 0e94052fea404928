//! Guest kernel build (being written).
use anyhow::{bail, Result};
use std::path::PathBuf;
pub fn build() -> Result<PathBuf> {
    bail!("kernel build not written yet")
}
