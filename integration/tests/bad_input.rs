//! Bad input end to end: a real manifests folder with broken, invalid, orphaned and
//! duplicated objects feeds the real hub; the query API shows each problem while every
//! valid object stays in force.

use std::{path::Path, time::Duration};

use switchyard_controller::sources::manifests::ManifestSource;
use switchyard_integration::controller::TestController;
use switchyard_proto::v1::{self, controller_query_client::ControllerQueryClient};
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);

const NODES: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n";

fn service(name: &str, cluster_ip: &str, port: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
         spec:\n  clusterIP: {cluster_ip}\n  ports: [{{name: http, port: {port}}}]\n"
    )
}

fn slice(name: &str, service: &str, ips: &[&str]) -> String {
    let endpoints: Vec<String> = ips
        .iter()
        .map(|ip| format!("  - addresses: [\"{ip}\"]\n    nodeName: node-a\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{}",
        endpoints.concat()
    )
}

fn write(dir: &Path, file: &str, contents: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(tmp, dir.join(file)).unwrap();
}

/// Polls the query API until `check` accepts what it returns.
async fn eventually<T>(
    what: &str,
    mut fetch: impl AsyncFnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = fetch().await;
        if check(&value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn node_state(query: &mut ControllerQueryClient<Channel>) -> Vec<v1::Resource> {
    let request = v1::GetNodeStateRequest {
        node_name: "node-a".into(),
        ..Default::default()
    };
    match query.get_node_state(request).await {
        Ok(response) => response.into_inner().resources,
        Err(_) => vec![],
    }
}

async fn problems(query: &mut ControllerQueryClient<Channel>) -> Vec<(String, String, String)> {
    let response = query
        .list_source_problems(v1::ListSourceProblemsRequest::default())
        .await
        .unwrap();
    let mut problems: Vec<_> = response
        .into_inner()
        .problems
        .into_iter()
        .map(|p| {
            let file = Path::new(&p.origin)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (file, p.object, p.message)
        })
        .collect();
    problems.sort();
    problems
}

fn names(resources: &[v1::Resource]) -> Vec<&str> {
    resources.iter().map(|r| r.name.as_str()).collect()
}

fn endpoints(resources: &[v1::Resource], name: &str) -> Vec<String> {
    let resource = resources.iter().find(|r| r.name == name).expect(name);
    resource.service.as_ref().unwrap().ports[0]
        .cluster_endpoints
        .iter()
        .map(|e| e.ip.clone())
        .collect()
}

#[tokio::test]
async fn bad_manifests_are_reported_and_skipped_and_nothing_valid_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "nodes.yaml", NODES);
    write(
        root,
        "web.yaml",
        &format!(
            "{}---\n{}",
            service("web", "10.96.0.10", 80),
            slice("web-1", "web", &["10.244.0.1"])
        ),
    );
    // The same endpoint in two slices of one Service counts once.
    write(
        root,
        "api.yaml",
        &format!(
            "{}---\n{}---\n{}",
            service("api", "10.96.0.20", 443),
            slice("api-1", "api", &["10.244.0.5", "10.244.0.6"]),
            slice("api-2", "api", &["10.244.0.6"])
        ),
    );
    write(
        root,
        "orphan.yaml",
        &slice("ghost-1", "ghost", &["10.244.0.9"]),
    );
    write(root, "broken.yaml", "apiVersion: v1\nkind: [Service\n");
    write(root, "bad-ip.yaml", &service("bad-ip", "10.96.0.300", 80));
    write(
        root,
        "bad-port.yaml",
        &service("bad-port", "10.96.0.40", 70000),
    );

    let controller = TestController::start().await.unwrap();
    tokio::spawn(ManifestSource::new(root).run(controller.updates.clone()));
    let mut query = ControllerQueryClient::connect(controller.endpoint())
        .await
        .unwrap();

    let state = eventually(
        "the valid services",
        async || node_state(&mut query).await,
        |r| r.len() == 2,
    )
    .await;
    assert_eq!(
        names(&state),
        ["default/api", "default/web"],
        "no resource for the orphaned slice's Service"
    );
    assert_eq!(
        endpoints(&state, "default/api"),
        ["10.244.0.5", "10.244.0.6"]
    );

    let found = eventually(
        "three problems",
        async || problems(&mut query).await,
        |p| p.len() == 3,
    )
    .await;
    let files: Vec<_> = found.iter().map(|(f, _, _)| f.as_str()).collect();
    assert_eq!(files, ["bad-ip.yaml", "bad-port.yaml", "broken.yaml"]);
    assert!(found[0].2.contains("10.96.0.300"), "{}", found[0].2);
    assert!(found[1].2.contains("70000"), "{}", found[1].2);
    assert_eq!(found[2].1, "", "a syntax error is the whole file's problem");

    // Breaking a good file keeps its last good objects in force.
    write(
        root,
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: nope",
    );
    eventually(
        "web.yaml's problem",
        async || problems(&mut query).await,
        |p| p.iter().any(|(f, _, _)| f == "web.yaml"),
    )
    .await;
    assert_eq!(
        names(&node_state(&mut query).await),
        ["default/api", "default/web"]
    );

    // Fixing files clears their problems and brings their objects in.
    write(root, "broken.yaml", &service("fixed", "10.96.0.50", 80));
    write(
        root,
        "web.yaml",
        &format!(
            "{}---\n{}",
            service("web", "10.96.0.10", 80),
            slice("web-1", "web", &["10.244.0.2"])
        ),
    );
    let state = eventually(
        "the fixed services",
        async || node_state(&mut query).await,
        |r| r.len() == 3,
    )
    .await;
    assert_eq!(
        names(&state),
        ["default/api", "default/fixed", "default/web"]
    );
    eventually(
        "web's new endpoint",
        async || node_state(&mut query).await,
        |r| endpoints(r, "default/web") == ["10.244.0.2"],
    )
    .await;
    let left = eventually(
        "two problems left",
        async || problems(&mut query).await,
        |p| p.len() == 2,
    )
    .await;
    assert!(
        left.iter().all(|(f, _, _)| f.starts_with("bad-")),
        "{left:?}"
    );

    // The orphaned slice's Service appearing later brings it to life.
    write(root, "ghost.yaml", &service("ghost", "10.96.0.60", 80));
    let state = eventually(
        "ghost",
        async || node_state(&mut query).await,
        |r| r.len() == 4,
    )
    .await;
    assert_eq!(endpoints(&state, "default/ghost"), ["10.244.0.9"]);
}
