//! runc commands husk does not support: they fail with a clear message.

use anyhow::{bail, Result};

/// Arguments of an unsupported command (taken whole, so that any runc flags parse).
#[derive(Debug, clap::Args)]
pub struct UnsupportedArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Fails for `command`.
pub fn unsupported(command: &str) -> Result<()> {
    bail!(
        "husk does not support `{command}`: a container's state lives in its microVM, \
         and checkpoint/restore of microVMs is not implemented"
    )
}
