//! `husk list`: every container under the root.

use crate::commands::ps::Format;
use crate::container::StateDir;
use crate::state::ContainerState;
use crate::Globals;
use anyhow::Result;

/// Options of `husk list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Print only the ids.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[arg(long, short = 'f', value_enum, default_value = "table")]
    pub format: Format,
}

/// The containers under `root`, sorted by id (half-created ones are skipped).
pub fn list_states(root: &std::path::Path) -> Vec<ContainerState> {
    let mut states = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return states;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(dir) = StateDir::new(root, &name) else {
            continue;
        };
        if let Ok(state) = ContainerState::load(&dir) {
            states.push(state);
        }
    }
    states.sort_by(|a, b| a.id.cmp(&b.id));
    states
}

/// `husk list`.
pub fn list(globals: &Globals, args: &ListArgs) -> Result<()> {
    let states = list_states(&globals.root);
    if args.quiet {
        for s in &states {
            crate::outln!("{}", s.id);
        }
        return Ok(());
    }
    match args.format {
        Format::Json => {
            let docs: Vec<_> = states.iter().map(|s| s.oci_state()).collect();
            crate::outln!("{}", serde_json::to_string(&docs)?);
        }
        Format::Table => {
            let rows: Vec<[String; 6]> = states
                .iter()
                .map(|s| {
                    let doc = s.oci_state();
                    [
                        s.id.clone(),
                        doc["pid"].to_string(),
                        s.status.to_string(),
                        s.bundle.display().to_string(),
                        s.created.clone(),
                        "root".to_string(),
                    ]
                })
                .collect();
            let header = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from);
            let mut widths = header.clone().map(|h| h.len());
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.len());
                }
            }
            for row in std::iter::once(&header).chain(rows.iter()) {
                let line: Vec<String> = row
                    .iter()
                    .zip(widths)
                    .map(|(cell, w)| format!("{cell:<w$}"))
                    .collect();
                crate::outln!("{}", line.join("   ").trim_end());
            }
        }
    }
    Ok(())
}
