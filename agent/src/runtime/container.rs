//! Containers and their tasks: create (container record + writable snapshot), start (a task
//! under the runc shim, stdout and stderr appended to a log file), wait, signal, stop with a
//! grace period, delete, and list (to re-adopt after an agent restart).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::container::Runtime as ContainerRuntime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{MountsRequest, PrepareSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest, DeleteTaskRequest,
    GetContainerRequest, GetRequest, KillRequest, ListContainersRequest, ListTasksRequest, StartRequest, WaitRequest,
};
use containerd_client::tonic::Code;
use containerd_client::types::v1::Status as ProcessStatus;
use tracing::{debug, info};

use super::spec::{ContainerConfig, host_devices, runtime_spec};
use super::{CGROUPS_PATH_LABEL, Error, LOG_PATH_LABEL, RUNC_RUNTIME, Runtime, SNAPSHOTTER};

/// The type URL containerd stores runtime specs under.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// How long [`Runtime::wait_container`] keeps retrying while containerd is unreachable
/// (a restart takes well under a second; the supervisor backs off up to 5 s).
const UNREACHABLE_PATIENCE: Duration = Duration::from_secs(60);

/// How a container's process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code; 128 + n for a process killed by signal n.
    pub code: u32,
    /// When it exited, as the shim saw it.
    pub exited_at: Option<SystemTime>,
    /// The kernel's OOM killer killed a process of the container (its cgroup counted an
    /// `oom_kill`).
    pub oom_killed: bool,
}

/// Where a container's task stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskStatus {
    /// The container exists but has no task (never started, or its task was deleted).
    None,
    /// Created, not yet started.
    Created {
        /// The init process.
        pid: u32,
    },
    /// Running.
    Running {
        /// The init process.
        pid: u32,
    },
    /// Paused or pausing.
    Paused {
        /// The init process.
        pid: u32,
    },
    /// Exited, not yet deleted.
    Stopped {
        /// Its exit code.
        code: u32,
    },
    /// containerd does not know.
    Unknown,
}

/// One container of this namespace, as a restarted agent finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerState {
    /// The container id.
    pub id: String,
    /// Its labels (pod uid, container name, ...).
    pub labels: HashMap<String, String>,
    /// The image name.
    pub image: String,
    /// The log file of its stdout and stderr.
    pub log_path: Option<PathBuf>,
    /// Its task.
    pub task: TaskStatus,
}

fn timestamp(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

impl Runtime {
    /// Creates the container: a writable snapshot of the image (which must be present, see
    /// [`Runtime::ensure_image`]) named by the container id, and the container record with
    /// the runtime spec. Nothing runs until [`Runtime::start_container`].
    pub async fn create_container(&self, config: &ContainerConfig) -> Result<(), Error> {
        if !config.log_path.is_absolute() {
            return Err(Error::InvalidSpec(format!(
                "container {}: the log path {} must be absolute",
                config.id,
                config.log_path.display()
            )));
        }
        let image = self.ensure_image(&config.image).await?;
        self.create_container_from(config, &image).await
    }

    /// [`Runtime::create_container`] with the image already made sure of (by
    /// [`Runtime::ensure_image`] or a pull), saving the second look-up.
    pub async fn create_container_from(&self, config: &ContainerConfig, image: &super::Image) -> Result<(), Error> {
        if !config.log_path.is_absolute() {
            return Err(Error::InvalidSpec(format!(
                "container {}: the log path {} must be absolute",
                config.id,
                config.log_path.display()
            )));
        }
        let mut config = config.clone();
        // runc needs a cgroup path to put limits on and to count OOM kills in; containerd's
        // own default is /<namespace>/<id>.
        let cgroups_path = config
            .cgroups_path
            .get_or_insert_with(|| format!("/{}/{}", self.namespace(), config.id))
            .clone();
        let devices = if config.security.privileged {
            host_devices()
        } else {
            Vec::new()
        };
        let spec = runtime_spec(&config, &image.defaults, &devices)?;
        let spec = serde_json::to_vec(&spec)
            .map_err(|e| Error::InvalidSpec(format!("container {}: serialising the spec: {e}", config.id)))?;
        let mut labels: HashMap<String, String> = config.labels.clone().into_iter().collect();
        labels.insert(LOG_PATH_LABEL.into(), config.log_path.display().to_string());
        labels.insert(CGROUPS_PATH_LABEL.into(), cgroups_path);
        let container = Container {
            id: config.id.clone(),
            labels,
            image: image.name.clone(),
            runtime: Some(ContainerRuntime {
                name: RUNC_RUNTIME.into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: spec,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: config.id.clone(),
            ..Default::default()
        };
        // The record first: it keeps the snapshot made next from garbage collection.
        ContainersClient::new(self.channel())
            .create(self.request(CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(|status| match status.code() {
                Code::AlreadyExists => Error::InvalidSpec(format!(
                    "container {} already exists: delete it first or use a new id",
                    config.id
                )),
                _ => Error::rpc("creating the container record")(status),
            })?;
        let prepared = SnapshotsClient::new(self.channel())
            .prepare(self.request(PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: config.id.clone(),
                parent: image.chain_id.clone(),
                labels: HashMap::new(),
            }))
            .await;
        if let Err(status) = prepared {
            let _ = ContainersClient::new(self.channel())
                .delete(self.request(DeleteContainerRequest { id: config.id.clone() }))
                .await;
            return Err(Error::rpc("preparing the container's root file system snapshot")(
                status,
            ));
        }
        debug!(container = %config.id, image = %image.name, "container created");
        Ok(())
    }

    /// Starts the container's process: a task under the runc shim with the snapshot as its
    /// root and stdout and stderr appended to the log file. Returns its pid (on the host).
    pub async fn start_container(&self, id: &str) -> Result<u32, Error> {
        let container = self.container(id).await?;
        let log_path = container.labels.get(LOG_PATH_LABEL).map(PathBuf::from).ok_or_else(|| {
            Error::InvalidSpec(format!(
                "container {id} has no {LOG_PATH_LABEL} label: it was not created by the weir agent"
            ))
        })?;
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let rootfs = SnapshotsClient::new(self.channel())
            .mounts(self.request(MountsRequest {
                snapshotter: container.snapshotter.clone(),
                key: container.snapshot_key.clone(),
            }))
            .await
            .map_err(Error::rpc("getting the mounts of the container's snapshot"))?
            .into_inner()
            .mounts;
        // Both streams to one URI: a file the shim appends to, or the logging driver.
        let log_uri = self.log_uri(&log_path)?;
        let mut tasks = TasksClient::new(self.channel());
        tasks
            .create(self.request(CreateTaskRequest {
                container_id: id.to_string(),
                rootfs,
                stdin: String::new(),
                stdout: log_uri.clone(),
                stderr: log_uri,
                terminal: false,
                ..Default::default()
            }))
            .await
            .map_err(Error::rpc("creating the task (runc create)"))?;
        let started = tasks
            .start(self.request(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
            .map_err(Error::rpc("starting the task"))?;
        let pid = started.into_inner().pid;
        info!(container = id, pid, log = %log_path.display(), "container started");
        Ok(pid)
    }

    /// Waits for the container's process to exit. Survives a containerd restart: while
    /// containerd is unreachable it retries (up to a minute), then waits on the restarted one.
    /// The log file may still lack the last output: the shim finishes copying it when the
    /// task is deleted ([`Runtime::delete_container`]).
    pub async fn wait_container(&self, id: &str) -> Result<ExitStatus, Error> {
        let mut unreachable_since: Option<std::time::Instant> = None;
        let response = loop {
            let waited = TasksClient::new(self.channel())
                .wait(self.request(WaitRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                }))
                .await;
            match waited {
                Ok(response) => break response.into_inner(),
                Err(status) if status.code() == Code::NotFound => {
                    return Err(Error::NotFound(id.to_string()));
                }
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled)
                        && unreachable_since.is_none_or(|t| t.elapsed() < UNREACHABLE_PATIENCE) =>
                {
                    debug!(container = id, error = %status.message(), "waiting: containerd unreachable, retrying");
                    unreachable_since.get_or_insert_with(std::time::Instant::now);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => return Err(Error::rpc("waiting for the task")(status)),
            }
        };
        let container = self.container(id).await.ok();
        let oom_killed = container
            .as_ref()
            .and_then(|c| c.labels.get(CGROUPS_PATH_LABEL))
            .is_some_and(|path| oom_kills(path) > 0);
        Ok(ExitStatus {
            code: response.exit_status,
            exited_at: timestamp(response.exited_at),
            oom_killed,
        })
    }

    /// Sends `signal` to the container's init process (`all`: to every process in it).
    pub async fn signal_container(&self, id: &str, signal: i32, all: bool) -> Result<(), Error> {
        TasksClient::new(self.channel())
            .kill(self.request(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal: signal as u32,
                all,
            }))
            .await
            .map(|_| ())
            .map_err(|status| match status.code() {
                Code::NotFound => Error::NotFound(id.to_string()),
                _ => Error::rpc("signalling the task")(status),
            })
    }

    /// Graceful termination: SIGTERM, then SIGKILL to every process of the container if it
    /// has not exited after `grace`. Returns how it exited. A task that already exited just
    /// reports its status.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<ExitStatus, Error> {
        let waiter = {
            let runtime = self.clone();
            let id = id.to_string();
            tokio::spawn(async move { runtime.wait_container(&id).await })
        };
        let mut waiter = std::pin::pin!(async move {
            waiter
                .await
                .map_err(|e| Error::Containerd(format!("waiting for the task panicked: {e}")))?
        });
        match self.signal_container(id, libc::SIGTERM, false).await {
            Ok(()) => {}
            // Already exited: nothing left to signal.
            Err(Error::Rpc {
                code: Code::FailedPrecondition,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
        match tokio::time::timeout(grace, &mut waiter).await {
            Ok(status) => status,
            Err(_) => {
                info!(
                    container = id,
                    ?grace,
                    "no exit within the grace period; sending SIGKILL"
                );
                match self.signal_container(id, libc::SIGKILL, true).await {
                    Ok(())
                    | Err(Error::Rpc {
                        code: Code::FailedPrecondition,
                        ..
                    }) => {}
                    Err(e) => return Err(e),
                }
                waiter.await
            }
        }
    }

    /// Deletes the container: its task (killed first if still running), the record and the
    /// snapshot. Parts already gone are skipped, so it can finish a half-done delete. Once it
    /// returns, the log file holds all the container wrote (the shim flushes on task delete).
    pub async fn delete_container(&self, id: &str) -> Result<(), Error> {
        let mut tasks = TasksClient::new(self.channel());
        let task = tasks
            .get(self.request(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await;
        let status = match task {
            Ok(response) => response.into_inner().process.map(|p| p.status),
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(Error::rpc("getting the task")(status)),
        };
        if let Some(status) = status {
            // containerd refuses to delete a task that has not exited: kill everything in it
            // and reap it first.
            if ProcessStatus::try_from(status) != Ok(ProcessStatus::Stopped) {
                let waiter = {
                    let runtime = self.clone();
                    let id = id.to_string();
                    tokio::spawn(async move { runtime.wait_container(&id).await })
                };
                match self.signal_container(id, libc::SIGKILL, true).await {
                    Ok(()) | Err(Error::NotFound(_)) => {}
                    Err(Error::Rpc {
                        code: Code::FailedPrecondition,
                        ..
                    }) => {}
                    Err(e) => return Err(e),
                }
                if tokio::time::timeout(Duration::from_secs(10), waiter).await.is_err() {
                    return Err(Error::Containerd(format!(
                        "container {id} did not exit within 10 s of SIGKILL; see containerd.log"
                    )));
                }
            }
            match tasks
                .delete(self.request(DeleteTaskRequest {
                    container_id: id.to_string(),
                }))
                .await
            {
                Ok(_) => {}
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => return Err(Error::rpc("deleting the task")(status)),
            }
        }
        match ContainersClient::new(self.channel())
            .delete(self.request(DeleteContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(Error::rpc("deleting the container record")(status)),
        }
        self.remove_snapshot(id).await;
        debug!(container = id, "container deleted");
        Ok(())
    }

    /// Every container in this namespace with its task's state: what a restarted agent
    /// re-adopts (by [`super::POD_UID_LABEL`] and [`super::CONTAINER_NAME_LABEL`]).
    pub async fn list_containers(&self) -> Result<Vec<ContainerState>, Error> {
        self.list_containers_filtered(Vec::new()).await
    }

    /// The containers of one pod (label [`super::POD_UID_LABEL`] = `pod_uid`), as
    /// [`Runtime::list_containers`] describes them.
    pub async fn list_pod_containers(&self, pod_uid: &str) -> Result<Vec<ContainerState>, Error> {
        // containerd's filter syntax: a quoted label key, the value quoted too (uids are
        // plain, but a quote or backslash must not end the string early).
        let value = pod_uid.replace('\\', "\\\\").replace('"', "\\\"");
        self.list_containers_filtered(vec![format!("labels.\"{}\"==\"{value}\"", super::POD_UID_LABEL)])
            .await
    }

    async fn list_containers_filtered(&self, filters: Vec<String>) -> Result<Vec<ContainerState>, Error> {
        let containers = ContainersClient::new(self.channel())
            .list(self.request(ListContainersRequest { filters }))
            .await
            .map_err(Error::rpc("listing containers"))?
            .into_inner()
            .containers;
        let tasks = TasksClient::new(self.channel())
            .list(self.request(ListTasksRequest::default()))
            .await
            .map_err(Error::rpc("listing tasks"))?
            .into_inner()
            .tasks;
        // containerd 1.6 fills in only `id` (the container id, for init processes).
        let tasks: HashMap<String, _> = tasks
            .into_iter()
            .map(|t| {
                let id = if t.container_id.is_empty() {
                    t.id.clone()
                } else {
                    t.container_id.clone()
                };
                (id, t)
            })
            .collect();
        let mut out: Vec<ContainerState> = containers
            .into_iter()
            .map(|c| {
                let task = match tasks.get(&c.id) {
                    None => TaskStatus::None,
                    Some(t) => match ProcessStatus::try_from(t.status).unwrap_or(ProcessStatus::Unknown) {
                        ProcessStatus::Created => TaskStatus::Created { pid: t.pid },
                        ProcessStatus::Running => TaskStatus::Running { pid: t.pid },
                        ProcessStatus::Paused | ProcessStatus::Pausing => TaskStatus::Paused { pid: t.pid },
                        ProcessStatus::Stopped => TaskStatus::Stopped { code: t.exit_status },
                        ProcessStatus::Unknown => TaskStatus::Unknown,
                    },
                };
                ContainerState {
                    log_path: c.labels.get(LOG_PATH_LABEL).map(PathBuf::from),
                    id: c.id,
                    labels: c.labels,
                    image: c.image,
                    task,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn container(&self, id: &str) -> Result<Container, Error> {
        ContainersClient::new(self.channel())
            .get(self.request(GetContainerRequest { id: id.to_string() }))
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => Error::NotFound(id.to_string()),
                _ => Error::rpc("getting the container record")(status),
            })?
            .into_inner()
            .container
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }
}

/// The OOM kills counted in the container's memory cgroup: v1 `memory.oom_control`
/// (`oom_kill N`, hybrid hosts like this one) or v2 `memory.events`. runc keeps the cgroup
/// until the task is deleted, so this is read between exit and delete.
fn oom_kills(cgroups_path: &str) -> u64 {
    let relative = cgroups_path.trim_start_matches('/');
    let candidates = [
        (
            format!("/sys/fs/cgroup/memory/{relative}/memory.oom_control"),
            "oom_kill",
        ),
        (format!("/sys/fs/cgroup/{relative}/memory.events"), "oom_kill"),
        (format!("/sys/fs/cgroup/unified/{relative}/memory.events"), "oom_kill"),
    ];
    candidates
        .iter()
        .filter_map(|(file, key)| {
            let text = std::fs::read_to_string(file).ok()?;
            text.lines().find_map(|line| {
                let (k, v) = line.split_once(' ')?;
                (k == *key).then(|| v.trim().parse::<u64>().ok()).flatten()
            })
        })
        .max()
        .unwrap_or(0)
}
