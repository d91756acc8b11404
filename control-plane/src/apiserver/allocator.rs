//! ClusterIP (10.96.0.0/12) and NodePort (30000-32767) allocation. Each allocated value is a
//! claim key in the store, created only if absent, so two API servers on one etcd can never
//! hand out the same address (the approach of Kubernetes' IPAddress objects). Claims name
//! their Service; a repair pass at start releases claims whose Service is gone.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::sync::Arc;

use serde_json::{Value, json};

use super::status::{ApiError, FieldCause};
use crate::store::{Store, StoreError};

pub const NODE_PORTS: RangeInclusive<i64> = 30000..=32767;
const CIDR_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const CIDR_BITS: u32 = 12;
const IP_CLAIMS: &str = "/registry/allocations/clusterips/";
const PORT_CLAIMS: &str = "/registry/allocations/nodeports/";
/// The first usable address belongs to the `kubernetes` Service.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

pub fn in_service_cidr(ip: &str) -> bool {
    ip.parse::<Ipv4Addr>()
        .is_ok_and(|a| u32::from(a) >> (32 - CIDR_BITS) == CIDR_BASE >> (32 - CIDR_BITS))
}

fn cidr_size() -> u32 {
    1 << (32 - CIDR_BITS)
}

pub struct Allocator {
    store: Arc<dyn Store>,
}

/// Claims made for one write; released again if the write fails.
#[derive(Default, Debug)]
pub struct Claims(Vec<String>);

impl Allocator {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Allocator { store }
    }

    /// Claim `key` for `owner`; true if claimed now or already ours.
    async fn claim(&self, key: &str, owner: &str, claims: &mut Claims) -> Result<bool, ApiError> {
        match self.store.create(key, owner.as_bytes().to_vec()).await {
            Ok(_) => {
                claims.0.push(key.to_string());
                Ok(true)
            }
            Err(StoreError::AlreadyExists(_)) => {
                let current = self.store.get(key).await?;
                Ok(current.is_some_and(|kv| kv.value == owner.as_bytes()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn release(&self, claims: Claims) {
        for key in claims.0 {
            if let Err(e) = self.store.delete(&key, None).await {
                tracing::warn!(key, error = %e, "could not release an allocation");
            }
        }
    }

    async fn release_keys(&self, keys: impl IntoIterator<Item = String>, owner: &str) {
        for key in keys {
            if let Ok(Some(kv)) = self.store.get(&key).await
                && kv.value == owner.as_bytes()
            {
                let _ = self.store.delete(&key, Some(kv.mod_revision)).await;
            }
        }
    }

    /// Allocate what `svc` needs (given the previous version on update). On error, nothing
    /// stays claimed.
    pub async fn allocate(&self, svc: &mut Value, old: Option<&Value>, owner: &str) -> Result<Claims, ApiError> {
        let mut claims = Claims::default();
        match self.allocate_inner(svc, old, owner, &mut claims).await {
            Ok(()) => Ok(claims),
            Err(e) => {
                self.release(claims).await;
                Err(e)
            }
        }
    }

    async fn allocate_inner(
        &self,
        svc: &mut Value,
        old: Option<&Value>,
        owner: &str,
        claims: &mut Claims,
    ) -> Result<(), ApiError> {
        let name = svc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let ty = svc
            .pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        let old_ip = old
            .and_then(|o| o.pointer("/spec/clusterIP"))
            .and_then(Value::as_str)
            .map(String::from);
        let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(());
        };

        if ty == "ExternalName" {
            spec.remove("clusterIP");
            spec.remove("clusterIPs");
        } else {
            let requested = spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let ip = if requested == "None" {
                "None".to_string()
            } else if !requested.is_empty() {
                if old_ip.as_deref() != Some(&requested)
                    && !self.claim(&format!("{IP_CLAIMS}{requested}"), owner, claims).await?
                {
                    return Err(ApiError::invalid(
                        "",
                        "Service",
                        &name,
                        vec![FieldCause::invalid(
                            "spec.clusterIPs",
                            format!("[]string{{\"{requested}\"}}"),
                            format!("failed to allocate IP {requested}: provided IP is already allocated"),
                        )],
                    ));
                }
                requested
            } else {
                self.random_ip(owner, claims)
                    .await?
                    .ok_or_else(|| ApiError::internal("failed to allocate a ClusterIP: range 10.96.0.0/12 is full"))?
            };
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
        }

        let old_ports: Vec<i64> = old
            .and_then(|o| o.pointer("/spec/ports"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
            .collect();
        let wants_node_ports = ty == "NodePort"
            || (ty == "LoadBalancer"
                && spec.get("allocateLoadBalancerNodePorts").and_then(Value::as_bool) != Some(false));
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for (i, p) in ports.iter_mut().enumerate() {
                if !wants_node_ports {
                    if ty != "LoadBalancer"
                        && let Some(p) = p.as_object_mut()
                    {
                        p.remove("nodePort");
                    }
                    continue;
                }
                // 0 means "not set", as in Kubernetes.
                match p.get("nodePort").and_then(Value::as_i64).filter(|np| *np != 0) {
                    Some(np) if old_ports.contains(&np) => {}
                    Some(np) => {
                        if !self.claim(&format!("{PORT_CLAIMS}{np}"), owner, claims).await? {
                            return Err(ApiError::invalid(
                                "",
                                "Service",
                                &name,
                                vec![FieldCause::invalid(
                                    format!("spec.ports[{i}].nodePort"),
                                    np,
                                    "provided port is already allocated",
                                )],
                            ));
                        }
                    }
                    None => {
                        let np = self.random_port(owner, claims).await?.ok_or_else(|| {
                            ApiError::internal("failed to allocate a NodePort: range 30000-32767 is full")
                        })?;
                        p["nodePort"] = json!(np);
                    }
                }
            }
        }
        Ok(())
    }

    /// After a successful update or delete: release what `old` held and `new` no longer does.
    pub async fn release_unused(&self, old: &Value, new: Option<&Value>, owner: &str) {
        let ips = |v: &Value| -> Vec<String> {
            v.pointer("/spec/clusterIP")
                .and_then(Value::as_str)
                .filter(|ip| *ip != "None" && !ip.is_empty())
                .map(String::from)
                .into_iter()
                .collect()
        };
        let ports = |v: &Value| -> Vec<i64> {
            v.pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
                .collect()
        };
        let (new_ips, new_ports) = new.map(|n| (ips(n), ports(n))).unwrap_or_default();
        let mut keys: Vec<String> = ips(old)
            .into_iter()
            .filter(|ip| !new_ips.contains(ip))
            .map(|ip| format!("{IP_CLAIMS}{ip}"))
            .collect();
        keys.extend(
            ports(old)
                .into_iter()
                .filter(|p| !new_ports.contains(p))
                .map(|p| format!("{PORT_CLAIMS}{p}")),
        );
        self.release_keys(keys, owner).await;
    }

    async fn random_ip(&self, owner: &str, claims: &mut Claims) -> Result<Option<String>, ApiError> {
        let size = cidr_size();
        let start: u32 = rand::random::<u32>() % size;
        for i in 0..size {
            let offset = (start + i) % size;
            // Skip the network address, the kubernetes Service's address and the broadcast address.
            if offset <= 1 || offset == size - 1 {
                continue;
            }
            let ip = Ipv4Addr::from(CIDR_BASE + offset).to_string();
            if self.claim(&format!("{IP_CLAIMS}{ip}"), owner, claims).await? {
                return Ok(Some(ip));
            }
        }
        Ok(None)
    }

    async fn random_port(&self, owner: &str, claims: &mut Claims) -> Result<Option<i64>, ApiError> {
        let size = (NODE_PORTS.end() - NODE_PORTS.start() + 1) as u32;
        let start = rand::random::<u32>() % size;
        for i in 0..size {
            let port = NODE_PORTS.start() + ((start + i) % size) as i64;
            if self.claim(&format!("{PORT_CLAIMS}{port}"), owner, claims).await? {
                return Ok(Some(port));
            }
        }
        Ok(None)
    }

    /// Release claims whose Service is gone or no longer holds the value (left by a crash
    /// between claiming and writing the Service). A claim looks orphaned for a moment while its
    /// write is in flight on some API server, so only claims still orphaned and unchanged after
    /// `grace` are released.
    pub async fn repair(&self, grace: std::time::Duration) -> Result<usize, StoreError> {
        let mut suspects = Vec::new();
        for prefix in [IP_CLAIMS, PORT_CLAIMS] {
            let (claims, _) = self.store.list(prefix, None).await?;
            for claim in claims {
                if !self.claim_is_held(prefix, &claim).await? {
                    suspects.push((prefix, claim));
                }
            }
        }
        if suspects.is_empty() {
            return Ok(0);
        }
        tokio::time::sleep(grace).await;
        let mut released = 0;
        for (prefix, claim) in suspects {
            let unchanged = self
                .store
                .get(&claim.key)
                .await?
                .is_some_and(|kv| kv.mod_revision == claim.mod_revision);
            if unchanged
                && !self.claim_is_held(prefix, &claim).await?
                && self.store.delete(&claim.key, Some(claim.mod_revision)).await.is_ok()
            {
                released += 1;
            }
        }
        Ok(released)
    }

    /// Whether the Service a claim names exists and still uses the claimed value.
    async fn claim_is_held(&self, prefix: &str, claim: &crate::store::KeyValue) -> Result<bool, StoreError> {
        let value = claim.key.trim_start_matches(prefix);
        let owner = String::from_utf8_lossy(&claim.value).to_string();
        let Some(kv) = self.store.get(&owner).await? else {
            return Ok(false);
        };
        let svc: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
        Ok(if prefix == IP_CLAIMS {
            svc.pointer("/spec/clusterIP").and_then(Value::as_str) == Some(value)
        } else {
            svc.pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|p| {
                    p.get("nodePort")
                        .and_then(Value::as_i64)
                        .is_some_and(|n| n.to_string() == value)
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_cidr_is_10_96_slash_12() {
        assert!(in_service_cidr("10.96.0.1"));
        assert!(in_service_cidr("10.111.255.254"));
        assert!(!in_service_cidr("10.112.0.1"));
        assert!(!in_service_cidr("10.95.255.255"));
        assert!(!in_service_cidr("not-an-ip"));
    }

    #[tokio::test]
    async fn repair_releases_only_claims_whose_service_does_not_hold_them() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::embedded::EmbeddedStore::open(&dir.path().join("s")).unwrap());
        let owner = "/registry/services/default/web";
        let svc = json!({"spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 80, "nodePort": 30007}]}});
        store.create(owner, serde_json::to_vec(&svc).unwrap()).await.unwrap();
        for key in [
            format!("{IP_CLAIMS}10.96.0.7"),
            format!("{PORT_CLAIMS}30007"),
            format!("{IP_CLAIMS}10.96.0.8"),
            format!("{PORT_CLAIMS}30008"),
        ] {
            store.create(&key, owner.as_bytes().to_vec()).await.unwrap();
        }
        store
            .create(
                &format!("{IP_CLAIMS}10.96.0.9"),
                b"/registry/services/default/gone".to_vec(),
            )
            .await
            .unwrap();
        let allocator = Allocator::new(store.clone());
        assert_eq!(allocator.repair(std::time::Duration::ZERO).await.unwrap(), 3);
        let (left, _) = store.list("/registry/allocations/", None).await.unwrap();
        let keys: Vec<&str> = left.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, [format!("{IP_CLAIMS}10.96.0.7"), format!("{PORT_CLAIMS}30007")]);
    }
}
