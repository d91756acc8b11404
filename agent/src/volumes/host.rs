//! The host side of volumes: hostPath type checks, tmpfs mounts for memory-backed emptyDirs,
//! the mount table, and fsGroup ownership. Touches only the paths it is given.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Checks (and for the `...OrCreate` types creates) a hostPath as kubelet's
/// `checkTypeInternal` does; the error is kubelet's message.
pub fn check_host_path(path: &Path, kind: &str, dir_mode: u32) -> Result<(), String> {
    let shown = path.display();
    let meta = fs::metadata(path).ok();
    let is = |f: fn(&fs::FileType) -> bool| meta.as_ref().is_some_and(|m| f(&m.file_type()));
    match kind {
        "" => Ok(()),
        "DirectoryOrCreate" if meta.is_none() => {
            fs::create_dir_all(path).map_err(|e| format!("creating directory {shown}: {e}"))?;
            fs::set_permissions(path, fs::Permissions::from_mode(dir_mode))
                .map_err(|e| format!("chmod {dir_mode:o} {shown}: {e}"))
        }
        "DirectoryOrCreate" | "Directory" if is(fs::FileType::is_dir) => Ok(()),
        "DirectoryOrCreate" | "Directory" => Err(format!("hostPath type check failed: {shown} is not a directory")),
        "FileOrCreate" if meta.is_none() => fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| format!("creating file {shown}: {e} (FileOrCreate does not create parent directories)")),
        "FileOrCreate" | "File" if is(fs::FileType::is_file) => Ok(()),
        "FileOrCreate" | "File" => Err(format!("hostPath type check failed: {shown} is not a file")),
        "Socket" if is(fs::FileType::is_socket) => Ok(()),
        "Socket" => Err(format!("hostPath type check failed: {shown} is not a socket file")),
        "CharDevice" if is(fs::FileType::is_char_device) => Ok(()),
        "CharDevice" => Err(format!("hostPath type check failed: {shown} is not a character device")),
        "BlockDevice" if is(fs::FileType::is_block_device) => Ok(()),
        "BlockDevice" => Err(format!("hostPath type check failed: {shown} is not a block device")),
        other => Err(format!(
            "{other} is an invalid volume type (use \"\", DirectoryOrCreate, Directory, FileOrCreate, File, Socket, CharDevice or BlockDevice)"
        )),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    /// Where it is mounted.
    pub path: PathBuf,
    /// The filesystem type, e.g. `tmpfs`.
    pub fs_type: String,
}

/// The mounts of this mount namespace.
pub fn mounts() -> io::Result<Vec<MountPoint>> {
    Ok(parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo")?))
}

fn parse_mountinfo(text: &str) -> Vec<MountPoint> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            Some(MountPoint {
                path: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: fields.get(separator + 1)?.to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether something is mounted exactly at `path`.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let path = fs::canonicalize(path)?;
    Ok(mounts()?.iter().any(|m| m.path == path))
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Mounts a tmpfs at `path` (kubelet's memory-backed emptyDir, or a secret's volume) with
/// root directory `mode`, `size` bytes at most.
pub fn mount_tmpfs(path: &Path, mode: u32, size: Option<u128>) -> io::Result<()> {
    let target = c_path(path)?;
    let options = match size {
        Some(bytes) => format!("mode={mode:o},size={bytes}"),
        None => format!("mode={mode:o}"),
    };
    let options = CString::new(options).expect("no NUL in numbers");
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmounts whatever is mounted at `path`.
pub fn unmount(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(target.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// kubelet's `SetVolumeOwnership`: every file under `dir` gets group `gid`, group read
/// (and write unless `read_only`) permission, directories also setgid and group execute.
/// Symlinks are re-grouped but never followed. With `on_root_mismatch` (fsGroupChangePolicy
/// OnRootMismatch) nothing is done when the top directory is already right.
pub fn set_volume_ownership(dir: &Path, gid: u32, read_only: bool, on_root_mismatch: bool) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mask = if read_only { 0o440 } else { 0o660 };
    if on_root_mismatch {
        let meta = fs::metadata(dir)?;
        let want = mask | 0o110 | libc::S_ISGID;
        if meta.gid() == gid && meta.mode() & want == want {
            return Ok(());
        }
    }
    walk(dir, &mut |path, meta| {
        std::os::unix::fs::lchown(path, None, Some(gid))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mut mode = meta.permissions().mode() | mask;
        if meta.is_dir() {
            mode |= libc::S_ISGID | 0o110;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    })
}

fn walk(path: &Path, visit: &mut dyn FnMut(&Path, &fs::Metadata) -> io::Result<()>) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    visit(path, &meta)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            walk(&entry?.path(), visit)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_path_types_are_checked_as_kubelet_does() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        check_host_path(&d, "DirectoryOrCreate", 0o755).unwrap();
        assert!(d.is_dir());
        check_host_path(&d, "Directory", 0o755).unwrap();
        let f = dir.path().join("f");
        check_host_path(&f, "FileOrCreate", 0o755).unwrap();
        assert!(f.is_file());
        check_host_path(&f, "File", 0o755).unwrap();
        let err = check_host_path(&f, "Directory", 0o755).unwrap_err();
        assert_eq!(
            err,
            format!("hostPath type check failed: {} is not a directory", f.display())
        );
        let err = check_host_path(&d, "File", 0o755).unwrap_err();
        assert!(err.ends_with("is not a file"), "{err}");
        assert!(
            check_host_path(&f, "Socket", 0o755)
                .unwrap_err()
                .ends_with("is not a socket file")
        );
        assert!(
            check_host_path(&f, "BlockDevice", 0o755)
                .unwrap_err()
                .ends_with("is not a block device")
        );
        check_host_path(Path::new("/dev/null"), "CharDevice", 0o755).unwrap();
        assert!(
            check_host_path(&f, "CharDevice", 0o755)
                .unwrap_err()
                .ends_with("is not a character device")
        );
        let missing = dir.path().join("missing");
        assert!(check_host_path(&missing, "Directory", 0o755).is_err());
        assert!(!missing.exists());
        check_host_path(&missing, "", 0o755).unwrap();
        assert!(
            check_host_path(&d, "Weird", 0o755)
                .unwrap_err()
                .contains("is an invalid volume type")
        );
        let sock = dir.path().join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        check_host_path(&sock, "Socket", 0o755).unwrap();
    }

    #[test]
    fn mountinfo_lines_give_paths_and_types() {
        let text = "22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw\n\
                    99 22 0:50 / /var/lib/weir/pods/with\\040space rw - tmpfs tmpfs rw,size=1024k\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts[0].path, Path::new("/proc"));
        assert_eq!(mounts[1].path, Path::new("/var/lib/weir/pods/with space"));
        assert_eq!(mounts[1].fs_type, "tmpfs");
    }
}
