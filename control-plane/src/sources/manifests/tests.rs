//! Table tests of the per-file bookkeeping: what each read of a file sends to the store,
//! and what waits to settle.

use super::*;

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n";
const NODES: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n";
const SETTLE: Duration = Duration::from_secs(1);

fn at() -> SystemTime {
    SystemTime::UNIX_EPOCH
}

fn read(path: &Path, text: &str) -> Read {
    Read::Parsed {
        hash: Sha256::digest(text.as_bytes()).into(),
        parsed: parse_file(path, text.as_bytes()),
        modified: None,
    }
}

fn names(updates: &[StoreUpdate]) -> Vec<String> {
    updates
        .iter()
        .map(|u| match u {
            StoreUpdate::Replace { objects, .. } => format!(
                "replace [{}]",
                objects
                    .iter()
                    .map(|o| o.object_ref().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            StoreUpdate::ReplaceProblems { problems, .. } => format!("problems {}", problems.len()),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn a_new_file_is_sent_once_and_unchanged_content_sends_nothing() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/n.yaml");
    let now = Instant::now();
    let updates = files.update(path, read(path, NODE), now, at());
    assert_eq!(names(&updates), ["replace [Node node-a]"]);
    assert!(matches!(&updates[0], StoreUpdate::Replace { origin, .. } if origin == "/m/n.yaml"));
    assert_eq!(files.update(path, Read::Unchanged, now, at()), vec![]);
    assert_eq!(
        files.update(path, read(path, NODE), now, at()),
        vec![],
        "same objects"
    );
}

#[test]
fn a_broken_file_keeps_its_last_good_objects_and_every_problem_is_listed() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/n.yaml");
    let now = Instant::now();
    files.update(path, read(path, NODES), now, at());
    let broken = files.update(path, read(path, "kind: [\n"), now, at());
    assert_eq!(names(&broken), ["problems 1"], "objects stay in force");
    let two = files.update(
        path,
        read(path, "apiVersion: v1\n---\napiVersion: v1\n"),
        now,
        at(),
    );
    match &two[..] {
        [StoreUpdate::ReplaceProblems { problems, .. }] => {
            assert_eq!(
                problems.len(),
                2,
                "two problems without an object, both kept"
            );
            assert!(problems.iter().all(|(object, _)| object.is_none()));
        }
        other => panic!("{other:?}"),
    }
    let fixed = files.update(path, read(path, NODES), now, at());
    assert_eq!(names(&fixed), ["problems 0"]);
}

#[test]
fn a_bad_object_keeps_its_last_good_version_while_the_good_ones_change() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/s.yaml");
    let now = Instant::now();
    let service = |name: &str, port: u32| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: {port}}}]}}\n"
        )
    };
    files.update(
        path,
        read(
            path,
            &format!("{}---\n{}", service("a", 80), service("b", 80)),
        ),
        now,
        at(),
    );
    let updates = files.update(
        path,
        read(
            path,
            &format!("{}---\n{}", service("a", 81), service("b", 0)),
        ),
        now,
        at(),
    );
    match &updates[..] {
        [
            StoreUpdate::Replace { objects, .. },
            StoreUpdate::ReplaceProblems { problems, .. },
        ] => {
            let ports: Vec<_> = objects
                .iter()
                .map(|o| match o {
                    Object::Service(s) => (s.key.name.clone(), s.ports[0].port),
                    _ => unreachable!(),
                })
                .collect();
            assert_eq!(ports, [("a".to_string(), 81), ("b".to_string(), 80)]);
            assert_eq!(problems.len(), 1);
            assert_eq!(
                problems[0].0.as_ref().unwrap().to_string(),
                "Service default/b"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_file_caught_truncated_withdraws_nothing_once_it_is_written_in_full() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/n.yaml");
    let t0 = Instant::now();
    files.update(path, read(path, NODES), t0, at());
    // The writer truncated the file, and the source read it then.
    assert_eq!(files.update(path, read(path, ""), t0, at()), vec![]);
    assert_eq!(files.next_due(), Some(t0 + SETTLE));
    // Half written: one node of two.
    assert_eq!(
        files.update(path, read(path, NODE), t0 + SETTLE / 2, at()),
        vec![]
    );
    // Whole again before the settle period ends: nothing was ever withdrawn.
    assert_eq!(
        files.update(path, read(path, NODES), t0 + SETTLE * 2, at()),
        vec![]
    );
    assert_eq!(files.next_due(), None);
}

#[test]
fn a_removal_is_applied_once_the_file_has_read_the_same_for_the_settle_period() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/n.yaml");
    let t0 = Instant::now();
    files.update(path, read(path, NODES), t0, at());
    assert_eq!(files.update(path, read(path, NODE), t0, at()), vec![]);
    let due = files.next_due().unwrap();
    assert_eq!(files.due(t0), Vec::<PathBuf>::new());
    assert_eq!(files.due(due), [path.to_owned()]);
    assert_eq!(
        files.update(path, Read::Unchanged, t0 + SETTLE / 2, at()),
        vec![],
        "not yet"
    );
    let updates = files.update(path, Read::Unchanged, due, at());
    assert_eq!(names(&updates), ["replace [Node node-a]"]);
    assert_eq!(files.next_due(), None);
}

#[test]
fn a_deleted_file_is_emptied_after_the_settle_period_and_forgotten() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/n.yaml");
    let t0 = Instant::now();
    files.update(path, read(path, NODE), t0, at());
    assert_eq!(files.update(path, Read::Gone, t0, at()), vec![]);
    let updates = files.update(path, Read::Gone, t0 + SETTLE, at());
    assert_eq!(names(&updates), ["replace []"]);
    assert!(files.known.is_empty(), "nothing left of it");
    assert_eq!(files.update(path, Read::Gone, t0 + SETTLE, at()), vec![]);
}

#[test]
fn a_file_deleted_and_written_again_within_the_settle_period_withdraws_nothing() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/n.yaml");
    let t0 = Instant::now();
    files.update(path, read(path, NODE), t0, at());
    assert_eq!(files.update(path, Read::Gone, t0, at()), vec![]);
    assert_eq!(
        files.update(path, read(path, NODE), t0 + SETTLE / 2, at()),
        vec![]
    );
    assert_eq!(files.next_due(), None);
}

#[test]
fn a_pending_removal_is_dropped_when_the_folder_vanishes() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/n.yaml");
    let t0 = Instant::now();
    files.update(path, read(path, NODE), t0, at());
    files.update(path, Read::Gone, t0, at());
    files.cancel_pending();
    assert_eq!(files.next_due(), None);
    assert_eq!(files.known[path].held.len(), 1, "still held");
}

#[test]
fn an_unreadable_file_keeps_its_objects_and_is_read_again_in_full_when_readable() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/n.yaml");
    let now = Instant::now();
    files.update(path, read(path, NODE), now, at());
    let updates = files.update(
        path,
        Read::Unreadable("/m/n.yaml: not a regular file (a FIFO); skipped".into()),
        now,
        at(),
    );
    match &updates[..] {
        [StoreUpdate::ReplaceProblems { problems, .. }] => {
            assert_eq!(
                problems[0],
                (
                    None,
                    "/m/n.yaml: not a regular file (a FIFO); skipped".into()
                )
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(files.known_hash(path), None, "the next read parses again");
    assert_eq!(
        names(&files.update(path, read(path, NODE), now, at())),
        ["problems 0"]
    );
}

#[test]
fn a_syntax_error_after_good_documents_keeps_the_objects_it_may_hide() {
    let mut files = Files::new(SETTLE);
    let path = Path::new("/m/n.yaml");
    let now = Instant::now();
    files.update(path, read(path, NODES), now, at());
    // node-a is read, then the rest does not parse: node-b may be in there.
    let updates = files.update(
        path,
        read(path, &format!("{NODE}---\nkind: [\n")),
        now,
        at(),
    );
    assert_eq!(names(&updates), ["problems 1"]);
    assert_eq!(files.known[path].held.len(), 2);
    assert_eq!(files.next_due(), None, "nothing to remove");
}

#[test]
fn a_change_is_dated_by_the_files_modification_time_unless_it_cannot_be_trusted() {
    use std::time::{Duration, UNIX_EPOCH};
    let t = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    let (event, now) = (t(10_000), t(10_005));
    // Written just before the event: the write is the trigger.
    assert_eq!(super::trigger_time(Some(t(9_998)), event, now), t(9_998));
    // No time, one in the future, or one older than a second before the event (a file
    // moved in keeps its old time): the event is the trigger.
    assert_eq!(super::trigger_time(None, event, now), event);
    assert_eq!(super::trigger_time(Some(t(10_010)), event, now), event);
    assert_eq!(super::trigger_time(Some(t(8_000)), event, now), event);
    // Written after the event arrived (a second write in the burst): still trusted.
    assert_eq!(super::trigger_time(Some(t(10_003)), event, now), t(10_003));
}

#[test]
fn files_under_a_folder_are_its_own_and_not_a_siblings_with_the_same_prefix() {
    let mut files = Files::new(Duration::from_secs(1));
    for path in [
        "/m/a.yaml",
        "/m/b/x.yaml",
        "/m/b/y/z.yaml",
        "/m/b-c/w.yaml",
        "/m/bb.yaml",
    ] {
        files.known.insert(path.into(), FileState::default());
    }
    let under = |root: &str| {
        files
            .under(Path::new(root))
            .into_iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(under("/m/b"), ["/m/b/x.yaml", "/m/b/y/z.yaml"]);
    assert_eq!(under("/m/a.yaml"), ["/m/a.yaml"]);
    assert_eq!(under("/m").len(), 5);
    assert!(under("/n").is_empty());
}
