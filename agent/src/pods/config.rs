//! From a pod's container to the runtime's [`ContainerConfig`]: resources to cgroup
//! values as kubelet converts them, the pod's and the container's securityContext merged,
//! ids, labels and paths. Pure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod, PodSecurityContext, SecurityContext};

use super::quantity;
use crate::runtime::Security;
use crate::runtime::{BindMount, CONTAINER_NAME_LABEL, ContainerConfig, NetworkNamespace, POD_UID_LABEL, Resources};

/// Container label: the pod's name.
pub const POD_NAME_LABEL: &str = "io.weir.pod.name";
/// Container label: the pod's namespace.
pub const POD_NAMESPACE_LABEL: &str = "io.weir.pod.namespace";
/// Container label: which run of the container this is (its restart count at creation).
pub const ATTEMPT_LABEL: &str = "io.weir.container.attempt";
/// Container label: `init` for init containers, `app` otherwise.
pub const KIND_LABEL: &str = "io.weir.container.kind";

/// kubelet's CFS period, µs.
pub const CPU_PERIOD: u64 = 100_000;
/// kubelet's minimum cpu.shares.
const MIN_SHARES: u64 = 2;

/// The containerd id of run `attempt` of `container` in pod `uid`.
pub fn container_id(pod_uid: &str, container: &str, attempt: u32) -> String {
    format!("{pod_uid}-{container}-{attempt}")
}

/// Where the logs of run `attempt` of a container go: `<pod dir>/logs/<container>/<attempt>.log`
/// (kubelet's `/var/log/pods/<ns>_<name>_<uid>/<container>/<n>.log`).
pub fn log_path(pod_dir: &Path, container: &str, attempt: u32) -> PathBuf {
    pod_dir.join("logs").join(container).join(format!("{attempt}.log"))
}

/// cgroup values from `resources` as kubelet computes them: shares from the CPU request
/// (the limit when only a limit is given, as the API server's defaulting would make it),
/// quota from the CPU limit, memory.max from the memory limit.
pub fn resources(container: &Container) -> Resources {
    let get = |which: &str, name: &str| quantity::resource_milli(container.resources.as_ref(), which, name);
    let cpu_request = get("requests", "cpu").or_else(|| get("limits", "cpu"));
    let cpu_limit = get("limits", "cpu");
    let memory_limit = get("limits", "memory");
    Resources {
        cpu_shares: Some(
            cpu_request
                .map(|m| ((m * 1024) / 1000) as u64)
                .unwrap_or(MIN_SHARES)
                .max(MIN_SHARES),
        ),
        cpu_quota: cpu_limit.map(|m| ((m * CPU_PERIOD as i128) / 1000).max(1000) as i64),
        cpu_period: cpu_limit.map(|_| CPU_PERIOD),
        memory_limit: memory_limit.map(|m| (m / 1000) as i64),
        pids_limit: None,
    }
}

/// What a securityContext decides: the runtime's [`Security`], uid, gid, supplementary groups.
pub type SecuritySettings = (Security, Option<u32>, Option<u32>, Vec<u32>);

/// The container's securityContext over the pod's (the container's wins field by field).
pub fn security(
    pod: Option<&PodSecurityContext>,
    container: Option<&SecurityContext>,
) -> Result<SecuritySettings, String> {
    let uid = container
        .and_then(|c| c.run_as_user)
        .or_else(|| pod.and_then(|p| p.run_as_user));
    let gid = container
        .and_then(|c| c.run_as_group)
        .or_else(|| pod.and_then(|p| p.run_as_group));
    let non_root = container
        .and_then(|c| c.run_as_non_root)
        .or_else(|| pod.and_then(|p| p.run_as_non_root))
        .unwrap_or(false);
    if non_root && uid == Some(0) {
        return Err("container's runAsUser breaks non-root policy (runAsNonRoot is true and runAsUser is 0)".into());
    }
    let to_u32 = |v: i64, what: &str| u32::try_from(v).map_err(|_| format!("{what} {v} is not a valid id"));
    let uid = uid.map(|v| to_u32(v, "runAsUser")).transpose()?;
    let gid = gid.map(|v| to_u32(v, "runAsGroup")).transpose()?;
    let mut groups = Vec::new();
    for g in pod.and_then(|p| p.supplemental_groups.clone()).unwrap_or_default() {
        groups.push(to_u32(g, "supplementalGroups")?);
    }
    if let Some(fs_group) = pod.and_then(|p| p.fs_group) {
        groups.push(to_u32(fs_group, "fsGroup")?);
    }
    let caps = container.and_then(|c| c.capabilities.as_ref());
    let security = Security {
        privileged: container.and_then(|c| c.privileged).unwrap_or(false),
        readonly_rootfs: container.and_then(|c| c.read_only_root_filesystem).unwrap_or(false),
        add_capabilities: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
        drop_capabilities: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
        no_new_privileges: container.and_then(|c| c.allow_privilege_escalation) == Some(false),
    };
    Ok((security, uid, gid, groups))
}

/// Everything about the pod a container's config needs besides the container.
pub struct PodSetting<'a> {
    pub pod: &'a Pod,
    pub pod_dir: &'a Path,
    pub network: NetworkNamespace,
    /// The UTS hostname (kubelet's, truncated to 63).
    pub hostname: Option<String>,
    /// /etc/hosts, /etc/hostname, /etc/resolv.conf and volumes.
    pub mounts: Vec<BindMount>,
    /// The cgroup pods go under (`/weir`): a container's is `<parent>/pod<uid>/<id>`.
    pub cgroup_parent: &'a str,
}

/// The runtime config of run `attempt` of `container`.
pub fn container_config(
    setting: &PodSetting<'_>,
    container: &Container,
    init: bool,
    attempt: u32,
    env: Vec<(String, String)>,
) -> Result<ContainerConfig, String> {
    let pod = setting.pod;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let (security, run_as, group, groups) = security(
        spec.and_then(|s| s.security_context.as_ref()),
        container.security_context.as_ref(),
    )?;
    let image = container
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| format!("container {} has no image", container.name))?;
    let labels = BTreeMap::from([
        (POD_UID_LABEL.to_owned(), uid.clone()),
        (CONTAINER_NAME_LABEL.to_owned(), container.name.clone()),
        (POD_NAME_LABEL.to_owned(), pod.metadata.name.clone().unwrap_or_default()),
        (
            POD_NAMESPACE_LABEL.to_owned(),
            pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        ),
        (ATTEMPT_LABEL.to_owned(), attempt.to_string()),
        (KIND_LABEL.to_owned(), if init { "init" } else { "app" }.to_owned()),
    ]);
    let id = container_id(&uid, &container.name, attempt);
    Ok(ContainerConfig {
        cgroups_path: Some(format!("{}/pod{uid}/{id}", setting.cgroup_parent.trim_end_matches('/'))),
        id,
        image,
        labels,
        command: super::env::expand_all(&container.command, &env),
        args: super::env::expand_all(&container.args, &env),
        env,
        working_dir: container.working_dir.clone().filter(|w| !w.is_empty()),
        uid: run_as,
        gid: group,
        additional_gids: groups,
        hostname: setting.hostname.clone(),
        mounts: setting.mounts.clone(),
        network: setting.network.clone(),
        resources: resources(container),
        security,
        log_path: log_path(setting.pod_dir, &container.name, attempt),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn resources_become_cgroup_values_as_kubelet_computes_them() {
        let c = container(json!({"name": "c", "resources": {
            "requests": {"cpu": "250m", "memory": "64Mi"},
            "limits": {"cpu": "500m", "memory": "128Mi"}}}));
        let r = resources(&c);
        assert_eq!(r.cpu_shares, Some(256));
        assert_eq!(r.cpu_quota, Some(50_000));
        assert_eq!(r.cpu_period, Some(100_000));
        assert_eq!(r.memory_limit, Some(128 * 1024 * 1024));
        let best_effort = resources(&container(json!({"name": "c"})));
        assert_eq!(best_effort.cpu_shares, Some(2));
        assert_eq!(best_effort.cpu_quota, None);
        assert_eq!(best_effort.memory_limit, None);
        let limit_only = resources(&container(json!({"name": "c", "resources": {"limits": {"cpu": "1"}}})));
        assert_eq!(limit_only.cpu_shares, Some(1024));
    }

    #[test]
    fn container_security_overrides_the_pods() {
        let pod: PodSecurityContext =
            serde_json::from_value(json!({"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000})).unwrap();
        let c: SecurityContext = serde_json::from_value(json!({
            "runAsUser": 1001, "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}}))
        .unwrap();
        let (security, uid, gid, groups) = super::security(Some(&pod), Some(&c)).unwrap();
        assert_eq!((uid, gid), (Some(1001), Some(3000)));
        assert_eq!(groups, vec![2000]);
        assert!(security.readonly_rootfs && security.no_new_privileges && !security.privileged);
        assert_eq!(security.add_capabilities, vec!["NET_ADMIN"]);
        let root: SecurityContext = serde_json::from_value(json!({"runAsUser": 0, "runAsNonRoot": true})).unwrap();
        assert!(super::security(None, Some(&root)).unwrap_err().contains("non-root"));
    }
}
