//! Weir's control plane: the Kubernetes-compatible API server and the store behind it.

pub mod apiserver;
pub mod store;
