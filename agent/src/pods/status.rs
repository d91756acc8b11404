//! A pod's status as kubelet computes it, from what the agent knows of its containers:
//! the phase (kubelet's `getPhase`), the conditions (PodReadyToStartContainers,
//! Initialized, ContainersReady, Ready), and each container's status with its state,
//! last state, restart count and reason. Pure: the pod worker feeds it observations and
//! writes the result.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use serde_json::{Value, json};

/// What the agent knows of one container right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerState {
    /// Not running yet or between restarts; `reason` as kubelet says it: `ContainerCreating`,
    /// `PodInitializing`, `ErrImagePull`, `ImagePullBackOff`, `CrashLoopBackOff`,
    /// `CreateContainerConfigError`, `CreateContainerError`, with a message.
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated(Termination),
}

/// How a container run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Termination {
    pub exit_code: i32,
    pub signal: Option<i32>,
    /// `Completed` (exit 0), `Error`, `OOMKilled`, `ContainerCannotRun`...
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    pub container_id: Option<String>,
}

impl Termination {
    /// Kubelet's reason for an exit: OOMKilled when the kernel killed it for memory,
    /// Completed for 0, Error otherwise.
    pub fn reason_for(exit_code: i32, oom_killed: bool) -> &'static str {
        if oom_killed {
            "OOMKilled"
        } else if exit_code == 0 {
            "Completed"
        } else {
            "Error"
        }
    }
}

/// One container as the agent tracks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerObservation {
    pub name: String,
    pub image: String,
    pub image_id: String,
    /// `containerd://<id>` of the current (or last) run.
    pub container_id: Option<String>,
    pub state: ContainerState,
    /// The previous run's end, after a restart.
    pub last_termination: Option<Termination>,
    pub restart_count: i32,
    /// Readiness probe passing (or no readiness probe and running).
    pub ready: bool,
    /// Startup probe passed (or none) while running.
    pub started: bool,
}

/// Everything the pod's status is computed from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodObservation {
    /// The sandbox (network namespace) exists and has its IP.
    pub sandbox_ready: bool,
    pub pod_ips: Vec<String>,
    pub host_ip: Option<String>,
    pub init_containers: Vec<ContainerObservation>,
    pub containers: Vec<ContainerObservation>,
    pub start_time: Option<Timestamp>,
    /// Set when the pod failed as a whole (e.g. activeDeadlineSeconds), with a reason.
    pub failed: Option<(String, String)>,
}

fn restart_policy(spec: &PodSpec) -> &str {
    spec.restart_policy.as_deref().unwrap_or("Always")
}

/// Whether every init container is done: exited 0, or, for a sidecar (an init container
/// with `restartPolicy: Always`), started.
fn inits_done(spec: &PodSpec, observation: &PodObservation) -> bool {
    spec.init_containers.as_ref().is_none_or(|inits| {
        inits.iter().all(|c| {
            let sidecar = c.restart_policy.as_deref() == Some("Always");
            observation.init_containers.iter().any(|o| {
                o.name == c.name
                    && match &o.state {
                        ContainerState::Terminated(t) => t.exit_code == 0,
                        ContainerState::Running { .. } => sidecar && o.started,
                        ContainerState::Waiting { .. } => false,
                    }
            })
        })
    })
}

/// kubelet's `getPhase`.
pub fn phase(spec: &PodSpec, observation: &PodObservation) -> &'static str {
    if observation.failed.is_some() {
        return "Failed";
    }
    let policy = restart_policy(spec);
    // Init containers run first, in order; the pod is Pending until all have succeeded.
    let init_done = inits_done(spec, observation);
    if !init_done {
        let init_failed_for_good = policy == "Never"
            && observation
                .init_containers
                .iter()
                .any(|o| matches!(&o.state, ContainerState::Terminated(t) if t.exit_code != 0));
        return if init_failed_for_good { "Failed" } else { "Pending" };
    }
    // Succeeded containers need no count: with none waiting, running or failed, the pod
    // succeeded (or, with restartPolicy Always, restarts them).
    let (mut waiting, mut running, mut failed) = (0, 0, 0);
    for container in &spec.containers {
        match observation.containers.iter().find(|o| o.name == container.name) {
            None => waiting += 1,
            Some(o) => match &o.state {
                ContainerState::Running { .. } => running += 1,
                ContainerState::Terminated(t) if t.exit_code == 0 => {}
                ContainerState::Terminated(_) => failed += 1,
                // Waiting after a run (back-off) counts as that run's end.
                ContainerState::Waiting { .. } => match &o.last_termination {
                    Some(t) if t.exit_code == 0 => {}
                    Some(_) => failed += 1,
                    None => waiting += 1,
                },
            },
        }
    }
    // As kubelet: a container that has never started keeps the pod Pending.
    if waiting > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    // Everything has stopped.
    match policy {
        "Always" => "Running",
        "OnFailure" if failed > 0 => "Running",
        _ if failed > 0 => "Failed",
        _ => "Succeeded",
    }
}

fn time(t: Timestamp) -> Value {
    json!(t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

fn termination_json(t: &Termination) -> Value {
    let mut v = json!({
        "exitCode": t.exit_code,
        "reason": t.reason,
        "finishedAt": time(t.finished_at),
    });
    if let Some(started) = t.started_at {
        v["startedAt"] = time(started);
    }
    if let Some(signal) = t.signal {
        v["signal"] = json!(signal);
    }
    if let Some(message) = &t.message {
        v["message"] = json!(message);
    }
    if let Some(id) = &t.container_id {
        v["containerID"] = json!(id);
    }
    v
}

/// One `containerStatuses[]` entry.
pub fn container_status(o: &ContainerObservation) -> Value {
    let state = match &o.state {
        ContainerState::Waiting { reason, message } => {
            let mut w = json!({"reason": reason});
            if let Some(message) = message {
                w["message"] = json!(message);
            }
            json!({"waiting": w})
        }
        ContainerState::Running { started_at } => json!({"running": {"startedAt": time(*started_at)}}),
        ContainerState::Terminated(t) => json!({"terminated": termination_json(t)}),
    };
    let last_state = o
        .last_termination
        .as_ref()
        .map_or(json!({}), |t| json!({"terminated": termination_json(t)}));
    let running = matches!(o.state, ContainerState::Running { .. });
    let mut v = json!({
        "name": o.name,
        "image": o.image,
        "imageID": o.image_id,
        "state": state,
        "lastState": last_state,
        "ready": o.ready && running,
        "started": o.started && running,
        "restartCount": o.restart_count,
    });
    if let Some(id) = &o.container_id {
        v["containerID"] = json!(id);
    }
    v
}

/// The status to write for `pod`: phase, conditions (transition times kept from the pod's
/// current status while a condition holds), IPs, start time and container statuses.
pub fn pod_status(pod: &Pod, observation: &PodObservation, now: Timestamp) -> Value {
    let spec = pod.spec.clone().unwrap_or_default();
    let phase = phase(&spec, observation);
    let old: BTreeMap<String, (String, Option<String>)> = pod
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .map(|c| {
            let time = c.last_transition_time.as_ref().map(|t| t.0.to_string());
            (c.type_.clone(), (c.status.clone(), time))
        })
        .collect();
    let inits_done = inits_done(&spec, observation);
    let not_ready: Vec<&str> = spec
        .containers
        .iter()
        .filter(|c| {
            !observation
                .containers
                .iter()
                .any(|o| o.name == c.name && o.ready && matches!(o.state, ContainerState::Running { .. }))
        })
        .map(|c| c.name.as_str())
        .collect();
    // A finished pod is not ready, whatever its containers said last.
    let containers_ready = not_ready.is_empty() && phase == "Running";
    let gates_ok = spec.readiness_gates.iter().flatten().all(|gate| {
        old.get(&gate.condition_type)
            .is_some_and(|(status, _)| status == "True")
    });
    let unready_message =
        (!not_ready.is_empty()).then(|| format!("containers with unready status: [{}]", not_ready.join(" ")));
    let mut conditions = Vec::new();
    let mut condition = |type_: &str, ok: bool, reason: Option<&str>, message: Option<String>| {
        let status = if ok { "True" } else { "False" };
        let transition = match old.get(type_) {
            Some((s, Some(t))) if s == status => json!(t),
            _ => time(now),
        };
        let mut c = json!({"type": type_, "status": status, "lastTransitionTime": transition, "lastProbeTime": null});
        if !ok {
            if let Some(reason) = reason {
                c["reason"] = json!(reason);
            }
            if let Some(message) = message {
                c["message"] = json!(message);
            }
        }
        conditions.push(c);
    };
    condition("PodReadyToStartContainers", observation.sandbox_ready, None, None);
    condition(
        "Initialized",
        inits_done,
        Some("ContainersNotInitialized"),
        (!inits_done).then(|| "containers with incomplete status: init containers".to_owned()),
    );
    let finished_reason = if phase == "Succeeded" || phase == "Failed" {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    condition(
        "ContainersReady",
        containers_ready,
        Some(finished_reason),
        unready_message.clone(),
    );
    let ready_message = if !gates_ok && containers_ready {
        Some("the status of pod readiness gate is not \"True\"".to_owned())
    } else {
        unready_message
    };
    let ready_reason = if !gates_ok && containers_ready {
        "ReadinessGatesNotReady"
    } else {
        finished_reason
    };
    condition("Ready", containers_ready && gates_ok, Some(ready_reason), ready_message);
    // The scheduler's condition stays as it wrote it.
    if let Some(scheduled) = pod
        .status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .find(|c| c.type_ == "PodScheduled")
    {
        conditions.push(serde_json::to_value(scheduled).expect("a condition"));
    }

    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "containerStatuses": observation.containers.iter().map(container_status).collect::<Vec<_>>(),
        "qosClass": qos_class(&spec),
    });
    if !observation.init_containers.is_empty() {
        status["initContainerStatuses"] =
            Value::Array(observation.init_containers.iter().map(container_status).collect());
    }
    if let Some(host_ip) = &observation.host_ip {
        status["hostIP"] = json!(host_ip);
        status["hostIPs"] = json!([{"ip": host_ip}]);
    }
    if let Some(first) = observation.pod_ips.first() {
        status["podIP"] = json!(first);
        status["podIPs"] = Value::Array(observation.pod_ips.iter().map(|ip| json!({"ip": ip})).collect());
    }
    if let Some(start) = observation.start_time {
        status["startTime"] = time(start);
    }
    if let Some((reason, message)) = &observation.failed {
        status["reason"] = json!(reason);
        status["message"] = json!(message);
    }
    status
}

/// Kubernetes' QoS class: Guaranteed when every container's requests equal its limits for
/// cpu and memory, BestEffort when none has any, Burstable otherwise.
pub fn qos_class(spec: &PodSpec) -> &'static str {
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let resources = c.resources.clone().unwrap_or_default();
        let limits = resources.limits.unwrap_or_default();
        let requests = resources.requests.unwrap_or_default();
        for name in ["cpu", "memory"] {
            let limit = limits.get(name);
            // A request defaults to the limit.
            let request = requests.get(name).or(limit);
            if limit.is_some() || request.is_some() {
                any = true;
            }
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        format!("2026-01-01T00:00:{s}Z").parse().unwrap()
    }

    fn pod(policy: &str, containers: &[&str], inits: &[&str]) -> Pod {
        let list = |names: &[&str]| {
            names
                .iter()
                .map(|n| json!({"name": n, "image": "busybox"}))
                .collect::<Vec<_>>()
        };
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"restartPolicy": policy, "containers": list(containers), "initContainers": list(inits)},
        }))
        .unwrap()
    }

    fn observed(name: &str, state: ContainerState) -> ContainerObservation {
        ContainerObservation {
            name: name.into(),
            image: "busybox".into(),
            image_id: String::new(),
            container_id: None,
            ready: matches!(state, ContainerState::Running { .. }),
            started: true,
            state,
            last_termination: None,
            restart_count: 0,
        }
    }

    fn running(name: &str) -> ContainerObservation {
        observed(name, ContainerState::Running { started_at: t("01") })
    }

    fn exited(name: &str, code: i32) -> ContainerObservation {
        observed(
            name,
            ContainerState::Terminated(Termination {
                exit_code: code,
                signal: None,
                reason: Termination::reason_for(code, false).into(),
                message: None,
                started_at: Some(t("01")),
                finished_at: t("02"),
                container_id: None,
            }),
        )
    }

    fn waiting(name: &str, reason: &str) -> ContainerObservation {
        observed(
            name,
            ContainerState::Waiting {
                reason: reason.into(),
                message: None,
            },
        )
    }

    fn phase_of(pod: &Pod, inits: Vec<ContainerObservation>, containers: Vec<ContainerObservation>) -> &'static str {
        phase(
            pod.spec.as_ref().unwrap(),
            &PodObservation {
                init_containers: inits,
                containers,
                ..PodObservation::default()
            },
        )
    }

    #[test]
    fn phases_follow_kubelets_get_phase() {
        let always = pod("Always", &["a", "b"], &[]);
        assert_eq!(phase_of(&always, vec![], vec![]), "Pending");
        assert_eq!(
            phase_of(&always, vec![], vec![waiting("a", "ContainerCreating")]),
            "Pending"
        );
        // A container that never started keeps the pod Pending, as kubelet's getPhase.
        assert_eq!(
            phase_of(&always, vec![], vec![running("a"), waiting("b", "ContainerCreating")]),
            "Pending"
        );
        assert_eq!(phase_of(&always, vec![], vec![running("a"), running("b")]), "Running");
        assert_eq!(
            phase_of(&always, vec![], vec![exited("a", 0), exited("b", 1)]),
            "Running",
            "restarts"
        );

        let never = pod("Never", &["a", "b"], &[]);
        assert_eq!(
            phase_of(&never, vec![], vec![exited("a", 0), exited("b", 0)]),
            "Succeeded"
        );
        assert_eq!(phase_of(&never, vec![], vec![exited("a", 0), exited("b", 2)]), "Failed");
        assert_eq!(phase_of(&never, vec![], vec![running("a"), exited("b", 2)]), "Running");

        let on_failure = pod("OnFailure", &["a"], &[]);
        assert_eq!(
            phase_of(&on_failure, vec![], vec![exited("a", 1)]),
            "Running",
            "will restart"
        );
        assert_eq!(phase_of(&on_failure, vec![], vec![exited("a", 0)]), "Succeeded");
        // In back-off after a failure: still Running (CrashLoopBackOff).
        let mut backing_off = waiting("a", "CrashLoopBackOff");
        backing_off.last_termination = match exited("a", 1).state {
            ContainerState::Terminated(t) => Some(t),
            _ => unreachable!(),
        };
        assert_eq!(phase_of(&on_failure, vec![], vec![backing_off]), "Running");
    }

    #[test]
    fn init_containers_hold_the_pod_pending_and_a_failed_one_fails_a_never_pod() {
        let p = pod("Always", &["app"], &["init"]);
        assert_eq!(phase_of(&p, vec![running("init")], vec![]), "Pending");
        assert_eq!(phase_of(&p, vec![exited("init", 0)], vec![running("app")]), "Running");
        assert_eq!(phase_of(&p, vec![exited("init", 1)], vec![]), "Pending", "retried");
        let never = pod("Never", &["app"], &["init"]);
        assert_eq!(phase_of(&never, vec![exited("init", 1)], vec![]), "Failed");
        // A sidecar (restartPolicy Always) init container counts once it has started.
        let mut sidecar = pod("Always", &["app"], &["proxy"]);
        sidecar.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0].restart_policy = Some("Always".into());
        assert_eq!(
            phase_of(&sidecar, vec![running("proxy")], vec![running("app")]),
            "Running"
        );
    }

    #[test]
    fn conditions_and_container_statuses_read_as_kubelets() {
        let p = pod("Always", &["a", "b"], &[]);
        let observation = PodObservation {
            sandbox_ready: true,
            pod_ips: vec!["10.244.1.5".into()],
            host_ip: Some("192.168.1.10".into()),
            containers: vec![
                running("a"),
                ContainerObservation {
                    ready: false,
                    ..running("b")
                },
            ],
            start_time: Some(t("00")),
            ..PodObservation::default()
        };
        let status = pod_status(&p, &observation, t("05"));
        assert_eq!(status["phase"], "Running");
        assert_eq!(status["podIP"], "10.244.1.5");
        assert_eq!(status["podIPs"][0]["ip"], "10.244.1.5");
        assert_eq!(status["hostIP"], "192.168.1.10");
        assert_eq!(status["qosClass"], "BestEffort");
        let condition = |type_: &str| {
            status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == type_)
                .cloned()
                .unwrap()
        };
        assert_eq!(condition("PodReadyToStartContainers")["status"], "True");
        assert_eq!(condition("Initialized")["status"], "True");
        assert_eq!(condition("ContainersReady")["status"], "False");
        assert_eq!(condition("Ready")["reason"], "ContainersNotReady");
        assert_eq!(condition("Ready")["message"], "containers with unready status: [b]");
        let a = &status["containerStatuses"][0];
        assert_eq!(a["state"]["running"]["startedAt"], "2026-01-01T00:00:01Z");
        assert_eq!(a["ready"], true);
        assert_eq!(a["lastState"], json!({}));

        // Both ready: Ready turns True with a new transition time; unchanged ones keep theirs.
        let mut p2 = p.clone();
        p2.status = serde_json::from_value(json!({"conditions": status["conditions"]})).unwrap();
        let observation = PodObservation {
            containers: vec![running("a"), running("b")],
            ..observation
        };
        let status = pod_status(&p2, &observation, t("09"));
        let ready = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(
            (ready["status"].as_str(), ready["lastTransitionTime"].as_str()),
            (Some("True"), Some("2026-01-01T00:00:09Z"))
        );
        let init = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Initialized")
            .unwrap();
        assert_eq!(init["lastTransitionTime"], "2026-01-01T00:00:05Z");
    }

    #[test]
    fn a_crash_looping_container_shows_its_back_off_and_last_exit() {
        let mut c = waiting("a", "CrashLoopBackOff");
        c.state = ContainerState::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: Some("back-off 20s restarting failed container=a pod=p_default(uid)".into()),
        };
        c.restart_count = 2;
        c.last_termination = Some(Termination {
            exit_code: 137,
            signal: None,
            reason: Termination::reason_for(137, true).into(),
            message: None,
            started_at: Some(t("01")),
            finished_at: t("03"),
            container_id: Some("containerd://abc".into()),
        });
        let v = container_status(&c);
        assert_eq!(v["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(v["lastState"]["terminated"]["reason"], "OOMKilled");
        assert_eq!(v["lastState"]["terminated"]["exitCode"], 137);
        assert_eq!(v["restartCount"], 2);
        assert_eq!(v["ready"], false);
    }

    #[test]
    fn qos_classes() {
        let with = |resources: Value| -> PodSpec {
            serde_json::from_value(json!({"containers": [{"name": "a", "resources": resources}]})).unwrap()
        };
        assert_eq!(qos_class(&with(json!({}))), "BestEffort");
        assert_eq!(
            qos_class(&with(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))),
            "Guaranteed",
            "requests default to limits"
        );
        assert_eq!(qos_class(&with(json!({"requests": {"cpu": "1"}}))), "Burstable");
        assert_eq!(
            qos_class(&with(
                json!({"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "1Gi"}})
            )),
            "Burstable"
        );
    }
}
