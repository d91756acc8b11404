//! Pieces the privileged test files share.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

/// Makes `cmd`'s process join the cgroup v2 directory `cgroup` before it runs (its
/// children inherit it), so socket-LB programs attached there see its sockets.
pub fn run_in_cgroup(cmd: &mut Command, cgroup: &Path) {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    // SAFETY: between fork and exec only async-signal-safe calls (open, write, close);
    // "0" moves the writing process itself, so nothing is formatted or allocated.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
}
