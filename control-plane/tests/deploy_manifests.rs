//! The Kubernetes manifests in `deploy/kubernetes` parse as the API objects they claim to
//! be (with no API server here, this is as close as a test gets to `kubectl apply
//! --dry-run=client`), and the agent's DaemonSet runs the one agent binary that follows
//! the node label, with what each dataplane needs from the host.

use std::path::Path;

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1 as core,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// `doc` parsed as `T` and written back.
fn roundtrip<T: DeserializeOwned + Serialize>(
    doc: serde_yaml::Value,
) -> Result<serde_json::Value, serde_yaml::Error> {
    let parsed: T = serde_yaml::from_value(doc)?;
    Ok(serde_json::to_value(parsed).expect("serializable"))
}

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

/// Every document of every file parses as its kind and says nothing the kind does not
/// know: parsed and written back, it is what the file holds (a misspelt field would be
/// dropped on the way, and silently ignored by the API server).
#[test]
fn every_manifest_parses_as_its_kind() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.contains(&"agent.yaml".to_string()), "{files:?}");
    for file in files {
        for doc in documents(&file) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let original = serde_json::to_value(&doc).unwrap();
            let roundtrip = match kind.as_str() {
                "DaemonSet" => roundtrip::<DaemonSet>(doc),
                "Deployment" => roundtrip::<Deployment>(doc),
                "ConfigMap" => roundtrip::<core::ConfigMap>(doc),
                "Service" => roundtrip::<core::Service>(doc),
                "ServiceAccount" => roundtrip::<core::ServiceAccount>(doc),
                "Namespace" => roundtrip::<core::Namespace>(doc),
                "ClusterRole" => roundtrip::<ClusterRole>(doc),
                "ClusterRoleBinding" => roundtrip::<ClusterRoleBinding>(doc),
                other => panic!("{file}: no check for kind {other}"),
            }
            .unwrap_or_else(|e| panic!("{file}: {kind}: {e}"));
            assert_eq!(
                roundtrip, original,
                "{file}: {kind} holds fields its kind does not know"
            );
        }
    }
}

#[test]
fn the_agent_daemonset_follows_the_node_label_and_keeps_its_state_on_the_host() {
    let daemonset: DaemonSet = documents("agent.yaml")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .map(|d| serde_yaml::from_value(d).unwrap())
        .expect("a DaemonSet in agent.yaml");
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let agent = &pod.containers[0];
    let args = agent.args.clone().unwrap_or_default();
    for wanted in [
        "--dataplane=auto",
        "--node-name=$(NODE_NAME)",
        "--controller=$(CONTROLLER)",
    ] {
        assert!(args.iter().any(|a| a == wanted), "{wanted} in {args:?}");
    }
    let host_paths: Vec<String> = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.host_path.map(|h| h.path))
        .collect();
    for path in [
        "/run/switchyard",
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/lib/modules",
    ] {
        assert!(
            host_paths.iter().any(|p| p == path),
            "{path} in {host_paths:?}"
        );
    }
    let state_dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--state-dir="))
        .expect("--state-dir");
    assert!(
        state_dir.starts_with("/run/switchyard"),
        "the state dir {state_dir} must be on the host path, or a restart loses it"
    );
}
