//! The Kubernetes manifests in `deploy/kubernetes`, rendered as `kubectl apply -k` would
//! render them (`kubectl kustomize` of the base and of every overlay), parse as the API
//! objects they claim to be (with no API server here, this is as close as a test gets to
//! `kubectl apply --dry-run=client`), and the base's agent DaemonSet runs the one agent
//! binary that follows the node label, with what each dataplane needs from the host.
//!
//! Needs `kubectl` on PATH (or `KUBECTL` naming one); `scripts/test.sh` installs it.
//! `integration/python/test_deploy.py` checks the same renders against the Kubernetes
//! OpenAPI schemas and the binaries' flags.

use std::{path::Path, process::Command};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, StatefulSet},
    core::v1 as core,
    policy::v1::PodDisruptionBudget,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The kustomizations `kubectl apply -k` is pointed at.
const KUSTOMIZATIONS: [&str; 5] = [
    "base",
    "overlays/single-controller",
    "overlays/mtls",
    "overlays/node-pools",
    "overlays/controller-replicas",
];

/// `doc` parsed as `T` and written back.
fn roundtrip<T: DeserializeOwned + Serialize>(
    doc: serde_yaml::Value,
) -> Result<serde_json::Value, serde_yaml::Error> {
    let parsed: T = serde_yaml::from_value(doc)?;
    Ok(serde_json::to_value(parsed).expect("serializable"))
}

/// The objects `kubectl kustomize deploy/kubernetes/<kustomization>` renders.
fn documents(kustomization: &str) -> Vec<serde_yaml::Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(kustomization);
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{kubectl} kustomize` ({e}): install kubectl (scripts/test.sh does)")
        });
    assert!(
        output.status.success(),
        "`{kubectl} kustomize {dir:?}` failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{kustomization}: {e}"))
        })
        .collect()
}

/// Every object of every rendered kustomization parses as its kind and says nothing the
/// kind does not know: parsed and written back, it is what the render holds (a misspelt
/// field would be dropped on the way, and silently ignored by the API server).
#[test]
fn every_manifest_parses_as_its_kind() {
    for kustomization in KUSTOMIZATIONS {
        let docs = documents(kustomization);
        if kustomization == "base" {
            assert!(
                docs.iter().any(
                    |d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "switchyard-agent"
                ),
                "the base renders the agent DaemonSet"
            );
        }
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let original = serde_json::to_value(&doc).unwrap();
            let roundtrip = match kind.as_str() {
                "DaemonSet" => roundtrip::<DaemonSet>(doc),
                "Deployment" => roundtrip::<Deployment>(doc),
                "StatefulSet" => roundtrip::<StatefulSet>(doc),
                "PodDisruptionBudget" => roundtrip::<PodDisruptionBudget>(doc),
                "ConfigMap" => roundtrip::<core::ConfigMap>(doc),
                "Service" => roundtrip::<core::Service>(doc),
                "ServiceAccount" => roundtrip::<core::ServiceAccount>(doc),
                "Namespace" => roundtrip::<core::Namespace>(doc),
                "ClusterRole" => roundtrip::<ClusterRole>(doc),
                "ClusterRoleBinding" => roundtrip::<ClusterRoleBinding>(doc),
                "Role" => roundtrip::<Role>(doc),
                "RoleBinding" => roundtrip::<RoleBinding>(doc),
                other => panic!("{kustomization}: no check for kind {other}"),
            }
            .unwrap_or_else(|e| panic!("{kustomization}: {kind} {name}: {e}"));
            assert_eq!(
                roundtrip, original,
                "{kustomization}: {kind} {name} holds fields its kind does not know"
            );
        }
    }
}

#[test]
fn the_agent_daemonset_follows_the_node_label_and_keeps_its_state_on_the_host() {
    let daemonset: DaemonSet = documents("base")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .map(|d| serde_yaml::from_value(d).unwrap())
        .expect("a DaemonSet in the rendered base");
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
