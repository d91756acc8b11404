//! Privileged tests of pod volumes: memory-backed emptyDirs are tmpfs mounts with the size
//! limit, kept across a second prepare, unmounted by teardown; secrets can live on tmpfs too;
//! teardown deletes nothing while a mount it did not make sits inside the pod's volumes.
//!
//! Root only, one at a time (`cargo xtask test` runs them with `--ignored --test-threads=1`).
//! Everything lives in a fresh temporary directory; a Drop guard lazily unmounts whatever a
//! failed test left mounted below it.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use weir_agent::volumes::{
    IssuedToken, PodVolumes, SourceFuture, TokenRequestFor, VolumeOptions, VolumeSource, mounts,
};

/// A source with one Secret, `creds`, and nothing else.
struct NoObjects;

impl VolumeSource for NoObjects {
    fn config_map<'a>(&'a self, _: &'a str, _: &'a str) -> SourceFuture<'a, Option<ConfigMap>> {
        Box::pin(async { Ok(None) })
    }
    fn secret<'a>(&'a self, _: &'a str, name: &'a str) -> SourceFuture<'a, Option<Secret>> {
        let secret = (name == "creds").then(|| {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "creds"}, "data": {"key": "aHVzaA=="}}))
                .unwrap()
        });
        Box::pin(async move { Ok(secret) })
    }
    fn persistent_volume_claim<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> SourceFuture<'a, Option<PersistentVolumeClaim>> {
        Box::pin(async { Ok(None) })
    }
    fn persistent_volume<'a>(&'a self, _: &'a str) -> SourceFuture<'a, Option<PersistentVolume>> {
        Box::pin(async { Ok(None) })
    }
    fn service_account_token<'a>(&'a self, _: &'a TokenRequestFor) -> SourceFuture<'a, IssuedToken> {
        Box::pin(async { Err("no tokens in this test".to_string()) })
    }
    fn node_allocatable(&self) -> SourceFuture<'_, BTreeMap<String, Quantity>> {
        Box::pin(async { Ok(BTreeMap::new()) })
    }
}

/// A temporary pods directory; on drop, whatever is still mounted below it is detached.
struct PodsDir {
    dir: tempfile::TempDir,
}

impl PodsDir {
    fn new() -> PodsDir {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the volume mount tests need root: run `cargo xtask test` as root"
        );
        PodsDir {
            dir: tempfile::Builder::new()
                .prefix(&format!("weir-volumes-{}-", std::process::id()))
                .tempdir()
                .unwrap(),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn mounts_below(&self) -> Vec<PathBuf> {
        let root = fs::canonicalize(self.path()).unwrap();
        mounts()
            .unwrap()
            .into_iter()
            .filter(|m| m.path.starts_with(&root))
            .map(|m| m.path)
            .collect()
    }
}

impl Drop for PodsDir {
    fn drop(&mut self) {
        let mut left = self.mounts_below();
        left.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for path in left {
            umount(&path, libc::MNT_DETACH);
        }
    }
}

fn umount(path: &Path, flags: i32) -> i32 {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    unsafe { libc::umount2(c.as_ptr(), flags) }
}

fn pod(uid: &str, volumes: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": uid},
        "spec": {"containers": [{"name": "c", "image": "x", "resources": {"limits": {"memory": "16Mi"}}}], "volumes": volumes},
    }))
    .unwrap()
}

fn statvfs_bytes(path: &Path) -> u64 {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs writes into the zeroed struct; the path outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {}", path.display());
    st.f_blocks * st.f_frsize
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn memory_empty_dirs_are_size_limited_tmpfs_mounts_that_teardown_removes() {
    let pods = PodsDir::new();
    let uid = format!("tmpfs-{}", std::process::id());
    let spec = pod(
        &uid,
        serde_json::json!([
            {"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
            {"name": "unbounded", "emptyDir": {"medium": "Memory"}},
            {"name": "disk", "emptyDir": {}},
        ]),
    );
    let volumes = PodVolumes::prepare(&NoObjects, &spec, pods.path()).await.unwrap();
    let cache = fs::canonicalize(volumes.path("cache").unwrap()).unwrap();
    let all = mounts().unwrap();
    let at = |p: &Path| {
        all.iter()
            .filter(|m| m.path == p)
            .map(|m| m.fs_type.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(at(&cache), ["tmpfs"]);
    let unbounded = fs::canonicalize(volumes.path("unbounded").unwrap()).unwrap();
    assert_eq!(at(&unbounded), ["tmpfs"]);
    assert_eq!(
        statvfs_bytes(&unbounded),
        16 << 20,
        "no sizeLimit: the pod's memory limit"
    );
    assert!(at(&fs::canonicalize(volumes.path("disk").unwrap()).unwrap()).is_empty());
    assert_eq!(statvfs_bytes(&cache), 8 << 20);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&cache).unwrap().permissions().mode() & 0o7777, 0o777);

    // The limit holds: 9 MiB do not fit.
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0;
    let err = {
        use std::io::Write;
        let mut f = fs::File::create(cache.join("big")).unwrap();
        loop {
            match f.write_all(&chunk).and_then(|_| f.flush()) {
                Ok(()) if written < 9 => written += 1,
                Ok(()) => break None,
                Err(e) => break Some(e),
            }
        }
    };
    let err = err.expect("9 MiB written into an 8 MiB tmpfs");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    fs::remove_file(cache.join("big")).unwrap();
    fs::write(cache.join("kept"), "across prepares").unwrap();

    // Preparing again (an agent restart) keeps the mount and its contents, mounting nothing twice.
    let again = PodVolumes::prepare(&NoObjects, &spec, pods.path()).await.unwrap();
    assert_eq!(again.volumes(), volumes.volumes());
    let all = mounts().unwrap();
    assert_eq!(all.iter().filter(|m| m.path == cache).count(), 1);
    assert_eq!(fs::read_to_string(cache.join("kept")).unwrap(), "across prepares");

    PodVolumes::teardown(pods.path(), &uid).unwrap();
    assert!(
        pods.mounts_below().is_empty(),
        "teardown unmounts: {:?}",
        pods.mounts_below()
    );
    assert!(!pods.path().join(&uid).exists());
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn teardown_deletes_nothing_while_a_foreign_mount_sits_inside() {
    let pods = PodsDir::new();
    let uid = format!("foreign-{}", std::process::id());
    let spec = pod(&uid, serde_json::json!([{"name": "scratch", "emptyDir": {}}]));
    let volumes = PodVolumes::prepare(&NoObjects, &spec, pods.path()).await.unwrap();
    // Someone's data, bind-mounted into the volume (as a hostPath would be in a container).
    let precious = pods.path().join("precious");
    fs::create_dir(&precious).unwrap();
    fs::write(precious.join("data"), "keep me").unwrap();
    let target = volumes.path("scratch").unwrap().join("bound");
    fs::create_dir(&target).unwrap();
    let (src, dst) = (
        CString::new(precious.as_os_str().as_bytes()).unwrap(),
        CString::new(target.as_os_str().as_bytes()).unwrap(),
    );
    // SAFETY: NUL-terminated paths that outlive the call; a bind mount needs no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "bind mount: {}", std::io::Error::last_os_error());

    let err = PodVolumes::teardown(pods.path(), &uid).unwrap_err().to_string();
    assert!(err.contains("is mounted inside the volumes of pod"), "{err}");
    assert_eq!(fs::read_to_string(precious.join("data")).unwrap(), "keep me");
    assert!(volumes.path("scratch").unwrap().exists(), "nothing removed");

    assert_eq!(umount(&target, 0), 0);
    PodVolumes::teardown(pods.path(), &uid).unwrap();
    assert!(!pods.path().join(&uid).exists());
    assert_eq!(fs::read_to_string(precious.join("data")).unwrap(), "keep me");
}

#[tokio::test]
#[ignore = "needs root: run by `cargo xtask test`"]
async fn secrets_can_live_in_memory() {
    let pods = PodsDir::new();
    let uid = format!("secret-{}", std::process::id());
    let spec = pod(
        &uid,
        serde_json::json!([
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "bundle", "projected": {"sources": [{"secret": {"name": "creds"}}]}},
        ]),
    );
    let options = VolumeOptions {
        secrets_in_memory: true,
    };
    let volumes = PodVolumes::prepare_with(&NoObjects, &spec, pods.path(), &options)
        .await
        .unwrap();
    let all = mounts().unwrap();
    for name in ["creds", "bundle"] {
        let dir = fs::canonicalize(volumes.path(name).unwrap()).unwrap();
        let types: Vec<&str> = all
            .iter()
            .filter(|m| m.path == dir)
            .map(|m| m.fs_type.as_str())
            .collect();
        assert_eq!(types, ["tmpfs"], "{name}");
        assert_eq!(fs::read_to_string(dir.join("key")).unwrap(), "hush");
    }
    // Again: still one mount each, and the data is still there.
    let again = PodVolumes::prepare_with(&NoObjects, &spec, pods.path(), &options)
        .await
        .unwrap();
    assert!(!again.refresh(&NoObjects, &spec).await.unwrap());
    assert_eq!(pods.mounts_below().len(), 2, "{:?}", pods.mounts_below());
    PodVolumes::teardown(pods.path(), &uid).unwrap();
    assert!(pods.mounts_below().is_empty());
    assert!(!pods.path().join(&uid).exists());
}
