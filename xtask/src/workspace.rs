//! Where things live: the workspace root, cargo's target dir and the tool cache under it.
//! Everything xtask downloads goes under `target/tools/`, never into the source tree.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::command;

pub struct Workspace {
    pub root: PathBuf,
    pub target: PathBuf,
}

impl Workspace {
    /// The workspace this xtask binary was built from; the target dir as cargo sees it
    /// (honours `CARGO_TARGET_DIR` and cargo config).
    pub fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest dir has no parent")?
            .to_path_buf();
        let metadata = command::output(
            "locate target dir",
            Command::new(cargo())
                .args(["metadata", "--no-deps", "--format-version", "1"])
                .current_dir(&root),
            "check that `cargo metadata` works in the workspace",
        )?;
        let metadata: serde_json::Value = serde_json::from_str(&metadata).context("parsing `cargo metadata` output")?;
        let target = metadata["target_directory"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        Ok(Workspace { root, target })
    }

    /// Downloaded binaries and wheels (`target/tools/`).
    pub fn tools(&self) -> PathBuf {
        self.target.join("tools")
    }

    pub fn kubectl(&self) -> PathBuf {
        self.tools().join("kubectl")
    }

    pub fn helm(&self) -> PathBuf {
        self.tools().join("helm")
    }

    /// The Python of the tools venv, with the Kubernetes client installed.
    pub fn python(&self) -> PathBuf {
        self.tools().join("python/bin/python3")
    }

    /// A `cargo` command run from the workspace root.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new(cargo());
        cmd.current_dir(&self.root);
        cmd
    }
}

/// The cargo that runs us (`cargo xtask` sets `CARGO`), else the one on PATH.
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}
