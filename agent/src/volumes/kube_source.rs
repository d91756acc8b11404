//! [`VolumeSource`] over the API server: the pod worker's way to fill volumes. Reads are
//! direct GETs (no cache yet), tokens come from the TokenRequest subresource.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Api;
use kube::api::PostParams;

use super::{IssuedToken, SourceFuture, TokenRequestFor, VolumeSource};

/// Objects from the API server, as this node's credentials may read them.
#[derive(Clone)]
pub struct KubeVolumeSource {
    client: kube::Client,
    node_name: String,
}

impl KubeVolumeSource {
    /// A source reading through `client` for the node `node_name` (whose allocatable the
    /// downward API falls back to).
    pub fn new(client: kube::Client, node_name: impl Into<String>) -> KubeVolumeSource {
        KubeVolumeSource {
            client,
            node_name: node_name.into(),
        }
    }
}

fn text(e: kube::Error) -> String {
    e.to_string()
}

impl VolumeSource for KubeVolumeSource {
    fn config_map<'a>(&'a self, namespace: &'a str, name: &'a str) -> SourceFuture<'a, Option<ConfigMap>> {
        Box::pin(async move {
            Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(text)
        })
    }

    fn secret<'a>(&'a self, namespace: &'a str, name: &'a str) -> SourceFuture<'a, Option<Secret>> {
        Box::pin(async move {
            Api::<Secret>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(text)
        })
    }

    fn persistent_volume_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> SourceFuture<'a, Option<PersistentVolumeClaim>> {
        Box::pin(async move {
            Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(text)
        })
    }

    fn persistent_volume<'a>(&'a self, name: &'a str) -> SourceFuture<'a, Option<PersistentVolume>> {
        Box::pin(async move {
            Api::<PersistentVolume>::all(self.client.clone())
                .get_opt(name)
                .await
                .map_err(text)
        })
    }

    fn service_account_token<'a>(&'a self, request: &'a TokenRequestFor) -> SourceFuture<'a, IssuedToken> {
        Box::pin(async move {
            let body = TokenRequest {
                spec: Some(TokenRequestSpec {
                    audiences: request.audience.clone().map(|a| vec![a]),
                    expiration_seconds: Some(request.expiration_seconds),
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(request.pod_name.clone()),
                        uid: Some(request.pod_uid.clone()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let issued = Api::<ServiceAccount>::namespaced(self.client.clone(), &request.namespace)
                .create_token_request(&request.service_account, &PostParams::default(), &body)
                .await
                .map_err(text)?;
            let status = issued
                .status
                .ok_or_else(|| "the API server answered the TokenRequest without a status".to_string())?;
            match (status.token, status.expiration_timestamp) {
                (Some(token), Some(expiration)) => Ok(IssuedToken {
                    token,
                    expiration: expiration.0,
                }),
                _ => Err("the API server's TokenRequest status lacks the token or its expirationTimestamp".to_string()),
            }
        })
    }

    fn node_allocatable(&self) -> SourceFuture<'_, BTreeMap<String, Quantity>> {
        Box::pin(async move {
            let node = Api::<Node>::all(self.client.clone())
                .get(&self.node_name)
                .await
                .map_err(text)?;
            Ok(node.status.and_then(|s| s.allocatable).unwrap_or_default())
        })
    }
}
