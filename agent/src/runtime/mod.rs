//! The container runtime: the agent's own containerd ([`Containerd`]: started, supervised,
//! restarted, stopped) and a client for it ([`Runtime`]: images, containers, tasks, and
//! processes exec'd into running containers).
//! It knows nothing of pods or the Kubernetes API; the pod lifecycle calls it.
//!
//! What runs where:
//! - containerd (Debian's `/usr/bin/containerd`) with config, root, state, socket, pid file
//!   and log under one directory (`<data-dir>/containerd/`), CRI plugin disabled; or an
//!   existing containerd given by its socket.
//! - One `containerd-shim-runc-v2` per container, started by containerd, running the
//!   container with runc. Shims outlive containerd restarts and agent restarts; they write
//!   each container's stdout and stderr to the log file the agent chose (raw, or as CRI log
//!   lines through `weir log-driver`: [`Runtime::with_logger`]).
//! - Images in the content store, unpacked into the overlayfs snapshotter; each container
//!   gets a writable snapshot of its image's top layer, named by the container id.
//!
//! Every call carries the runtime's containerd namespace (`weir` for the agent); container
//! labels ([`POD_UID_LABEL`], [`CONTAINER_NAME_LABEL`]) let a restarted agent find its own.

mod airgap;
mod container;
mod credentials;
mod daemon;
mod exec;
mod image;
mod pull;
mod spec;

use containerd_client::tonic::metadata::{AsciiMetadataValue, MetadataValue};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};

pub use airgap::{DirectoryImport, ImageCommand, images_dir, import_directory};
pub use container::{ContainerState, ExitStatus, TaskStatus};
pub use credentials::{Credentials, matching_credentials, registry_credentials};
pub use daemon::{Containerd, ContainerdConfig, DEFAULT_BINARY};
pub use exec::{ExecControl, ExecProcess, ExecRequest};
pub use image::{Image, ImageDefaults, chain_ids, normalize_reference};
pub use pull::{LOCAL_REGISTRY, PullPolicy, RegistryConfig, is_loopback_registry, registry_of};
pub use spec::{
    BindMount, ContainerConfig, DEFAULT_CAPABILITIES, NetworkNamespace, ResolvedProcess, Resources, Security,
    capabilities, host_devices, resolve_process, runtime_spec,
};

/// The containerd namespace the agent keeps its images and containers in.
pub const DEFAULT_NAMESPACE: &str = "weir";
/// The snapshotter images are unpacked into and containers run on.
pub const SNAPSHOTTER: &str = "overlayfs";
/// The runtime (shim) containers run under.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// Container label: the uid of the pod a container belongs to.
pub const POD_UID_LABEL: &str = "io.weir.pod.uid";
/// Container label: the container's name in its pod spec.
pub const CONTAINER_NAME_LABEL: &str = "io.weir.container.name";
/// Container label set by [`Runtime::create_container`]: where its stdout and stderr go.
pub const LOG_PATH_LABEL: &str = "io.weir.log-path";
/// Container label set by [`Runtime::create_container`]: its cgroups path (for OOM checks).
pub const CGROUPS_PATH_LABEL: &str = "io.weir.cgroups-path";

/// What went wrong, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// containerd could not be started or reached.
    #[error("containerd: {0}")]
    Containerd(String),
    /// containerd refused a call.
    #[error("containerd refused {call}: {code:?}: {message}{hint}")]
    Rpc {
        /// What was asked.
        call: &'static str,
        /// The gRPC code.
        code: Code,
        /// containerd's message.
        message: String,
        /// How to fix it, when known.
        hint: &'static str,
    },
    /// The image is not on this node.
    #[error(
        "image {reference} is not present on this node: import it (`weir image import FILE`, or put the tarball \
         in the agent's images directory) or push it to a registry the node can pull from"
    )]
    ImageNotPresent {
        /// The normalised reference.
        reference: String,
    },
    /// The registry refused the pull: no credentials, wrong ones, or no access.
    #[error(
        "registry {registry} refused to serve {reference}: unauthorized ({tried}); give the pod an \
         imagePullSecret (type kubernetes.io/dockerconfigjson) with a user that may pull it"
    )]
    RegistryUnauthorized {
        /// The registry host (with port).
        registry: String,
        /// The normalised reference.
        reference: String,
        /// Which credentials were sent: the secret and user, or none.
        tried: String,
    },
    /// The registry answered that it has no such repository, tag or digest.
    #[error(
        "image {reference} was not found in registry {registry}: check the name and tag (or digest), and that it \
         was pushed there"
    )]
    ImageNotFound {
        /// The registry host (with port).
        registry: String,
        /// The normalised reference.
        reference: String,
    },
    /// The registry could not be reached (refused, timed out, TLS failed, connection broke).
    #[error("registry {registry} cannot be reached: {reason}; {hint}")]
    RegistryUnreachable {
        /// The registry host (with port).
        registry: String,
        /// What failed, with its causes.
        reason: String,
        /// What to check.
        hint: String,
    },
    /// The registry sent a manifest, index or config that cannot be used.
    #[error("registry {registry} sent an unusable manifest for {reference}: {reason}")]
    BadManifest {
        /// The registry host (with port).
        registry: String,
        /// The normalised reference.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry failed the pull otherwise (a server error, rate limit, broken download).
    #[error("pulling {reference} from registry {registry} failed: {reason}")]
    PullFailed {
        /// The registry host (with port).
        registry: String,
        /// The normalised reference.
        reference: String,
        /// The registry's answer or the failure.
        reason: String,
    },
    /// The image is absent and the pull policy forbids pulling (`imagePullPolicy: Never`).
    #[error(
        "image {reference} is not present on this node and its imagePullPolicy is Never: import it (`weir image \
         import FILE`) or change the policy to IfNotPresent"
    )]
    NeverPull {
        /// The normalised reference.
        reference: String,
    },
    /// An image archive or image document is unusable.
    #[error("{0}")]
    Archive(String),
    /// The image reference cannot be parsed.
    #[error("{0}")]
    InvalidImageName(String),
    /// The container configuration cannot become a runtime spec.
    #[error("{0}")]
    InvalidSpec(String),
    /// No such container in this namespace.
    #[error("container {0} does not exist in containerd (already deleted, or created by another namespace)")]
    NotFound(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Maps a gRPC status, with a hint for the codes that have a usual cause.
    pub(crate) fn rpc(call: &'static str) -> impl FnOnce(Status) -> Error {
        move |status| {
            let hint = match status.code() {
                Code::Unavailable => " (is containerd running? the agent restarts its own; check containerd.log)",
                Code::Unimplemented => " (this containerd lacks the API; use containerd 1.6 or later)",
                _ => "",
            };
            Error::Rpc {
                call,
                code: status.code(),
                message: status.message().to_string(),
                hint,
            }
        }
    }

    /// The reason kubelet shows in a container's `waiting` state when getting its image
    /// failed this way: `ErrImageNeverPull`, `InvalidImageName`, or `ErrImagePull` (which
    /// becomes `ImagePullBackOff` while the worker waits to retry); `None` for errors that
    /// are not about the image (containerd down, a bad spec).
    pub fn image_failure_reason(&self) -> Option<&'static str> {
        match self {
            Error::NeverPull { .. } => Some("ErrImageNeverPull"),
            Error::ImageNotPresent { .. }
            | Error::RegistryUnauthorized { .. }
            | Error::ImageNotFound { .. }
            | Error::RegistryUnreachable { .. }
            | Error::BadManifest { .. }
            | Error::PullFailed { .. } => Some("ErrImagePull"),
            Error::InvalidImageName(_) => Some("InvalidImageName"),
            _ => None,
        }
    }

    /// Whether containerd could not be reached (down or restarting), as opposed to refusing.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Rpc {
                code: Code::Unavailable,
                ..
            }
        )
    }
}

/// A connection to containerd, scoped to one containerd namespace. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    channel: Channel,
    namespace: String,
    namespace_header: AsciiMetadataValue,
    registries: std::sync::Arc<RegistryConfig>,
    /// One pull at a time per image: pods starting together share the first one's pull.
    pulls: pull::PullLocks,
    /// The binary logging driver containers' output goes through (`weir log-driver`), or
    /// `None`: the shim appends the raw output to the log file itself.
    logger: Option<std::sync::Arc<std::path::PathBuf>>,
}

impl Runtime {
    /// Connects to containerd's socket. The connection re-establishes itself when containerd
    /// restarts; calls made while it is down fail with [`Error::is_unavailable`].
    pub async fn connect(socket: &std::path::Path, namespace: &str) -> Result<Runtime, Error> {
        let valid = !namespace.is_empty()
            && namespace.len() <= 76
            && namespace.starts_with(|c: char| c.is_ascii_alphanumeric())
            && namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !valid {
            return Err(Error::InvalidSpec(format!(
                "{namespace:?} is not a containerd namespace: letters, digits, '-', '_' and '.', starting with a \
                 letter or digit"
            )));
        }
        let namespace_header = MetadataValue::try_from(namespace)
            .map_err(|e| Error::InvalidSpec(format!("namespace {namespace:?}: {e}")))?;
        let channel = containerd_client::connect(socket).await.map_err(|e| {
            Error::Containerd(format!(
                "connecting to {}: {e}; start containerd (the agent does unless --containerd-socket is given)",
                socket.display()
            ))
        })?;
        Ok(Runtime {
            channel,
            namespace: namespace.to_string(),
            namespace_header,
            registries: Default::default(),
            pulls: Default::default(),
            logger: None,
        })
    }

    /// This runtime with `config` for registry pulls (the agent's `--insecure-registry`).
    pub fn with_registry_config(mut self, config: RegistryConfig) -> Runtime {
        self.registries = std::sync::Arc::new(config);
        self
    }

    pub(crate) fn registry_config(&self) -> &RegistryConfig {
        &self.registries
    }

    pub(crate) fn pull_locks(&self) -> &pull::PullLocks {
        &self.pulls
    }

    /// Containers started from now on log through the binary logging driver `weir_binary`
    /// (the `weir` executable; the shim runs `weir log-driver <log path>`), which writes the
    /// CRI log format with a time on every line (`kubectl logs --timestamps`, `--since`).
    /// Without it the shim writes the raw output. The path must be absolute (the shim runs it
    /// from its own directory): the agent passes `std::env::current_exe()`.
    pub fn with_logger(mut self, weir_binary: impl Into<std::path::PathBuf>) -> Runtime {
        self.logger = Some(std::sync::Arc::new(weir_binary.into()));
        self
    }

    /// The stdio URI of a container logging to `log_path`.
    pub(crate) fn log_uri(&self, log_path: &std::path::Path) -> Result<String, Error> {
        if let Some(binary) = &self.logger
            && !binary.is_absolute()
        {
            return Err(Error::InvalidSpec(format!(
                "the logging driver {} must be an absolute path (the shim runs it from its own directory): pass \
                 std::env::current_exe() to Runtime::with_logger",
                binary.display()
            )));
        }
        Ok(match &self.logger {
            // containerd passes each query parameter as two arguments (key, value); one
            // parameter keeps their order fixed (Go maps have none).
            Some(binary) => format!(
                "binary://{}?{}",
                binary.display(),
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("log-driver", &log_path.display().to_string())
                    .finish()
            ),
            // The runc shim opens file:// URIs itself (O_APPEND) and copies the process's
            // pipes into the file, so logging goes on while containerd is down.
            None => format!("file://{}", log_path.display()),
        })
    }

    /// The containerd namespace this runtime works in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub(crate) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// A request in our namespace (containerd rejects namespaced calls without one).
    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("containerd-namespace", self.namespace_header.clone());
        request
    }

    /// A request in our namespace that adds what it creates to `lease`.
    pub(crate) fn leased<T>(&self, message: T, lease: &str) -> Request<T> {
        let mut request = self.request(message);
        if let Ok(value) = MetadataValue::try_from(lease) {
            request.metadata_mut().insert("containerd-lease", value);
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> Runtime {
        Runtime {
            channel: containerd_client::tonic::transport::Endpoint::from_static("http://[::1]:1").connect_lazy(),
            namespace: "t".into(),
            namespace_header: MetadataValue::from_static("t"),
            registries: Default::default(),
            pulls: Default::default(),
            logger: None,
        }
    }

    #[tokio::test]
    async fn log_uris_name_the_file_or_the_driver() {
        let log = std::path::Path::new("/var/log/pods/ns_web_1/main/0.log");
        assert_eq!(
            runtime().log_uri(log).unwrap(),
            "file:///var/log/pods/ns_web_1/main/0.log"
        );
        let with_driver = runtime().with_logger("/usr/bin/weir");
        assert_eq!(
            with_driver.log_uri(std::path::Path::new("/logs/a b&c.log")).unwrap(),
            "binary:///usr/bin/weir?log-driver=%2Flogs%2Fa+b%26c.log"
        );
        let relative = runtime().with_logger("weir").log_uri(log).unwrap_err();
        assert!(relative.to_string().contains("absolute path"), "{relative}");
    }
}
