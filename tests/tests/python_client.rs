//! The official Python `kubernetes` client works against weir with the admin kubeconfig.

use std::process::Command;
use std::time::Duration;

use weir_tests::{Backend, TestServer, describe, run_bounded};

const SCRIPT: &str = r#"
import sys
from kubernetes import client, config
from kubernetes.client.rest import ApiException

config.load_kube_config(config_file=sys.argv[1])
core = client.CoreV1Api()

core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="py")))
namespaces = [ns.metadata.name for ns in core.list_namespace().items]
assert "py" in namespaces and "default" in namespaces, namespaces

config_map = client.V1ConfigMap(
    metadata=client.V1ObjectMeta(name="py-config", labels={"from": "python"}),
    data={"a": "1"},
)
created = core.create_namespaced_config_map("py", config_map)
assert created.metadata.uid and created.metadata.resource_version, created.metadata

listed = core.list_namespaced_config_map("py", label_selector="from=python")
assert [c.metadata.name for c in listed.items] == ["py-config"], listed.items

patched = core.patch_namespaced_config_map("py-config", "py", {"data": {"b": "2"}})
assert patched.data == {"a": "1", "b": "2"}, patched.data
assert core.read_namespaced_config_map("py-config", "py").data == {"a": "1", "b": "2"}

core.delete_namespaced_config_map("py-config", "py")
try:
    core.read_namespaced_config_map("py-config", "py")
    raise AssertionError("py-config still readable after delete")
except ApiException as e:
    assert e.status == 404, e

try:
    core.create_namespaced_config_map("py", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="Not_Valid")))
    raise AssertionError("invalid name accepted")
except ApiException as e:
    assert e.status == 422, e
print("python client ok")
"#;

#[tokio::test]
async fn python_kubernetes_client_creates_lists_patches_and_deletes() {
    let python = std::env::var("WEIR_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python).args(["-c", "import kubernetes"]).output();
    let importable = probe.as_ref().is_ok_and(|output| output.status.success());
    assert!(
        importable,
        "the Python `kubernetes` package is not importable with {python}: run `cargo xtask setup` \
         (or run the tests through `cargo xtask test`)\n{}",
        match &probe {
            Ok(output) => describe(output),
            Err(e) => format!("{python} did not start: {e}"),
        }
    );

    let server = TestServer::start(Backend::Embedded).await.expect("starting weir");
    let script = server.data_dir().join("client_test.py");
    std::fs::write(&script, SCRIPT).expect("writing the script");
    let mut run = Command::new(&python);
    run.arg(&script).arg(server.kubeconfig());
    let output = run_bounded(run, None, Duration::from_secs(120));
    assert!(
        output.status.success(),
        "the Python client script failed ({}):\n{}",
        output.status,
        describe(&output)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("python client ok"));
}
