//! Table tests of manifest parsing: kinds, lists, namespaces, every problem on its own,
//! and the limits a hostile file meets.

use std::net::IpAddr;

use super::*;
use crate::model::{ServiceKey, ServiceType};

fn parse(name: &str, contents: &str) -> Result<Vec<Object>, Vec<FileProblem>> {
    parse_file(Path::new(name), contents.as_bytes()).into_result()
}

fn refs(objects: &[Object]) -> Vec<String> {
    objects.iter().map(|o| o.object_ref().to_string()).collect()
}

const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
";

const SLICE: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: [10.244.0.5]}]
ports: [{port: 8080}]
";

const NODE: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a}
";

#[test]
fn a_multi_document_file_yields_every_object_in_order() {
    let text = format!("{SERVICE}---{SLICE}---\n{NODE}---\n");
    let objects = parse("m.yaml", &text).unwrap();
    assert_eq!(
        refs(&objects),
        [
            "Service shop/web",
            "EndpointSlice default/web-1",
            "Node node-a"
        ]
    );
}

#[test]
fn services_and_slices_without_namespace_get_default_but_nodes_do_not() {
    let text = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, namespace: ignored}
";
    let objects = parse("m.yaml", text).unwrap();
    assert_eq!(refs(&objects), ["Service default/web", "Node node-a"]);
    let slices = parse("m.yaml", SLICE).unwrap();
    let Object::EndpointSlice(slice) = &slices[0] else {
        panic!("not a slice")
    };
    assert_eq!(slice.service, ServiceKey::new("default", "web"));
}

#[test]
fn a_list_and_a_typed_list_are_expanded() {
    let text = "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: node-a}}
- apiVersion: v1
  kind: List
  items:
  - {apiVersion: v1, kind: Node, metadata: {name: node-b}}
---
apiVersion: v1
kind: ServiceList
items:
- metadata: {name: web}
  spec: {ports: [{port: 80}]}
";
    let objects = parse("m.yaml", text).unwrap();
    assert_eq!(
        refs(&objects),
        ["Node node-a", "Node node-b", "Service default/web"]
    );
}

#[test]
fn a_json_file_is_read_as_json() {
    let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "api", "namespace": "shop"},
         "spec": {"type": "NodePort", "clusterIP": "10.96.0.30",
                  "ports": [{"port": 443, "nodePort": 30443}]}}]}"#;
    let objects = parse("m.json", text).unwrap();
    let [Object::Service(s)] = &objects[..] else {
        panic!("{objects:?}")
    };
    assert_eq!(s.service_type, ServiceType::NodePort);
    assert_eq!(s.cluster_ips, ["10.96.0.30".parse::<IpAddr>().unwrap()]);
    assert_eq!(s.ports[0].node_port, Some(30443));
}

#[test]
fn kinds_switchyard_does_not_read_are_ignored() {
    let text = format!(
        "
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: web}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: web}}
---{NODE}"
    );
    assert_eq!(refs(&parse("m.yaml", &text).unwrap()), ["Node node-a"]);
}

#[test]
fn typos_in_kind_or_api_version_are_problems_of_the_object_meant() {
    let cases = [
        (
            "apiVersion: v1\nkind: Servce\nmetadata: {name: web}\n",
            Some("Service default/web"),
            r#"kind "Servce" is not a kind switchyard reads; did you mean Service (apiVersion v1)?"#,
        ),
        (
            "apiVersion: v1\nkind: service\nmetadata: {name: web, namespace: shop}\n",
            Some("Service shop/web"),
            r#"kind "service" is not a kind switchyard reads; did you mean Service (apiVersion v1)?"#,
        ),
        (
            "apiVersion: v1\nkind: Nodes\nmetadata: {name: node-a}\n",
            Some("Node node-a"),
            "did you mean Node (apiVersion v1)?",
        ),
        (
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: old}\n",
            Some("EndpointSlice default/old"),
            r#"apiVersion "discovery.k8s.io/v1beta1" does not serve EndpointSlice: switchyard reads EndpointSlice as apiVersion discovery.k8s.io/v1"#,
        ),
        (
            "apiVersion: apps/v1\nkind: Service\nmetadata: {name: web}\n",
            Some("Service default/web"),
            r#"apiVersion "apps/v1" does not serve Service"#,
        ),
        (
            "apiVersion: v1\nkind: Servce\nmetadata: {name: \"we b\"}\n",
            None,
            "did you mean Service",
        ),
    ];
    for (text, object, message) in cases {
        let problems = parse("m.yaml", text).unwrap_err();
        assert_eq!(problems.len(), 1, "{text}: {problems:?}");
        assert_eq!(
            problems[0]
                .object
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            object,
            "{text}"
        );
        assert!(
            problems[0].message.contains(message),
            "{text}: {}",
            problems[0].message
        );
    }
}

#[test]
fn each_bad_document_is_its_own_problem_even_without_an_object() {
    let text = "apiVersion: v1\n---\nkind: Node\n---\n[1]\n---\n42\n";
    let problems = parse("x.yaml", text).unwrap_err();
    let messages: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "x.yaml: document 1: apiVersion and kind must be set",
            "x.yaml: document 2: apiVersion and kind must be set",
            "x.yaml: document 3: not an object with apiVersion and kind",
            "x.yaml: document 4: not an object with apiVersion and kind",
        ]
    );
}

#[test]
fn good_objects_of_a_file_with_problems_are_still_parsed() {
    let text = format!(
        "{NODE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{type: Odd}}\n"
    );
    let parsed = parse_file(Path::new("m.yaml"), text.as_bytes());
    assert_eq!(refs(&parsed.objects), ["Node node-a"]);
    assert_eq!(parsed.problems.len(), 1);
    assert!(!parsed.has_file_problem(), "the problem names its object");
}

#[test]
fn a_utf8_byte_order_mark_is_skipped_in_yaml_and_json() {
    let yaml = [b"\xEF\xBB\xBF".as_slice(), NODE.as_bytes()].concat();
    assert_eq!(
        refs(&parse_file(Path::new("n.yaml"), &yaml).objects),
        ["Node node-a"]
    );
    let json = [
        b"\xEF\xBB\xBF".as_slice(),
        br#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}}"#,
    ]
    .concat();
    let parsed = parse_file(Path::new("n.json"), &json);
    assert_eq!(parsed.problems, []);
    assert_eq!(refs(&parsed.objects), ["Node node-b"]);
}

#[test]
fn text_that_is_not_utf8_is_a_problem_of_the_file() {
    let parsed = parse_file(Path::new("b.yaml"), &[0xff, 0xfe, b'a']);
    assert!(parsed.objects.is_empty());
    assert!(parsed.has_file_problem());
    assert!(
        parsed.problems[0]
            .message
            .starts_with("b.yaml: not UTF-8 text"),
        "{:?}",
        parsed.problems
    );
}

/// A "billion laughs": each level repeats the previous one ten times through aliases.
fn alias_bomb(levels: usize) -> String {
    let mut text = String::from("a0: &a0 [\"lol lol lol lol lol lol lol lol lol lol\"]\n");
    for level in 1..=levels {
        let previous = format!("*a{}", level - 1);
        let items = vec![previous; 10].join(", ");
        text.push_str(&format!("a{level}: &a{level} [{items}]\n"));
    }
    text
}

#[test]
fn a_small_file_that_expands_to_a_gigabyte_stops_at_its_budget() {
    // 1,000 strings of 100 bytes under an anchor, then 10,000 aliases to it: about
    // 150 KB of text that would expand to 1 GB. serde_yaml's own repetition limit (100
    // alias jumps per event) lets this through; the expansion budget does not.
    let item = format!("\"{}\"", "x".repeat(98));
    let text = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\ndata:\n  a: &a [{}]\n  b: [{}]\n",
        vec![item; 1000].join(", "),
        vec!["*a"; 10_000].join(", ")
    );
    assert!(text.len() < 200_000, "{}", text.len());
    let started = std::time::Instant::now();
    let problems = parse("bomb.yaml", &text).unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].object, None);
    assert!(
        problems[0]
            .message
            .contains("expands to more than its budget"),
        "{}",
        problems[0].message
    );
}

#[test]
fn a_billion_laughs_is_refused_quickly() {
    // Nine levels, each repeating the previous ten times: 10^9 strings, under 1 KB.
    let text = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\ndata:\n  {}",
        alias_bomb(9).replace('\n', "\n  ")
    );
    assert!(text.len() < 1000, "{}", text.len());
    let started = std::time::Instant::now();
    let problems = parse("bomb.yaml", &text).unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].object, None);
}

#[test]
fn modest_aliases_within_the_budget_are_fine() {
    let text = "
apiVersion: v1
kind: Service
metadata: {name: web, labels: &labels {app: web, tier: front}}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}]
  selector: *labels
";
    assert_eq!(
        refs(&parse("m.yaml", text).unwrap()),
        ["Service default/web"]
    );
}

#[test]
fn nesting_deeper_than_the_limit_is_a_problem_and_never_overflows_the_stack() {
    let depth = MAX_DEPTH + 1;
    let text = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: a}}\nx: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let problems = parse("deep.yaml", &text).unwrap_err();
    assert!(
        problems[0].message.contains("nested deeper than 64 levels"),
        "{}",
        problems[0].message
    );
    // Far deeper input is refused before the YAML parser, whose time grows with the
    // square of the depth, sees it; JSON's parser stops at its own limit.
    let started = std::time::Instant::now();
    let text = format!("x: {}{}\n", "[".repeat(1_000_000), "]".repeat(1_000_000));
    let problems = parse("deeper.yaml", &text).unwrap_err();
    assert!(
        problems[0]
            .message
            .contains("nested deeper than 64 levels; not read"),
        "{problems:?}"
    );
    let text = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
    assert!(parse("deeper.json", &text).is_err());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn flow_depth_counts_collections_not_brackets_in_text() {
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let cases: Vec<(String, bool)> = vec![
        (format!("a: {}", deep(3)), false),
        (format!("a: {}", deep(4)), true),
        (format!("- {}", deep(4)), true),
        (format!("{}\n", deep(4)), true),
        (format!("a: {{b: {}}}", deep(3)), true),
        // Brackets inside text are not collections.
        ("a: '[[[[[['\nb: \"[[[[{{{{\"\n".into(), false),
        ("a: 'it''s [[[['\n".into(), false),
        ("a: \"say \\\" [[[[[\"\n".into(), false),
        ("a: b [[[[[[\n".into(), false),
        ("a: x[[[[[\n".into(), false),
        ("a: b # [[[[[[\n".into(), false),
        ("# [[[[[[\na: 1\n".into(), false),
        ("script: |\n  [[[[[[\n  {{{{{\nnext: 1\n".into(), false),
        ("- key: >-\n    [[[[[[\n".into(), false),
        // A line back at the parent's indentation ends the block scalar.
        (format!("script: |\n  text\n{}\n", deep(4)), true),
        // A quote in the middle of a plain scalar starts nothing.
        (format!("a: don't\nb: {}\n", deep(4)), true),
        // Collections spanning lines.
        ("a: [\n [\n  [\n   [1]]]]\n".into(), true),
        ("a: [\n [\n  [1]]]\n".into(), false),
    ];
    for (text, exceeds) in cases {
        assert_eq!(flow_depth_exceeds(&text, 3), exceeds, "{text:?}");
    }
}

#[test]
fn a_file_with_very_many_problems_lists_a_bounded_number() {
    let text = "apiVersion: v1\n---\n".repeat(MAX_PROBLEMS * 3);
    let problems = parse("many.yaml", &text).unwrap_err();
    assert_eq!(problems.len(), MAX_PROBLEMS + 1);
    assert_eq!(
        problems.last().unwrap().message,
        format!("many.yaml: {} more problems not listed", MAX_PROBLEMS * 2)
    );
}

#[test]
fn near_misses_are_told_apart_from_other_kinds() {
    for (api_version, kind, expected) in [
        ("v1", "Service", "known"),
        ("v1", "Servic", "near"),
        ("v1", "SERVICE", "near"),
        ("v2", "Service", "near"),
        ("discovery.k8s.io/v1", "EndpointSlices", "near"),
        ("v1", "Endpoints", "other"),
        ("apps/v1", "Deployment", "other"),
        ("v1", "Secret", "other"),
        ("v1", "Pod", "other"),
        ("v1", "Note", "near"),
        ("apps/v1", "Servce", "other"),
    ] {
        let got = match classify(api_version, kind) {
            KindMatch::Known(_) => "known",
            KindMatch::NearMiss(..) => "near",
            KindMatch::Other => "other",
        };
        assert_eq!(got, expected, "{api_version} {kind}");
    }
}

#[test]
fn empty_files_and_comment_only_documents_hold_nothing() {
    assert_eq!(parse("m.yaml", ""), Ok(vec![]));
    assert_eq!(parse("m.yaml", "# nothing yet\n---\n---\n"), Ok(vec![]));
    assert_eq!(parse("m.json", ""), Ok(vec![]));
}

#[test]
fn an_fqdn_slice_is_skipped_without_a_problem() {
    let text = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext, labels: {kubernetes.io/service-name: ext}}
addressType: FQDN
endpoints: [{addresses: [db.example.com]}]
";
    assert_eq!(parse("m.yaml", text), Ok(vec![]));
}

#[test]
fn a_yaml_syntax_error_is_a_problem_of_the_whole_file() {
    let text = format!("{NODE}---\napiVersion: v1\nkind: [Service\n");
    let problems = parse("dir/bad.yaml", &text).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].object, None);
    assert!(
        problems[0]
            .message
            .starts_with("dir/bad.yaml: document 2: not valid YAML: "),
        "{}",
        problems[0].message
    );
}

#[test]
fn a_json_syntax_error_is_a_problem_of_the_whole_file() {
    let problems = parse("bad.json", r#"{"apiVersion": "v1", "#).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].object, None);
    assert!(
        problems[0]
            .message
            .starts_with("bad.json: document 1: not valid JSON: "),
        "{}",
        problems[0].message
    );
}

#[test]
fn an_invalid_object_is_named_with_its_document_and_field() {
    let text = format!(
        "{NODE}---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  ports: [{{name: a, port: 80}}, {{port: 0, name: b}}]
"
    );
    let problems = parse("web.yaml", &text).unwrap_err();
    assert_eq!(
        problems,
        [FileProblem {
            object: Some(ObjectRef {
                kind: ObjectKind::Service,
                namespace: "default".into(),
                name: "web".into(),
            }),
            message: "web.yaml: document 2: Service default/web: spec.ports[1].port: 0 is not a port in 1..=65535".into(),
        }]
    );
}

#[test]
fn every_invalid_object_of_a_file_is_reported() {
    let text = "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {type: Odd}}
- {apiVersion: v1, kind: Node, metadata: {name: n}}
- {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: s}, addressType: IPv4, endpoints: []}
";
    let problems = parse("l.yaml", text).unwrap_err();
    let messages: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            r#"l.yaml: document 1: items[0]: Service default/a: spec.type: "Odd" is not one of "ClusterIP", "NodePort", "LoadBalancer", "ExternalName""#,
            r#"l.yaml: document 1: items[2]: EndpointSlice default/s: metadata.labels["kubernetes.io/service-name"]: must name the slice's Service"#,
        ]
    );
}

#[test]
fn a_badly_typed_field_is_a_problem_of_its_object() {
    let text = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: eighty}]}
";
    let problems = parse("web.yaml", text).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(
        problems[0]
            .object
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("Service shop/web")
    );
    assert!(
        problems[0]
            .message
            .starts_with("web.yaml: document 1: Service shop/web: "),
        "{}",
        problems[0].message
    );
}

#[test]
fn documents_without_kind_or_not_objects_are_problems() {
    let problems = parse(
        "x.yaml",
        "apiVersion: v1\nmetadata: {name: a}\n---\n- 1\n- 2\n",
    )
    .unwrap_err();
    let messages: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "x.yaml: document 1: apiVersion and kind must be set",
            "x.yaml: document 2: not an object with apiVersion and kind",
        ]
    );
}

#[test]
fn an_object_defined_twice_in_one_file_is_a_problem() {
    let text = format!("{NODE}---{NODE}");
    let problems = parse("n.yaml", &text).unwrap_err();
    assert_eq!(
        problems[0].message,
        "n.yaml: document 2: Node node-a: defined again (first in document 1)"
    );
}

#[test]
fn manifest_names_are_yaml_yml_or_json_and_not_hidden() {
    for (name, expected) in [
        ("a.yaml", true),
        ("dir/a.yml", true),
        ("a.json", true),
        (".a.yaml", false),
        (".a.yaml.swp", false),
        ("a.yaml~", false),
        ("a.yaml.tmp", false),
        ("4913", false),
        (".yaml", false),
        ("README.md", false),
    ] {
        assert_eq!(is_manifest(Path::new(name)), expected, "{name}");
    }
}
