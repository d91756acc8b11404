//! Weir's control plane: the Kubernetes-compatible API server, the store behind it, and the
//! controllers that run against it.

pub mod apiserver;
pub mod controllers;
pub mod store;
