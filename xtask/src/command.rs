//! Running external programs with errors that name the failing step and the fix.
//! Every subprocess xtask starts goes through here.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// One status line per step, flushed at once so it interleaves correctly with child output.
pub fn status(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[xtask] {}", line.as_ref());
    let _ = out.flush();
}

/// Run `cmd` with inherited stdio; fail with the step name, the command line and `fix`.
pub fn run(step: &str, cmd: &mut Command, fix: &str) -> Result<()> {
    let shown = display(cmd);
    let exit = cmd
        .status()
        .with_context(|| format!("{step}: could not start `{shown}`; {fix}"))?;
    if !exit.success() {
        bail!("{step}: `{shown}` failed ({exit}); {fix}");
    }
    Ok(())
}

/// Run `cmd` and return its stdout; stderr is passed through so failures explain themselves.
pub fn output(step: &str, cmd: &mut Command, fix: &str) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("{step}: could not start `{shown}`; {fix}"))?;
    if !out.status.success() {
        bail!("{step}: `{shown}` failed ({}); {fix}", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("{step}: `{shown}` printed non-UTF-8"))
}

/// Whether `cmd` runs and exits 0, output discarded: for "is it there already?" probes.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The stdout of a probe that may fail; `None` when it does not run or exits non-zero.
pub fn probe_output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `name` resolved through PATH, like `command -v`.
pub fn find_on_path(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    let name = name.as_ref();
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    })
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
