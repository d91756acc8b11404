//! kubelet's AtomicWriter: the files of a configMap, secret, downwardAPI or projected volume
//! are written into a fresh timestamped directory, `..data` is switched to it with one
//! rename, and the names a container sees are symlinks into `..data`. A reader sees either
//! the old set of files or the new one, never a mix.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicU64, Ordering};

/// The symlink to the current timestamped directory.
pub const DATA_DIR: &str = "..data";
const DATA_DIR_TMP: &str = "..data_tmp";

/// One file of a volume: its contents and permission bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProjection {
    /// The contents.
    pub data: Vec<u8>,
    /// Permission bits, e.g. 0o644.
    pub mode: u32,
    /// The owner to give the file (kubelet's FsUser, for service account tokens); None:
    /// the agent's.
    pub owner: Option<u32>,
}

/// A volume's files by path relative to the volume (`key`, `dir/key`).
pub type Payload = BTreeMap<String, FileProjection>;

/// Why a path of a payload is refused (kubelet's `validatePath`); None when it is fine.
pub fn invalid_path(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("must not be empty");
    }
    if path.len() > 4096 {
        return Some("must be less than or equal to 4096 characters");
    }
    if Path::new(path).is_absolute() {
        return Some("must be relative path");
    }
    if path.split('/').any(|c| c == "..") {
        return Some("must not contain '..'");
    }
    if path.starts_with("..") {
        return Some("must not start with '..'");
    }
    None
}

/// Writes `payload` into `target` atomically; returns whether anything changed. `target`
/// is created if missing.
pub fn write(target: &Path, payload: &Payload) -> io::Result<bool> {
    for path in payload.keys() {
        if let Some(why) = invalid_path(path) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid path {path:?}: {why}"),
            ));
        }
    }
    fs::create_dir_all(target)?;
    let data_link = target.join(DATA_DIR);
    let old = fs::read_link(&data_link).ok();
    let top_level: BTreeSet<&str> = payload
        .keys()
        .map(|p| p.split('/').find(|c| !c.is_empty()).unwrap_or(p))
        .collect();
    if let Some(old) = &old
        && same_contents(&target.join(old), payload)?
        && top_level
            .iter()
            .all(|name| target.join(name).symlink_metadata().is_ok())
    {
        return Ok(false);
    }

    let ts_name = new_timestamped_dir(target)?;
    let ts_dir = target.join(&ts_name);
    let written = (|| {
        for (path, file) in payload {
            let full = ts_dir.join(path);
            if let Some(parent) = full.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(&full, &file.data)?;
            if let Some(uid) = file.owner {
                std::os::unix::fs::chown(&full, Some(uid), None)?;
            }
            fs::set_permissions(&full, fs::Permissions::from_mode(file.mode & 0o7777))?;
        }
        let tmp = target.join(DATA_DIR_TMP);
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        symlink(&ts_name, &tmp)?;
        // The one step a reader can observe: the old and the new directory swap at once.
        fs::rename(&tmp, &data_link)
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&ts_dir);
        return Err(e);
    }

    for name in &top_level {
        let visible = target.join(name);
        if visible.symlink_metadata().is_err() {
            symlink(Path::new(DATA_DIR).join(name), &visible)?;
        }
    }
    for entry in fs::read_dir(target)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("..") && !top_level.contains(name.as_ref()) && entry.file_type()?.is_symlink() {
            fs::remove_file(entry.path())?;
        }
    }
    if let Some(old) = old
        && old.components().all(|c| matches!(c, Component::Normal(_)))
    {
        fs::remove_dir_all(target.join(old)).or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => Ok(()),
            _ => Err(e),
        })?;
    }
    Ok(true)
}

/// `..2026_11_27_12_00_00.<n>`, created with mode 0755 (kubelet's `os.MkdirTemp` name).
fn new_timestamped_dir(target: &Path) -> io::Result<String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let stamp = jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S");
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("..{stamp}.{}{n}", std::process::id());
        match fs::create_dir(target.join(&name)) {
            Ok(()) => {
                fs::set_permissions(target.join(&name), fs::Permissions::from_mode(0o755))?;
                return Ok(name);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether `dir` holds exactly the files of `payload`, with the same contents and modes.
fn same_contents(dir: &Path, payload: &Payload) -> io::Result<bool> {
    let mut found = 0;
    if !count_files(dir, &mut found)? || found != payload.len() {
        return Ok(false);
    }
    for (path, file) in payload {
        let full = dir.join(path);
        let Ok(meta) = full.symlink_metadata() else {
            return Ok(false);
        };
        if !meta.is_file()
            || meta.permissions().mode() & 0o7777 != file.mode & 0o7777
            || file.owner.is_some_and(|uid| meta.uid() != uid)
            || fs::read(&full)? != file.data
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Counts the regular files under `dir`; false if it is missing or holds anything else.
fn count_files(dir: &Path, found: &mut usize) -> io::Result<bool> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            if !count_files(&entry.path(), found)? {
                return Ok(false);
            }
        } else if kind.is_file() {
            *found += 1;
        } else {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data: &str, mode: u32) -> FileProjection {
        FileProjection {
            data: data.as_bytes().to_vec(),
            mode,
            owner: None,
        }
    }

    #[test]
    fn updates_swap_the_data_link_and_keep_visible_names_as_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vol");
        let first = Payload::from([
            ("a".to_string(), file("one", 0o644)),
            ("sub/b".to_string(), file("two", 0o600)),
        ]);
        assert!(write(&target, &first).unwrap());
        assert_eq!(fs::read_to_string(target.join("a")).unwrap(), "one");
        assert_eq!(fs::read_to_string(target.join("sub/b")).unwrap(), "two");
        assert_eq!(fs::read_link(target.join("a")).unwrap(), Path::new("..data/a"));
        assert_eq!(fs::read_link(target.join("sub")).unwrap(), Path::new("..data/sub"));
        let old = fs::read_link(target.join(DATA_DIR)).unwrap();
        assert!(old.to_string_lossy().starts_with(".."), "{old:?}");
        let mode = fs::metadata(target.join("sub/b")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);

        // The same payload again changes nothing.
        assert!(!write(&target, &first).unwrap());
        assert_eq!(fs::read_link(target.join(DATA_DIR)).unwrap(), old);

        // An open file handle of the old version keeps reading the old contents; the
        // visible name reads the new ones; a dropped key disappears; the old directory goes.
        let second = Payload::from([("a".to_string(), file("uno", 0o644))]);
        assert!(write(&target, &second).unwrap());
        assert_eq!(fs::read_to_string(target.join("a")).unwrap(), "uno");
        assert!(target.join("sub").symlink_metadata().is_err());
        assert!(!target.join(&old).exists());
        assert_ne!(fs::read_link(target.join(DATA_DIR)).unwrap(), old);
        let names: BTreeSet<String> = fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}"); // a, ..data, one timestamped dir

        // A mode change alone is a change.
        let third = Payload::from([("a".to_string(), file("uno", 0o400))]);
        assert!(write(&target, &third).unwrap());
    }

    #[test]
    fn paths_that_leave_the_volume_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x", "/etc/passwd", "a/../../x", "..hidden", ""] {
            let payload = Payload::from([(bad.to_string(), file("x", 0o644))]);
            let err = write(dir.path(), &payload).unwrap_err();
            assert!(err.to_string().contains("invalid path"), "{bad}: {err}");
        }
    }
}
