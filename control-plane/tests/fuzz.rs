//! Property tests with a fixed budget for every parser a peer or a file reaches: the
//! manifests (bytes, generated documents, mutated examples, flow depth) and the
//! stream's requests (decoding, the first message, answers).
//!
//! Each property runs 256 cases by default (`PROPTEST_CASES` sets another budget, e.g.
//! for a long run before a release). Failures are not persisted to files: what a long
//! run finds is fixed and kept below as a named regression test.

use std::{collections::HashSet, path::Path, time::Instant};

use proptest::{collection::vec, prelude::*, test_runner::Config};
use prost::Message;
use switchyard_controller::{
    model::Object,
    server::delta::{MAX_NACK_ERRORS, MAX_NACK_MESSAGE, identify, read_answer},
    sources::manifests::{
        MAX_FILE_BYTES,
        parse::{MAX_PROBLEMS, flow_depth_exceeds, parse_file},
    },
};
use switchyard_proto::{
    names,
    state::ServiceKey,
    v1::{self, NodeIdentity, NodeStateRequest},
};

/// `cases` unless `PROPTEST_CASES` says otherwise; no failure files.
fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config.failure_persistence = None;
    config
}

/// Whatever a file holds, what comes out is valid: names as the API server takes them,
/// problems bounded, on one line, and soon.
fn check_parsed(name: &str, contents: &[u8]) {
    let started = Instant::now();
    let parsed = parse_file(Path::new(name), contents);
    assert!(
        started.elapsed().as_secs() < 5,
        "parsing {} bytes took {:?}",
        contents.len(),
        started.elapsed()
    );
    assert!(parsed.problems.len() <= MAX_PROBLEMS + 1);
    for problem in &parsed.problems {
        assert!(!problem.message.contains('\n'), "{:?}", problem.message);
        assert!(
            problem.message.chars().count() <= 2049,
            "{}",
            problem.message.len()
        );
    }
    for object in &parsed.objects {
        let r = object.object_ref();
        assert!(names::dns1123_subdomain(&r.name).is_ok(), "{r}");
        if let Object::Service(s) = object {
            assert!(names::dns1123_label(&s.key.namespace).is_ok());
            assert!(names::dns1035_label(&s.key.name).is_ok());
            for port in &s.ports {
                assert_ne!(port.port, 0);
                assert!(port.name.is_empty() || names::dns1123_label(&port.name).is_ok());
            }
            for ip in s
                .cluster_ips
                .iter()
                .chain(&s.external_ips)
                .chain(&s.load_balancer_ips)
            {
                assert!(
                    switchyard_controller::convert::special_ip(*ip).is_none(),
                    "{ip}"
                );
            }
        }
    }
}

const EXAMPLES: &[&str] = &[
    "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints: [{addresses: [10.244.0.5], nodeName: node-a, conditions: {ready: true}}]\nports: [{name: http, port: 8080}]\n",
    "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}}\n",
    "a: &x [1, 2, {b: *x}]\n---\n- |\n  text [\n- 'q''uoted' # [[[\n",
    r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}}"#,
];

/// Pieces documents are made of, with values a careless or hostile author might use.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("apiVersion: v1\n".to_string()),
        Just("apiVersion: discovery.k8s.io/v1\n".to_string()),
        Just("kind: Service\n".to_string()),
        Just("kind: EndpointSlice\n".to_string()),
        Just("kind: Node\n".to_string()),
        Just("kind: List\nitems:\n".to_string()),
        Just("---\n".to_string()),
        Just("metadata:\n".to_string()),
        Just("spec:\n".to_string()),
        Just("  ports: [{port: 80}]\n".to_string()),
        Just("- ".to_string()),
        Just("&a ".to_string()),
        Just("*a ".to_string()),
        Just("<<: *a\n".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just("|\n".to_string()),
        Just("\u{feff}".to_string()),
        "[a-zA-Z0-9 .:/_\"'#\\-]{0,20}".prop_map(|s| format!("  name: {s}\n")),
        "[a-zA-Z0-9 .:/_\"'#\\-]{0,20}".prop_map(|s| format!("  namespace: {s}\n")),
        any::<i64>().prop_map(|n| format!("  ports: [{{port: {n}, targetPort: {n}}}]\n")),
        "[0-9a-f:.]{0,20}".prop_map(|s| format!("  clusterIP: \"{s}\"\n")),
        "\\PC{0,16}".prop_map(|s| format!("{s}\n")),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_bytes_parse_without_panic_into_valid_objects(bytes in vec(any::<u8>(), 0..4096)) {
        check_parsed("any.yaml", &bytes);
        check_parsed("any.json", &bytes);
    }

    #[test]
    fn generated_documents_parse_into_valid_objects_or_problems(pieces in vec(piece(), 0..60)) {
        let text = pieces.concat();
        check_parsed("gen.yaml", text.as_bytes());
    }

    #[test]
    fn mutated_examples_parse_into_valid_objects_or_problems(
        example in 0..EXAMPLES.len(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..8),
    ) {
        let mut bytes = EXAMPLES[example].as_bytes().to_vec();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len() + 1);
            match kind {
                0 => bytes.insert(i, byte),
                1 if i < bytes.len() => { bytes.remove(i); }
                _ if i < bytes.len() => bytes[i] = byte,
                _ => {}
            }
        }
        let name = if example == EXAMPLES.len() - 1 { "m.json" } else { "m.yaml" };
        check_parsed(name, &bytes);
    }

    #[test]
    fn flow_depth_is_found_through_any_surrounding_text(
        depth in 0usize..12,
        before in "[a-z: ]{0,10}",
        inner in "[a-z0-9, ]{0,10}",
    ) {
        let text = format!("key: {before}\nvalue: {}{inner}{}\n", "[".repeat(depth), "]".repeat(depth));
        // A plain scalar before the collection never opens one.
        prop_assert_eq!(flow_depth_exceeds(&text, 5), depth > 5, "{:?}", text);
    }

    #[test]
    fn flow_depth_check_never_panics(text in "\\PC{0,200}") {
        let _ = flow_depth_exceeds(&text, 3);
    }

    #[test]
    fn any_first_message_is_refused_or_names_a_valid_node_and_valid_resources(
        node in prop_oneof!["[a-z0-9.-]{1,20}", "\\PC{0,40}"],
        version in "\\PC{0,300}",
        declared in vec((prop_oneof!["[a-z0-9-]{1,8}/[a-z][a-z0-9-]{0,8}", "\\PC{0,20}"], "\\PC{0,20}"), 0..20),
    ) {
        let request = NodeStateRequest {
            node: Some(NodeIdentity { node_name: node, dataplane: 1, agent_version: version }),
            initial_resource_versions: declared.into_iter().collect(),
            ..Default::default()
        };
        match identify(request) {
            Ok(declared) => {
                prop_assert!(names::dns1123_subdomain(&declared.identity.node_name).is_ok());
                prop_assert!(declared.identity.agent_version.chars().count() <= 129);
                prop_assert!(!declared.identity.agent_version.chars().any(char::is_control));
                for name in declared.held.keys() {
                    let (ns, n) = name.split_once('/').unwrap();
                    prop_assert!(names::dns1123_label(ns).is_ok() && names::dns1035_label(n).is_ok());
                }
            }
            Err(status) => {
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument);
                prop_assert!(!status.message().contains('\n'));
                prop_assert!(status.message().len() < 400, "{}", status.message());
            }
        }
    }

    #[test]
    fn any_bytes_on_the_stream_decode_or_fail_without_panic(bytes in vec(any::<u8>(), 0..512)) {
        if let Ok(request) = NodeStateRequest::decode(bytes.as_slice()) {
            let _ = identify(request);
        }
    }

    #[test]
    fn an_answer_is_kept_bounded_and_only_for_what_was_sent(
        sent in vec("[a-c]", 0..4),
        errors in vec(("[a-e]", "\\PC{0,600}"), 0..40),
    ) {
        let sent: HashSet<&str> = sent.iter().map(String::as_str).collect();
        let errors: Vec<v1::ResourceError> = errors
            .into_iter()
            .map(|(resource_name, message)| v1::ResourceError { resource_name, message })
            .collect();
        let answer = read_answer(&sent, &errors);
        prop_assert!(answer.kept.len() <= MAX_NACK_ERRORS);
        prop_assert!(answer.rejected.iter().all(|n| sent.contains(n)));
        for error in &answer.kept {
            prop_assert!(sent.contains(error.resource_name.as_str()));
            prop_assert!(error.message.chars().count() <= MAX_NACK_MESSAGE + 1);
            prop_assert!(!error.message.chars().any(char::is_control));
        }
        let relevant = errors.iter().filter(|e| sent.contains(e.resource_name.as_str())).count();
        prop_assert_eq!(answer.kept.len() + answer.omitted, relevant);
    }
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn two_services_never_share_a_resource_name(
        a in ("[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", "[a-z]([a-z0-9-]{0,8}[a-z0-9])?"),
        b in ("[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", "[a-z]([a-z0-9-]{0,8}[a-z0-9])?"),
    ) {
        // Only names the API server accepts reach a resource name; those map one to one.
        let valid = |(ns, name): &(String, String)| {
            names::dns1123_label(ns).is_ok() && names::dns1035_label(name).is_ok()
        };
        prop_assume!(valid(&a) && valid(&b));
        let key = |(ns, name): &(String, String)| ServiceKey::new(ns.clone(), name.clone());
        let (ka, kb) = (key(&a), key(&b));
        prop_assert_eq!(ka.to_string().parse::<ServiceKey>().unwrap(), ka.clone());
        prop_assert_eq!(ka.to_string() == kb.to_string(), a == b);
    }
}

#[test]
fn the_largest_file_allowed_parses_in_bounded_time() {
    // The largest file the reader accepts, of the densest flow nesting allowed.
    let one = format!("- {}1{}\n", "[".repeat(64), "]".repeat(64));
    let text = one.repeat(MAX_FILE_BYTES as usize / one.len());
    let started = Instant::now();
    let parsed = parse_file(Path::new("big.yaml"), text.as_bytes());
    assert!(
        !parsed.problems.is_empty(),
        "a list of lists is not an object"
    );
    assert!(
        started.elapsed().as_secs() < 60,
        "{:?} in a debug build",
        started.elapsed()
    );
}
