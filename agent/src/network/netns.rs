//! Named network namespaces (bind mounts of a namespace file, as `ip netns add` makes
//! them) and netlink connections inside one. Owns only the mounts it is asked to make.
//!
//! Written by hand on libc: rtnetlink's `NetworkNamespace` forks a child process and knows
//! only `/var/run/netns`; here the namespace is made on a short-lived thread (a thread's
//! `unshare` touches only that thread) at any path the caller gives.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use super::{Error, Result};

/// `statfs` magic of nsfs, the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains a NUL byte", path.display())))
}

fn last_os_error(what: String) -> Error {
    Error::Sys {
        what,
        source: io::Error::last_os_error(),
    }
}

/// Whether `path` is a namespace file (a live bind mount of one).
pub(super) fn is_netns_mount(path: &Path) -> Result<bool> {
    let c = cstring(path)?;
    // SAFETY: statfs on a valid NUL-terminated path into a zeroed struct it fills.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointers live across the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut stat) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::NotFound {
            return Ok(false);
        }
        return Err(Error::io("checking the network namespace", path)(e));
    }
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but not everywhere.
    Ok(stat.f_type as i64 == NSFS_MAGIC)
}

/// Makes `dir` a shared mount point, as `ip netns` does with /run/netns, so namespace mounts
/// made in it propagate to other mount namespaces (containers) and an unmount frees the
/// namespace everywhere.
fn make_shared_mount_point(dir: &Path) -> Result<()> {
    let c = cstring(dir)?;
    let none = c"none";
    let empty = c"";
    let mut upgraded = false;
    loop {
        // SAFETY: mount with valid NUL-terminated strings and no data.
        let r = unsafe {
            libc::mount(
                empty.as_ptr(),
                c.as_ptr(),
                none.as_ptr(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) || upgraded {
            return Err(Error::Sys {
                what: format!(
                    "making {} a shared mount (needs root: CAP_SYS_ADMIN in the initial mount namespace)",
                    dir.display()
                ),
                source: e,
            });
        }
        // Not a mount point yet: bind it onto itself, then try again.
        // SAFETY: as above.
        let r = unsafe {
            libc::mount(
                c.as_ptr(),
                c.as_ptr(),
                none.as_ptr(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(last_os_error(format!("bind-mounting {} onto itself", dir.display())));
        }
        upgraded = true;
    }
}

/// Creates the network namespace mounted at `path`; a namespace already mounted there is
/// kept (a retried sandbox finds its own).
pub(super) fn create(path: &Path) -> Result<()> {
    if is_netns_mount(path)? {
        return Ok(());
    }
    let dir = path
        .parent()
        .ok_or_else(|| Error::Invalid(format!("netns path {} has no directory", path.display())))?;
    fs::create_dir_all(dir).map_err(Error::io("creating the netns directory", dir))?;
    make_shared_mount_point(dir)?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(Error::io("creating the netns mount point", path))?;
    let target = cstring(path)?;
    let made = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare on this thread only; the thread ends right after, so no
                // other code runs in the new namespace by mistake.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(last_os_error(
                        "creating a network namespace (needs root: CAP_SYS_ADMIN)".to_owned(),
                    ));
                }
                let source = c"/proc/thread-self/ns/net";
                // SAFETY: bind mount between two valid NUL-terminated paths.
                let r = unsafe {
                    libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        c"none".as_ptr(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                };
                if r != 0 {
                    return Err(last_os_error(format!(
                        "bind-mounting the new network namespace at {}",
                        path.display()
                    )));
                }
                Ok(())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    if made.is_err() {
        let _ = fs::remove_file(path);
    }
    made
}

/// Unmounts and removes the namespace at `path`; nothing there is fine. The namespace itself
/// goes when its last process and socket are gone.
pub(super) fn remove(path: &Path) -> Result<()> {
    let c = cstring(path)?;
    // SAFETY: umount2 on a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (half-created); ENOENT: already gone.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(Error::io("unmounting the network namespace", path)(e));
        }
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("removing the netns mount point", path)(e)),
        _ => Ok(()),
    }
}

/// Opens the namespace file at `path` (to hand its fd to the kernel, e.g. as a veth peer's
/// namespace).
pub(super) fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(Error::io("opening the network namespace", path))
}

/// A netlink connection inside the namespace at `path`, driven by a task on the current
/// tokio runtime. A socket belongs to the namespace its thread is in when it is made, so it
/// is made on a short-lived thread that has entered the namespace.
pub(super) fn netlink_in(path: &Path) -> Result<Netlink> {
    let ns = open(path)?;
    let runtime = tokio_runtime()?;
    let (connection, handle) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this thread only, with a valid namespace fd; the thread
                // ends right after making the socket.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(last_os_error(format!("entering network namespace {}", path.display())));
                }
                let _runtime = runtime.enter();
                let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Sys {
                    what: format!("opening a netlink socket in {}", path.display()),
                    source,
                })?;
                Ok((connection, handle))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    Ok(Netlink {
        handle,
        task: runtime.spawn(connection),
    })
}

/// A netlink connection in this thread's namespace.
pub(super) fn netlink_here() -> Result<Netlink> {
    let runtime = tokio_runtime()?;
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Sys {
        what: "opening a netlink socket".to_owned(),
        source,
    })?;
    Ok(Netlink {
        handle,
        task: runtime.spawn(connection),
    })
}

/// The tokio runtime the netlink sockets are driven by: the caller's.
fn tokio_runtime() -> Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current()
        .map_err(|_| Error::Invalid("the pod network runs on tokio: call it from within a tokio runtime".to_owned()))
}

/// A netlink handle and the task that drives its socket; dropping it closes the socket (a
/// socket left open would keep a pod's namespace alive).
#[derive(Debug)]
pub(super) struct Netlink {
    pub handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
