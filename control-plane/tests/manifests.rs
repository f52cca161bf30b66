//! The manifests source against a real folder and inotify, and the example manifests
//! shipped in `deploy/examples`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use switchyard_controller::{
    model::{Endpoint, EndpointSlice, Object, Protocol, ServiceType, TrafficPolicy},
    sources::{
        StoreUpdate,
        manifests::{ManifestError, ManifestSource, is_manifest, parse_file},
    },
};
use tokio::{
    sync::mpsc,
    time::{Instant, timeout},
};

/// Longest any expected update may take; generous so a loaded machine never fails the
/// test, while the reaction time itself is asserted separately.
const PATIENCE: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(400);

fn service(port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: {port}}}]
"
    )
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n";

/// Writes like an editor that saves atomically: a temporary file renamed over the target.
fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn next(rx: &mut mpsc::Receiver<StoreUpdate>) -> StoreUpdate {
    timeout(PATIENCE, rx.recv())
        .await
        .expect("no update in time")
        .expect("source stopped")
}

async fn assert_quiet(rx: &mut mpsc::Receiver<StoreUpdate>) {
    if let Ok(update) = timeout(QUIET, rx.recv()).await {
        panic!("unexpected update: {update:?}");
    }
}

fn origin(path: &Path) -> String {
    path.display().to_string()
}

fn service_ports(objects: &[Object]) -> Vec<u16> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::Service(s) => Some(s.ports[0].port),
            _ => None,
        })
        .collect()
}

/// How long a removal waits in these tests (the default is a second).
const SETTLE: Duration = Duration::from_millis(300);

fn source(root: &Path) -> ManifestSource {
    ManifestSource::new(root).with_settle(SETTLE)
}

/// Receives the initial read: one Replace per file, then `Synced`.
async fn initial_read(rx: &mut mpsc::Receiver<StoreUpdate>) -> BTreeMap<String, Vec<Object>> {
    let mut initial = BTreeMap::new();
    loop {
        match next(rx).await {
            StoreUpdate::Replace {
                origin, objects, ..
            } => {
                initial.insert(origin, objects);
            }
            StoreUpdate::Synced => return initial,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn problems_of(
    rx: &mut mpsc::Receiver<StoreUpdate>,
) -> (String, Vec<(Option<String>, String)>) {
    match next(rx).await {
        StoreUpdate::ReplaceProblems { origin, problems } => (
            origin,
            problems
                .into_iter()
                .map(|(o, m)| (o.map(|o| o.to_string()), m))
                .collect(),
        ),
        other => panic!("expected problems, got {other:?}"),
    }
}

#[tokio::test]
async fn the_source_reports_each_file_then_every_change_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let web = root.join("web.yaml");
    let nodes = root.join("cluster/nodes.yml");
    std::fs::create_dir(root.join("cluster")).unwrap();
    std::fs::write(&web, service(80)).unwrap();
    std::fs::write(&nodes, NODE).unwrap();
    std::fs::write(root.join("README.md"), "not a manifest").unwrap();

    let (tx, mut rx) = mpsc::channel(64);
    let source = tokio::spawn(source(&root).run(tx));

    // Initial read: one Replace per file, then Synced, nothing else.
    let initial = initial_read(&mut rx).await;
    assert_eq!(
        initial.keys().cloned().collect::<Vec<_>>(),
        [origin(&nodes), origin(&web)]
    );
    assert_eq!(service_ports(&initial[&origin(&web)]), [80]);
    assert_quiet(&mut rx).await;

    // An edit is seen quickly, as one Replace.
    let started = Instant::now();
    write_atomically(&web, &service(8080));
    match next(&mut rx).await {
        StoreUpdate::Replace {
            origin: o, objects, ..
        } => {
            assert_eq!(o, origin(&web));
            assert_eq!(service_ports(&objects), [8080]);
        }
        other => panic!("unexpected {other:?}"),
    }
    let reaction = started.elapsed();
    assert!(
        reaction < Duration::from_secs(1),
        "took {reaction:?} to see an edit"
    );
    assert_quiet(&mut rx).await;

    // Rewriting the same content changes nothing.
    std::fs::write(&web, service(8080)).unwrap();
    assert_quiet(&mut rx).await;

    // A broken file is reported, and its last good objects are not replaced.
    write_atomically(&web, "apiVersion: v1\nkind: [Service\n");
    let (o, problems) = problems_of(&mut rx).await;
    assert_eq!(o, origin(&web));
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].0, None);
    assert!(problems[0].1.contains("not valid YAML"), "{problems:?}");
    assert_quiet(&mut rx).await;

    // An invalid object names the object, which keeps its last good version.
    write_atomically(&web, &service(0));
    let (_, problems) = problems_of(&mut rx).await;
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].0.as_deref(), Some("Service shop/web"));
    assert!(
        problems[0]
            .1
            .contains("document 1: Service shop/web: spec.ports[0].port"),
        "{problems:?}"
    );
    assert_quiet(&mut rx).await;

    // Fixing it sends the objects and clears the problems.
    write_atomically(&web, &service(443));
    match next(&mut rx).await {
        StoreUpdate::Replace { objects, .. } => assert_eq!(service_ports(&objects), [443]),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(problems_of(&mut rx).await, (origin(&web), vec![]));

    // A file in a new subfolder is picked up.
    let extra = root.join("more/deeper/node-b.json");
    std::fs::create_dir_all(extra.parent().unwrap()).unwrap();
    write_atomically(
        &extra,
        r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}}"#,
    );
    match next(&mut rx).await {
        StoreUpdate::Replace {
            origin: o, objects, ..
        } => {
            assert_eq!(o, origin(&extra));
            assert_eq!(objects.len(), 1);
        }
        other => panic!("unexpected {other:?}"),
    }

    // Deleting a file empties its origin once the deletion has settled.
    let deleted = Instant::now();
    std::fs::remove_file(&web).unwrap();
    assert!(matches!(
        next(&mut rx).await,
        StoreUpdate::Replace { origin: o, objects, .. } if o == origin(&web) && objects.is_empty()
    ));
    assert!(deleted.elapsed() >= SETTLE, "{:?}", deleted.elapsed());

    // Removing a whole folder empties every file under it.
    std::fs::remove_dir_all(root.join("cluster")).unwrap();
    assert!(matches!(
        next(&mut rx).await,
        StoreUpdate::Replace { origin: o, objects, .. } if o == origin(&nodes) && objects.is_empty()
    ));
    assert_quiet(&mut rx).await;

    // The source ends once the store stops listening.
    drop(rx);
    let result = timeout(PATIENCE, source)
        .await
        .expect("source did not stop");
    result.unwrap().unwrap();
}

#[tokio::test]
async fn a_finished_write_is_read_at_once_and_one_still_open_waits_for_its_writer() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let web = root.join("web.yaml");
    std::fs::write(&web, service(80)).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    // A quiet period far longer than the test waits: only a complete file is read early.
    let source = tokio::spawn(source(&root).with_debounce(Duration::from_secs(30)).run(tx));
    initial_read(&mut rx).await;

    // Written and closed: read without waiting for the folder to stay quiet, and dated
    // by the file's modification time.
    std::fs::write(&web, service(81)).unwrap();
    let modified = std::fs::metadata(&web).unwrap().modified().unwrap();
    match next(&mut rx).await {
        StoreUpdate::Replace { objects, at, .. } => {
            assert_eq!(service_ports(&objects), [81]);
            assert_eq!(
                at, modified,
                "the trigger time is the file's modification time"
            );
        }
        other => panic!("expected the edit, got {other:?}"),
    }

    // Half written and still open: nothing is read until the writer closes the file.
    let mut file = std::fs::File::create(&web).unwrap();
    let text = service(82);
    let (head, tail) = text.split_at(text.len() / 2);
    file.write_all(head.as_bytes()).unwrap();
    file.flush().unwrap();
    assert_quiet(&mut rx).await;
    file.write_all(tail.as_bytes()).unwrap();
    drop(file);
    match next(&mut rx).await {
        StoreUpdate::Replace { objects, .. } => assert_eq!(service_ports(&objects), [82]),
        other => panic!("expected the finished edit, got {other:?}"),
    }
    source.abort();
}

#[tokio::test]
async fn a_file_truncated_then_written_withdraws_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let nodes = root.join("nodes.yaml");
    let two = format!("{NODE}---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-b}}\n");
    std::fs::write(&nodes, &two).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let _source = tokio::spawn(source(&root).run(tx));
    initial_read(&mut rx).await;

    // What `>` in a shell or a non-atomic save does: truncate, then write, with the
    // source reading in between.
    std::fs::File::create(&nodes).unwrap();
    tokio::time::sleep(SETTLE / 3).await;
    std::fs::write(&nodes, NODE).unwrap();
    tokio::time::sleep(SETTLE / 3).await;
    std::fs::write(&nodes, &two).unwrap();
    assert_quiet(&mut rx).await;
    tokio::time::sleep(SETTLE).await;
    assert_quiet(&mut rx).await;
}

#[tokio::test]
async fn a_deleted_folder_keeps_its_state_is_reported_and_is_watched_again_when_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap().join("manifests");
    std::fs::create_dir(&root).unwrap();
    let web = root.join("web.yaml");
    let nodes = root.join("nodes.yaml");
    std::fs::write(&web, service(80)).unwrap();
    std::fs::write(&nodes, NODE).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let _source = tokio::spawn(source(&root).run(tx));
    initial_read(&mut rx).await;

    std::fs::remove_dir_all(&root).unwrap();
    let (o, problems) = problems_of(&mut rx).await;
    assert_eq!(o, origin(&root));
    assert!(
        problems[0].1.contains("the manifests folder is gone"),
        "{problems:?}"
    );
    // Well past the settle period: nothing was withdrawn.
    tokio::time::sleep(SETTLE * 2).await;
    assert_quiet(&mut rx).await;

    // Recreated, with web changed and nodes.yaml left out.
    std::fs::create_dir(&root).unwrap();
    write_atomically(&web, &service(8080));
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(next(&mut rx).await);
    }
    assert!(
        seen.contains(&StoreUpdate::ReplaceProblems {
            origin: origin(&root),
            problems: vec![]
        }),
        "{seen:?}"
    );
    assert!(seen.iter().any(|u| matches!(u,
        StoreUpdate::Replace { origin: o, objects, .. } if o == &origin(&web) && service_ports(objects) == [8080])), "{seen:?}");
    assert!(seen.iter().any(|u| matches!(u,
        StoreUpdate::Replace { origin: o, objects, .. } if o == &origin(&nodes) && objects.is_empty())), "{seen:?}");

    // Watched again: an edit is seen.
    write_atomically(&web, &service(9090));
    assert!(matches!(
        next(&mut rx).await,
        StoreUpdate::Replace { objects, .. } if service_ports(&objects) == [9090]
    ));
}

#[tokio::test]
async fn a_folder_swapped_by_rename_is_watched_and_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let root = base.join("manifests");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("web.yaml"), service(80)).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let _source = tokio::spawn(source(&root).run(tx));
    initial_read(&mut rx).await;

    let next_version = base.join("manifests.new");
    std::fs::create_dir(&next_version).unwrap();
    std::fs::write(next_version.join("web.yaml"), service(8080)).unwrap();
    std::fs::rename(&root, base.join("manifests.old")).unwrap();
    std::fs::rename(&next_version, &root).unwrap();
    let mut ports = None;
    while ports.is_none() {
        if let StoreUpdate::Replace { objects, .. } = next(&mut rx).await {
            ports = Some(service_ports(&objects));
        }
    }
    assert_eq!(ports.unwrap(), [8080]);

    // The old folder is not watched any more; the new one is.
    std::fs::write(base.join("manifests.old/web.yaml"), service(1)).unwrap();
    write_atomically(&root.join("web.yaml"), &service(9090));
    loop {
        match next(&mut rx).await {
            StoreUpdate::Replace { objects, .. } => {
                assert_eq!(service_ports(&objects), [9090]);
                break;
            }
            StoreUpdate::ReplaceProblems { problems, .. } if problems.is_empty() => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn special_files_and_symlink_loops_are_reported_and_never_block_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::write(root.join("web.yaml"), service(80)).unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    let _source = tokio::spawn(source(&root).run(tx));
    initial_read(&mut rx).await;

    let fifo = root.join("fifo.yaml");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo (coreutils) runs");
    assert!(status.success());
    let (o, problems) = problems_of(&mut rx).await;
    assert_eq!(o, origin(&fifo));
    assert!(
        problems[0].1.contains("not a regular file (a FIFO)"),
        "{problems:?}"
    );

    std::os::unix::fs::symlink("/dev/zero", root.join("zero.yaml")).unwrap();
    let (_, problems) = problems_of(&mut rx).await;
    assert!(problems[0].1.contains("character device"), "{problems:?}");

    std::os::unix::fs::symlink(&root, root.join("again")).unwrap();
    let (o, problems) = problems_of(&mut rx).await;
    assert_eq!(o, origin(&root.join("again")));
    assert!(problems[0].1.contains("symlink loop"), "{problems:?}");

    // Still reading: an edit is seen.
    write_atomically(&root.join("web.yaml"), &service(8080));
    loop {
        match next(&mut rx).await {
            StoreUpdate::Replace { objects, .. } => {
                assert_eq!(service_ports(&objects), [8080]);
                break;
            }
            // A rescan may report the same problems again: they are replaced, not added.
            StoreUpdate::ReplaceProblems { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_config_map_volume_update_is_seen_through_its_symlinks() {
    // The layout kubelet gives a ConfigMap volume: visible symlinks into `..data`, which
    // is itself a symlink to a timestamped folder swapped atomically on update.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir(root.join("..2026_01_15_09_30_00.1")).unwrap();
    std::fs::write(root.join("..2026_01_15_09_30_00.1/web.yaml"), service(80)).unwrap();
    std::os::unix::fs::symlink("..2026_01_15_09_30_00.1", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/web.yaml", root.join("web.yaml")).unwrap();
    let web = root.join("web.yaml");

    let (tx, mut rx) = mpsc::channel(64);
    let _source = tokio::spawn(source(&root).run(tx));
    let initial = initial_read(&mut rx).await;
    assert_eq!(service_ports(&initial[&origin(&web)]), [80]);
    assert_quiet(&mut rx).await;

    std::fs::create_dir(root.join("..2026_01_15_09_45_00.2")).unwrap();
    std::fs::write(root.join("..2026_01_15_09_45_00.2/web.yaml"), service(8080)).unwrap();
    std::os::unix::fs::symlink("..2026_01_15_09_45_00.2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_01_15_09_30_00.1")).unwrap();

    match next(&mut rx).await {
        StoreUpdate::Replace {
            origin: o, objects, ..
        } => {
            assert_eq!(o, origin(&web));
            assert_eq!(service_ports(&objects), [8080]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_quiet(&mut rx).await;

    // Hidden files (an editor's swap file) are not manifests.
    std::fs::write(root.join(".web.yaml.swp"), "kind: [").unwrap();
    assert_quiet(&mut rx).await;
}

#[tokio::test]
async fn a_missing_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let (tx, _rx) = mpsc::channel(1);
    let error = ManifestSource::new(&missing).run(tx).await.unwrap_err();
    assert!(matches!(&error, ManifestError::Missing { dir } if dir == &missing));
    assert_eq!(
        error.to_string(),
        format!("manifests folder {} does not exist", missing.display())
    );
}

#[tokio::test]
async fn a_file_instead_of_a_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web.yaml");
    std::fs::write(&file, NODE).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let error = ManifestSource::new(&file).run(tx).await.unwrap_err();
    assert!(
        matches!(error, ManifestError::NotADirectory { .. }),
        "{error}"
    );
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn example_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            example_files(&path, out);
        } else if is_manifest(&path) {
            out.push(path);
        }
    }
}

fn example_objects() -> Vec<Object> {
    let mut files = Vec::new();
    example_files(&examples_dir(), &mut files);
    files.sort();
    assert!(files.len() >= 5, "examples missing: {files:?}");
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "json"))
    );
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read(&file).unwrap();
        match parse_file(&file, &text).into_result() {
            Ok(found) => objects.extend(found),
            Err(problems) => panic!("{problems:#?}"),
        }
    }
    objects
}

#[test]
fn every_example_manifest_parses_without_problems() {
    example_objects();
}

#[test]
fn the_examples_cover_what_the_readme_promises() {
    let objects = example_objects();
    let mut services = BTreeMap::new();
    let mut slices: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    for object in &objects {
        match object {
            Object::Service(s) => {
                services.insert(s.key.to_string(), s);
            }
            Object::EndpointSlice(s) => slices.entry(s.service.to_string()).or_default().push(s),
            Object::Node(n) => {
                nodes.insert(n.name.as_str(), n.zone.as_deref());
            }
        }
    }
    assert_eq!(
        nodes,
        BTreeMap::from([
            ("node-a", Some("zone-1")),
            ("node-b", Some("zone-1")),
            ("node-c", Some("zone-2"))
        ])
    );
    let service = |name: &str| *services.get(name).unwrap_or_else(|| panic!("no {name}"));
    let endpoints =
        |name: &str| -> Vec<&Endpoint> { slices[name].iter().flat_map(|s| &s.endpoints).collect() };

    assert_eq!(endpoints("shop/web").len(), 3);
    assert_eq!(service("shop/api").cluster_ips.len(), 2);
    let families: BTreeSet<_> = slices["shop/api"]
        .iter()
        .map(|s| s.address_family)
        .collect();
    assert_eq!(families.len(), 2);
    let dns_ports: BTreeSet<_> = slices["kube-system/kube-dns"]
        .iter()
        .map(|s| s.ports.iter().find(|p| p.name == "dns").unwrap().port)
        .collect();
    assert_eq!(dns_ports, BTreeSet::from([53, 5353]));
    assert_eq!(
        service("kube-system/kube-dns").ports[0].protocol,
        Protocol::Udp
    );
    assert_eq!(service("shop/checkout").service_type, ServiceType::NodePort);
    let lb = service("ingress-nginx/ingress-nginx-controller");
    assert_eq!(lb.service_type, ServiceType::LoadBalancer);
    assert_eq!(lb.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(lb.health_check_node_port, Some(32100));
    assert_eq!(lb.load_balancer_ips.len(), 1);
    assert_eq!(lb.load_balancer_source_ranges.len(), 2);
    assert_eq!(service("shop/partner-gateway").external_ips.len(), 1);
    assert_eq!(
        service("monitoring/log-collector").internal_traffic_policy,
        TrafficPolicy::Local
    );
    assert_eq!(service("shop/cart").session_affinity_timeout, Some(1800));
    assert!(
        endpoints("shop/orders")
            .iter()
            .all(|e| !e.ready && e.terminating)
    );
    assert!(endpoints("shop/orders").iter().any(|e| e.serving));
    assert!(
        endpoints("shop/catalog")
            .iter()
            .all(|e| !e.zone_hints.is_empty())
    );
    assert_eq!(
        service("telecom/diameter").ports[0].protocol,
        Protocol::Sctp
    );
    assert!(service("data/postgres").headless);
    assert_eq!(
        service("mesh/mesh-gateway").proxy_name.as_deref(),
        Some("other")
    );
    assert!(endpoints("shop/reports").is_empty());
}
