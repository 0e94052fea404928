//! `husk template build|clear`: pre-warm or drop the templates sandboxes start from (see
//! [`crate::template`]).

use crate::config::HuskConfig;
use crate::sizing::VmSize;
use crate::template::Templates;
use crate::Globals;
use anyhow::Result;

/// `husk template` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TemplateCmd {
    /// Build the template for sandboxes of this size now (the first sandbox of the size would
    /// otherwise build it), and print its directory.
    Build {
        /// vCPUs (default: config.toml's default_vcpus).
        #[arg(long)]
        cpus: Option<u8>,
        /// Memory in MiB (default: config.toml's default_mem_mib).
        #[arg(long)]
        mem_mib: Option<u32>,
        /// The template of sandboxes with network cards (pods, podman's networks): `--net` for
        /// one card, `--net N` for N (at most 4).
        #[arg(
            long,
            num_args = 0..=1,
            default_value_t = 0,
            default_missing_value = "1",
            value_parser = clap::value_parser!(u8).range(0..=crate::network::MAX_CARDS as i64)
        )]
        net: u8,
    },
    /// Remove every template (sandboxes rebuild them as they need them).
    Clear,
}

/// `husk template ...`.
pub fn template(globals: &Globals, cmd: &TemplateCmd) -> Result<()> {
    let mut cfg = HuskConfig::load()?;
    // As `create` does: `husk --debug` sandboxes have templates of their own (with the console).
    cfg.debug |= globals.debug;
    let templates = Templates::new(&cfg);
    match cmd {
        TemplateCmd::Build { cpus, mem_mib, net } => {
            let size = VmSize {
                vcpus: cpus.unwrap_or(cfg.default_vcpus),
                mem_mib: mem_mib.unwrap_or(cfg.default_mem_mib),
            };
            let kernel = cfg.kernel_path()?;
            let initramfs = cfg.initramfs_path()?;
            let dir = templates.dir_for(&cfg, &kernel, &initramfs, size, *net)?;
            templates.ensure(&cfg, &kernel, &initramfs, size, *net, &dir)?;
            crate::outln!("{}", dir.display());
        }
        TemplateCmd::Clear => {
            let removed = templates.clear()?;
            crate::outln!("removed {removed} template(s)");
        }
    }
    Ok(())
}
