//! PodVolumes against a fake VolumeSource in a temporary directory.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::{ConfigMap, Container, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::json;

use super::*;

#[derive(Default)]
struct FakeSource {
    config_maps: Mutex<HashMap<String, ConfigMap>>,
    secrets: Mutex<HashMap<String, Secret>>,
    claims: Mutex<HashMap<String, PersistentVolumeClaim>>,
    volumes: Mutex<HashMap<String, PersistentVolume>>,
    tokens_issued: AtomicUsize,
    /// Seconds a token lives; short ones are renewed on every refresh.
    token_life: Mutex<i64>,
    requests: Mutex<Vec<TokenRequestFor>>,
}

fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

impl FakeSource {
    fn new() -> FakeSource {
        let source = FakeSource::default();
        *source.token_life.lock().unwrap() = 3600;
        source
    }
    fn put_config_map(&self, name: &str, data: serde_json::Value) {
        let cm: ConfigMap = from(json!({"metadata": {"name": name, "namespace": "ns"}, "data": data}));
        self.config_maps.lock().unwrap().insert(name.into(), cm);
    }
    fn put_secret(&self, name: &str, data: serde_json::Value) {
        let s: Secret = from(json!({"metadata": {"name": name, "namespace": "ns"}, "data": data}));
        self.secrets.lock().unwrap().insert(name.into(), s);
    }
}

impl VolumeSource for FakeSource {
    fn config_map<'a>(&'a self, namespace: &'a str, name: &'a str) -> SourceFuture<'a, Option<ConfigMap>> {
        assert_eq!(namespace, "ns");
        let found = self.config_maps.lock().unwrap().get(name).cloned();
        Box::pin(async move { Ok(found) })
    }
    fn secret<'a>(&'a self, namespace: &'a str, name: &'a str) -> SourceFuture<'a, Option<Secret>> {
        assert_eq!(namespace, "ns");
        let found = self.secrets.lock().unwrap().get(name).cloned();
        Box::pin(async move { Ok(found) })
    }
    fn persistent_volume_claim<'a>(
        &'a self,
        _namespace: &'a str,
        name: &'a str,
    ) -> SourceFuture<'a, Option<PersistentVolumeClaim>> {
        let found = self.claims.lock().unwrap().get(name).cloned();
        Box::pin(async move { Ok(found) })
    }
    fn persistent_volume<'a>(&'a self, name: &'a str) -> SourceFuture<'a, Option<PersistentVolume>> {
        let found = self.volumes.lock().unwrap().get(name).cloned();
        Box::pin(async move { Ok(found) })
    }
    fn service_account_token<'a>(&'a self, request: &'a TokenRequestFor) -> SourceFuture<'a, IssuedToken> {
        let n = self.tokens_issued.fetch_add(1, Ordering::SeqCst);
        self.requests.lock().unwrap().push(request.clone());
        let life = *self.token_life.lock().unwrap();
        Box::pin(async move {
            Ok(IssuedToken {
                token: format!("token-{n}"),
                expiration: jiff::Timestamp::now() + jiff::SignedDuration::from_secs(life),
            })
        })
    }
    fn node_allocatable(&self) -> SourceFuture<'_, BTreeMap<String, Quantity>> {
        Box::pin(async { Ok(BTreeMap::from([("memory".to_string(), Quantity("2Gi".into()))])) })
    }
}

fn pod(volumes: serde_json::Value) -> Pod {
    from(json!({
        "metadata": {"name": "web", "namespace": "ns", "uid": "uid-1", "labels": {"app": "web", "tier": "front"}},
        "spec": {
            "serviceAccountName": "builder",
            "containers": [{"name": "app", "image": "x", "resources": {"limits": {"cpu": "500m"}}}],
            "volumes": volumes,
        }
    }))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn container(mounts: serde_json::Value) -> Container {
    from(json!({"name": "app", "image": "x", "volumeMounts": mounts}))
}

#[tokio::test]
async fn every_volume_type_lands_where_kubelet_puts_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pods = tmp.path().join("pods");
    let host = tmp.path().join("host");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("keep"), "mine").unwrap();
    let storage = tmp.path().join("storage/pvc-1_ns_data");
    let source = FakeSource::new();
    source.put_config_map("conf", json!({"a.conf": "A", "b.conf": "B"}));
    source.put_secret("creds", json!({"user": "YWRtaW4=", "pass": "czNjcjN0"}));
    source.claims.lock().unwrap().insert(
        "data".into(),
        from(json!({"metadata": {"name": "data", "namespace": "ns", "uid": "c1"},
                    "spec": {"volumeName": "pvc-1"}, "status": {"phase": "Bound"}})),
    );
    source.volumes.lock().unwrap().insert(
        "pvc-1".into(),
        from(json!({"metadata": {"name": "pvc-1"},
                    "spec": {"hostPath": {"path": storage, "type": "DirectoryOrCreate"},
                             "claimRef": {"name": "data", "namespace": "ns", "uid": "c1"}}})),
    );
    let pod = pod(json!([
        {"name": "scratch", "emptyDir": {}},
        {"name": "host", "hostPath": {"path": host, "type": "Directory"}},
        {"name": "conf", "configMap": {"name": "conf", "items": [{"key": "a.conf", "path": "dir/a", "mode": 0o600}]}},
        {"name": "creds", "secret": {"secretName": "creds"}},
        {"name": "info", "downwardAPI": {"defaultMode": 0o444, "items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
            {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}},
            {"path": "cpu", "resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "1m"}},
            {"path": "mem", "resourceFieldRef": {"containerName": "app", "resource": "limits.memory", "divisor": "1Mi"}},
        ]}},
        {"name": "kube-api-access", "projected": {"defaultMode": 0o640, "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "conf", "items": [{"key": "b.conf", "path": "ca.crt"}]}},
            {"secret": {"name": "creds", "items": [{"key": "user", "path": "user"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        ]}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
    ]));
    let volumes = PodVolumes::prepare(&source, &pod, &pods).await.unwrap();
    let root = pods.join("uid-1/volumes");

    let scratch = root.join("kubernetes.io~empty-dir/scratch");
    assert_eq!(volumes.path("scratch"), Some(scratch.as_path()));
    assert_eq!(mode(&scratch), 0o777);
    assert_eq!(volumes.path("host"), Some(host.as_path()));

    let conf = root.join("kubernetes.io~configmap/conf");
    assert_eq!(read(&conf.join("dir/a")), "A");
    assert_eq!(mode(&conf.join("dir/a")), 0o600);
    assert!(!conf.join("b.conf").exists(), "only the listed items");

    let creds = root.join("kubernetes.io~secret/creds");
    assert_eq!(read(&creds.join("user")), "admin");
    assert_eq!(read(&creds.join("pass")), "s3cr3t");
    assert_eq!(mode(&creds.join("pass")), 0o644);

    let info = root.join("kubernetes.io~downward-api/info");
    assert_eq!(read(&info.join("labels")), "app=\"web\"\ntier=\"front\"");
    assert_eq!(read(&info.join("name")), "web");
    assert_eq!(read(&info.join("app")), "web");
    assert_eq!(read(&info.join("cpu")), "500");
    assert_eq!(
        read(&info.join("mem")),
        "2048",
        "no memory limit: the node's allocatable"
    );
    assert_eq!(mode(&info.join("name")), 0o444);

    let projected = root.join("kubernetes.io~projected/kube-api-access");
    assert_eq!(read(&projected.join("token")), "token-0");
    assert_eq!(read(&projected.join("ca.crt")), "B");
    assert_eq!(read(&projected.join("user")), "admin");
    assert_eq!(read(&projected.join("namespace")), "ns");
    assert_eq!(mode(&projected.join("token")), 0o640);
    let requests = source.requests.lock().unwrap().clone();
    assert_eq!(
        requests,
        vec![TokenRequestFor {
            namespace: "ns".into(),
            service_account: "builder".into(),
            audience: None,
            expiration_seconds: 3607,
            pod_name: "web".into(),
            pod_uid: "uid-1".into(),
        }]
    );

    assert_eq!(volumes.path("data"), Some(storage.as_path()));
    assert!(storage.is_dir());
    assert_eq!(mode(&storage), 0o777, "created like local-path-provisioner does");
    fs::write(storage.join("db"), "rows").unwrap();

    // The same pod again (an agent restart) reuses everything; nothing changes.
    let again = PodVolumes::prepare(&source, &pod, &pods).await.unwrap();
    assert_eq!(again.volumes(), volumes.volumes());
    assert!(!again.refresh(&source, &pod).await.unwrap());

    PodVolumes::teardown(&pods, "uid-1").unwrap();
    assert!(!pods.join("uid-1").exists());
    assert_eq!(read(&host.join("keep")), "mine", "hostPath contents stay");
    assert_eq!(read(&storage.join("db")), "rows", "PersistentVolume contents stay");
    // Tearing down twice is fine.
    PodVolumes::teardown(&pods, "uid-1").unwrap();
}

#[tokio::test]
async fn updates_reach_running_containers_through_the_symlinks_but_not_sub_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let source = FakeSource::new();
    source.put_config_map("conf", json!({"app.conf": "v1", "old": "x"}));
    let mut pod = pod(json!([
        {"name": "conf", "configMap": {"name": "conf"}},
        {"name": "labels", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
    ]));
    let volumes = PodVolumes::prepare(&source, &pod, tmp.path()).await.unwrap();
    let dir = volumes.path("conf").unwrap().to_path_buf();
    let c = container(json!([
        {"name": "conf", "mountPath": "/etc/app"},
        {"name": "conf", "mountPath": "/etc/app.conf", "subPath": "app.conf"},
    ]));
    let mounts = volumes.mounts_for(&c, &[]).unwrap();
    assert_eq!(mounts[0].source, dir);
    assert!(mounts[0].readonly, "configMap volumes are mounted read-only");
    let pinned = mounts[1].source.clone();
    assert!(
        pinned
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("..2"),
        "a subPath mount binds the file of the current version: {}",
        pinned.display()
    );
    // What a container holding the file open keeps reading.
    let held = fs::File::open(dir.join("app.conf")).unwrap();

    source.put_config_map("conf", json!({"app.conf": "v2", "new": "y"}));
    pod.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("tier".into(), "back".into());
    assert!(volumes.refresh(&source, &pod).await.unwrap());
    assert_eq!(read(&dir.join("app.conf")), "v2");
    assert_eq!(read(&dir.join("new")), "y");
    assert!(!dir.join("old").exists(), "a dropped key disappears");
    assert_eq!(
        fs::read_link(dir.join("app.conf")).unwrap(),
        Path::new("..data/app.conf")
    );
    assert_eq!(
        read(&volumes.path("labels").unwrap().join("labels")),
        "app=\"web\"\ntier=\"back\""
    );
    assert_eq!(std::io::read_to_string(held).unwrap(), "v1");
    assert!(
        !pinned.exists(),
        "the old version is gone from the host; its bind mount keeps it"
    );
    assert!(!volumes.refresh(&source, &pod).await.unwrap(), "nothing new");
}

#[tokio::test]
async fn mounts_resolve_read_only_sub_paths_and_expressions() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let source = FakeSource::new();
    let pod = pod(json!([{"name": "data", "emptyDir": {}}, {"name": "logs", "emptyDir": {}}]));
    let volumes = PodVolumes::prepare(&source, &pod, tmp.path()).await.unwrap();
    let data = volumes.path("data").unwrap().to_path_buf();
    std::os::unix::fs::symlink(&outside, data.join("escape")).unwrap();
    fs::create_dir(data.join("real")).unwrap();
    std::os::unix::fs::symlink("real", data.join("inside")).unwrap();

    let c = container(json!([
        {"name": "data", "mountPath": "/data", "readOnly": true},
        {"name": "data", "mountPath": "/cache", "subPath": "cache/x"},
        {"name": "logs", "mountPath": "/logs", "subPathExpr": "$(POD_NAME)/$(MISSING)/$$(LITERAL)"},
        {"name": "data", "mountPath": "/in", "subPath": "inside"},
    ]));
    let env = vec![("POD_NAME".to_string(), "web-0".to_string())];
    let mounts = volumes.mounts_for(&c, &env).unwrap();
    assert_eq!(mounts[0].source, data);
    assert_eq!(mounts[0].destination, "/data");
    assert!(mounts[0].readonly);
    assert_eq!(mounts[1].source, fs::canonicalize(&data).unwrap().join("cache/x"));
    assert!(!mounts[1].readonly);
    assert!(data.join("cache/x").is_dir(), "a missing subPath is created");
    assert_eq!(mode(&data.join("cache/x")), 0o777, "with the volume's mode");
    let logs = fs::canonicalize(volumes.path("logs").unwrap()).unwrap();
    assert_eq!(mounts[2].source, logs.join("web-0/$(MISSING)/$(LITERAL)"));
    assert_eq!(mounts[3].source, fs::canonicalize(&data).unwrap().join("real"));

    let error = |mounts: serde_json::Value| volumes.mounts_for(&container(mounts), &env).unwrap_err().to_string();
    assert_eq!(
        error(json!([{"name": "nope", "mountPath": "/x"}])),
        "cannot find volume \"nope\" to mount into container \"app\""
    );
    let e = error(json!([{"name": "data", "mountPath": "/x", "subPath": "/etc"}]));
    assert!(
        e.contains("must not be an absolute path") && e.contains("volumeMount \"data\""),
        "{e}"
    );
    let e = error(json!([{"name": "data", "mountPath": "/x", "subPath": "a/../../b"}]));
    assert!(e.contains("must not contain '..'"), "{e}");
    let env_up = vec![("UP".to_string(), "../..".to_string())];
    let e = volumes
        .mounts_for(
            &container(json!([{"name": "data", "mountPath": "/x", "subPathExpr": "$(UP)"}])),
            &env_up,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("must not contain '..'"), "{e}");
    let e = error(json!([{"name": "data", "mountPath": "/x", "subPath": "escape/new"}]));
    assert!(e.contains("not within volume path"), "{e}");
    assert!(!outside.join("new").exists(), "nothing created outside the volume");
}

#[tokio::test]
async fn optional_objects_and_keys_may_be_missing_required_ones_may_not() {
    let tmp = tempfile::tempdir().unwrap();
    let source = FakeSource::new();
    source.put_config_map("conf", json!({"a": "1"}));
    let optional = pod(json!([
        {"name": "gone", "configMap": {"name": "missing", "optional": true}},
        {"name": "partial", "configMap": {"name": "conf", "optional": true, "items": [{"key": "a", "path": "a"}, {"key": "b", "path": "b"}]}},
        {"name": "nosecret", "secret": {"secretName": "missing", "optional": true}},
    ]));
    let volumes = PodVolumes::prepare(&source, &optional, tmp.path()).await.unwrap();
    let gone = volumes.path("gone").unwrap();
    assert!(gone.join(DATA_DIR).exists());
    assert_eq!(fs::read_dir(gone).unwrap().count(), 2, "..data and its directory only");
    assert_eq!(read(&volumes.path("partial").unwrap().join("a")), "1");
    assert!(!volumes.path("partial").unwrap().join("b").exists());

    // Created later, an optional object shows up on refresh.
    source.put_config_map("missing", json!({"late": "yes"}));
    assert!(volumes.refresh(&source, &optional).await.unwrap());
    assert_eq!(read(&gone.join("late")), "yes");

    let cases = [
        (
            json!({"name": "v", "configMap": {"name": "absent"}}),
            "configmap \"absent\" not found in namespace \"ns\"",
        ),
        (
            json!({"name": "v", "configMap": {"name": "conf", "items": [{"key": "b", "path": "b"}]}}),
            "configmap references non-existent config key: b",
        ),
        (
            json!({"name": "v", "secret": {"secretName": "absent"}}),
            "secret \"absent\" not found",
        ),
        (
            json!({"name": "v", "downwardAPI": {"items": [{"path": "ip", "fieldRef": {"fieldPath": "status.podIP"}}]}}),
            "unsupported fieldPath \"status.podIP\"",
        ),
        (
            json!({"name": "v", "persistentVolumeClaim": {"claimName": "absent"}}),
            "persistentvolumeclaim \"absent\" not found",
        ),
        (
            json!({"name": "v", "emptyDir": {"medium": "HugePages"}}),
            "emptyDir medium \"HugePages\"",
        ),
        (
            json!({"name": "v", "hostPath": {"path": "/definitely/not/here", "type": "Directory"}}),
            "is not a directory",
        ),
        (
            json!({"name": "v", "configMap": {"name": "conf", "items": [{"key": "a", "path": "../a"}]}}),
            "must not contain '..'",
        ),
    ];
    for (volume, expected) in cases {
        let err = PodVolumes::prepare(&source, &pod(json!([volume])), tmp.path())
            .await
            .expect_err("an error");
        let text = err.to_string();
        assert!(
            text.starts_with("MountVolume.SetUp failed for volume \"v\" : "),
            "{text}"
        );
        assert!(text.contains(expected), "{text} should contain {expected}");
    }
}

#[tokio::test]
async fn claims_must_be_bound_and_volumes_of_other_types_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let source = FakeSource::new();
    source.claims.lock().unwrap().insert(
        "pending".into(),
        from(json!({"metadata": {"name": "pending", "namespace": "ns"}, "status": {"phase": "Pending"}})),
    );
    source.claims.lock().unwrap().insert(
        "nfs".into(),
        from(json!({"metadata": {"name": "nfs", "namespace": "ns"}, "spec": {"volumeName": "pv-nfs"}, "status": {"phase": "Bound"}})),
    );
    source.volumes.lock().unwrap().insert(
        "pv-nfs".into(),
        from(json!({"metadata": {"name": "pv-nfs"}, "spec": {"nfs": {"server": "s", "path": "/x"}, "claimRef": {"name": "nfs", "namespace": "ns"}}})),
    );
    source.claims.lock().unwrap().insert(
        "lost".into(),
        from(json!({"metadata": {"name": "lost", "namespace": "ns"}, "spec": {"volumeName": "pv-gone"}, "status": {"phase": "Bound"}})),
    );
    let err = |volume: serde_json::Value| {
        let source = &source;
        let dir = tmp.path().to_path_buf();
        async move {
            PodVolumes::prepare(source, &pod(json!([volume])), &dir)
                .await
                .expect_err("an error")
                .to_string()
        }
    };
    let e = err(json!({"name": "v", "persistentVolumeClaim": {"claimName": "pending"}})).await;
    assert!(e.contains("PVC ns/pending has non-bound phase (\"Pending\")"), "{e}");
    let e = err(json!({"name": "v", "persistentVolumeClaim": {"claimName": "lost"}})).await;
    assert!(e.contains("persistentvolume \"pv-gone\" not found"), "{e}");
    let e = err(json!({"name": "v", "persistentVolumeClaim": {"claimName": "nfs"}})).await;
    assert!(
        e.contains("volume \"v\" is of type persistentVolumeClaim (bound to a nfs PersistentVolume)"),
        "{e}"
    );
    let e = err(json!({"name": "v", "nfs": {"server": "s", "path": "/x"}})).await;
    assert!(
        e.starts_with("volume \"v\" is of type nfs, which Weir's node agent cannot mount"),
        "{e}"
    );
    let e = err(json!({"name": "v", "csi": {"driver": "d"}})).await;
    assert!(e.contains("is of type csi"), "{e}");
}

#[tokio::test]
async fn tokens_are_reused_until_due_for_renewal() {
    let tmp = tempfile::tempdir().unwrap();
    let source = FakeSource::new();
    let pod = pod(json!([{"name": "token", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "audience": "vault", "expirationSeconds": 600}}
    ]}}]));
    let volumes = PodVolumes::prepare(&source, &pod, tmp.path()).await.unwrap();
    let token = volumes.path("token").unwrap().join("token");
    assert_eq!(read(&token), "token-0");
    assert_eq!(source.requests.lock().unwrap()[0].audience.as_deref(), Some("vault"));
    assert!(!volumes.refresh(&source, &pod).await.unwrap(), "a fresh token is kept");
    assert_eq!(source.tokens_issued.load(Ordering::SeqCst), 1);

    // A token with less than 20% of its life left is renewed; then the next is kept again.
    *source.token_life.lock().unwrap() = 60;
    let volumes = PodVolumes::prepare(&source, &pod, tmp.path()).await.unwrap();
    assert_eq!(read(&token), "token-1");
    assert!(volumes.refresh(&source, &pod).await.unwrap());
    assert_eq!(read(&token), "token-2");
}

#[tokio::test]
async fn fs_group_owns_writable_and_data_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let source = FakeSource::new();
    source.put_config_map("conf", json!({"k": "v"}));
    // The process's own group: chown to it needs no privilege.
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    let mut pod = pod(
        json!([{"name": "scratch", "emptyDir": {}}, {"name": "conf", "configMap": {"name": "conf", "defaultMode": 0o600}}]),
    );
    pod.spec.as_mut().unwrap().security_context = Some(from(json!({"fsGroup": gid})));
    let volumes = PodVolumes::prepare(&source, &pod, tmp.path()).await.unwrap();
    let scratch = volumes.path("scratch").unwrap();
    let meta = fs::metadata(scratch).unwrap();
    assert_eq!(meta.gid(), gid);
    assert_eq!(meta.mode() & 0o7777, 0o2777, "setgid directory");
    let file = volumes.path("conf").unwrap().join("k");
    assert_eq!(fs::metadata(&file).unwrap().gid(), gid);
    assert_eq!(mode(&file), 0o640, "group read added to the read-only data");
}

#[test]
fn teardown_refuses_uids_that_are_paths() {
    let tmp = tempfile::tempdir().unwrap();
    for uid in ["", "..", "a/../..", "/etc"] {
        assert!(PodVolumes::teardown(tmp.path(), uid).is_err(), "{uid:?}");
    }
}

#[test]
fn memory_volumes_are_sized_as_kubelet_sizes_them() {
    let gi = 1i128 << 30;
    assert_eq!(memory_volume_size(Some(8 * gi), None, None), Some(8 << 30));
    assert_eq!(memory_volume_size(Some(8 * gi), Some(gi), None), Some(1 << 30));
    assert_eq!(
        memory_volume_size(Some(8 * gi), Some(gi), Some(64 << 20)),
        Some(64 << 20)
    );
    assert_eq!(
        memory_volume_size(Some(8 * gi), None, Some(16 * gi)),
        Some(8 << 30),
        "never above the node"
    );
    assert_eq!(memory_volume_size(None, None, Some(gi)), Some(1 << 30));
    assert_eq!(memory_volume_size(None, None, None), None);

    let with = |containers: serde_json::Value, init: serde_json::Value| -> Pod {
        from(json!({"metadata": {"name": "p"}, "spec": {"containers": containers, "initContainers": init}}))
    };
    let limited = |name: &str, memory: &str| json!({"name": name, "resources": {"limits": {"memory": memory}}});
    let pod = with(
        json!([limited("a", "64Mi"), limited("b", "64Mi")]),
        json!([limited("i", "100Mi")]),
    );
    assert_eq!(pod_memory_limit(&pod), Some(128 << 20));
    let pod = with(json!([limited("a", "64Mi")]), json!([limited("i", "100Mi")]));
    assert_eq!(pod_memory_limit(&pod), Some(100 << 20), "the larger init container");
    let mut sidecar = limited("s", "32Mi");
    sidecar["restartPolicy"] = json!("Always");
    let pod = with(json!([limited("a", "64Mi")]), json!([sidecar]));
    assert_eq!(
        pod_memory_limit(&pod),
        Some(96 << 20),
        "sidecars run beside the containers"
    );
    let pod = with(json!([limited("a", "64Mi"), {"name": "b"}]), json!([]));
    assert_eq!(pod_memory_limit(&pod), None, "a container without a limit");
}

#[tokio::test]
async fn token_files_belong_to_the_pods_one_user() {
    let tmp = tempfile::tempdir().unwrap();
    let source = FakeSource::new();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut pod = pod(json!([{"name": "t", "projected": {"defaultMode": 0o644, "sources": [
        {"serviceAccountToken": {"path": "token"}}, {"downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}}
    ]}}]));
    pod.spec.as_mut().unwrap().security_context = Some(from(json!({"runAsUser": me})));
    let volumes = PodVolumes::prepare(&source, &pod, tmp.path()).await.unwrap();
    let dir = volumes.path("t").unwrap();
    assert_eq!(mode(&dir.join("token")), 0o600, "only the pod's user reads its token");
    assert_eq!(fs::metadata(dir.join("token")).unwrap().uid(), me);
    assert_eq!(mode(&dir.join("name")), 0o644, "other files keep the default mode");

    // Containers running as different users: the token keeps defaultMode.
    pod.spec.as_mut().unwrap().containers[0].security_context = Some(from(json!({"runAsUser": me + 1})));
    pod.spec
        .as_mut()
        .unwrap()
        .containers
        .push(from(json!({"name": "other", "image": "x"})));
    assert_eq!(payload::fs_user(&pod), None);
    let tmp = tempfile::tempdir().unwrap();
    let volumes = PodVolumes::prepare(&source, &pod, tmp.path()).await.unwrap();
    assert_eq!(mode(&volumes.path("t").unwrap().join("token")), 0o644);
}
