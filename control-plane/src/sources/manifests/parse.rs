//! One manifest file's bytes → the objects it defines and every problem found, each
//! reported on its own. Pure; no I/O. Entry point: [`parse_file`].
//!
//! # Limits
//! A file is text a careless or hostile author controls, so parsing is bounded: at most
//! [`MAX_FILE_BYTES`] (checked by the reader), values nested at most [`MAX_DEPTH`]
//! deep, and what a file expands to (YAML aliases repeat whole subtrees: a 200 KB file
//! can describe gigabytes) at most [`expansion_budget`] bytes. Past a limit the rest of
//! the file is a problem; what was read before it stands.
//!
//! The YAML parser (libyaml's) takes time quadratic in the nesting of flow collections
//! (`[[[[…`: 80 KB of them take seconds, a few MB would take hours), and reads a whole
//! document before anything can stop it, so a YAML file whose flow collections nest
//! deeper than [`MAX_DEPTH`] is refused before it is parsed ([`flow_depth_exceeds`]).

use std::{collections::BTreeMap, fmt, path::Path};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use serde::{
    Deserialize as _,
    de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor},
};
use serde_json::{Map, Number, Value};

use crate::{
    convert,
    model::{Object, ObjectKind, ObjectRef},
};

/// Namespace given to Services and EndpointSlices that do not name one, as `kubectl
/// apply` would.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Largest manifest file read.
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// Deepest nesting of values accepted (Kubernetes objects need about 10).
pub const MAX_DEPTH: usize = 64;
/// Most problems reported for one file; one more says how many were left out.
pub const MAX_PROBLEMS: usize = 100;

/// What a value costs besides its text, in the expansion budget.
const VALUE_COST: usize = 16;

/// How many bytes a file of `len` bytes may expand to: far more than any file without
/// aliases needs (a value costs [`VALUE_COST`] and takes at least two bytes of text),
/// far less than an alias bomb.
pub fn expansion_budget(len: usize) -> usize {
    len.saturating_mul(VALUE_COST) + (1 << 20)
}

/// One thing wrong in a manifest file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem {
    /// The object at fault; `None` when the problem is not one object's (a syntax error,
    /// a document without `kind`, an unreadable file).
    pub object: Option<ObjectRef>,
    /// Names the file, the document (1-based) and the field.
    pub message: String,
}

/// What a file holds: every object that converted, in file order, and every problem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub problems: Vec<FileProblem>,
}

impl Parsed {
    /// The objects when there is no problem, else the problems.
    pub fn into_result(self) -> Result<Vec<Object>, Vec<FileProblem>> {
        if self.problems.is_empty() {
            Ok(self.objects)
        } else {
            Err(self.problems)
        }
    }

    /// Whether some problem belongs to no object, so that objects of the file may be
    /// missing from `objects` without being meant to go.
    pub fn has_file_problem(&self) -> bool {
        self.problems.iter().any(|p| p.object.is_none())
    }
}

/// A problem message on one line (a parser's error may quote the file's text) and at
/// most [`crate::store::MAX_PROBLEM_MESSAGE`] characters, before it is logged.
fn one_line(message: &str) -> String {
    switchyard_proto::names::one_line(message, crate::store::MAX_PROBLEM_MESSAGE)
}

/// Whether a file name is one the source reads: `*.yaml`, `*.yml`, `*.json`, not hidden
/// (editors' swap and backup files start with a dot).
pub fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

/// Parses and converts one manifest file: every document of a multi-document YAML
/// file (or a JSON stream), with `List` / `*List` objects expanded. A leading UTF-8 byte
/// order mark is skipped.
///
/// Only `v1` Service, `discovery.k8s.io/v1` EndpointSlice and `v1` Node are used; any
/// other kind is ignored (debug log), except near misses of these (a kind spelled
/// differently, one of them under another apiVersion), which are problems naming the
/// object as the author probably meant it. Services and EndpointSlices without a
/// namespace get [`DEFAULT_NAMESPACE`]. FQDN EndpointSlices are skipped.
pub fn parse_file(path: &Path, contents: &[u8]) -> Parsed {
    let mut parser = FileParser {
        path,
        parsed: Parsed::default(),
        seen: BTreeMap::new(),
    };
    let contents = contents.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(contents);
    let text = match std::str::from_utf8(contents) {
        Ok(text) => text,
        Err(e) => {
            parser.file_problem(format!("not UTF-8 text: {e}"));
            return parser.finish();
        }
    };
    if contents.len() as u64 > MAX_FILE_BYTES {
        parser.file_problem(format!("larger than {MAX_FILE_BYTES} bytes"));
        return parser.finish();
    }
    let mut budget = Budget {
        left: expansion_budget(text.len()),
        depth: 0,
    };
    let is_json = path.extension().is_some_and(|ext| ext == "json");
    if !is_json && flow_depth_exceeds(text, MAX_DEPTH) {
        parser.file_problem(format!(
            "flow collections ([ or {{) nested deeper than {MAX_DEPTH} levels; not read"
        ));
        return parser.finish();
    }
    if is_json {
        let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        for (index, document) in stream.enumerate() {
            match document {
                Ok(value) => parser.document(index + 1, value),
                Err(e) => {
                    parser.syntax_error(index + 1, &e);
                    break;
                }
            }
        }
    } else {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            match Bounded(&mut budget).deserialize(document) {
                Ok(value) => parser.document(index + 1, value),
                Err(e) => {
                    parser.syntax_error(index + 1, &e);
                    // After a syntax error the stream's document boundaries are unknown.
                    break;
                }
            }
        }
    }
    parser.finish()
}

struct FileParser<'a> {
    path: &'a Path,
    parsed: Parsed,
    /// Where each object was first defined, to report duplicates.
    seen: BTreeMap<ObjectRef, String>,
}

/// The kinds switchyard reads, as `(apiVersion, kind)`.
const KINDS: [(&str, &str, ObjectKind); 3] = [
    ("v1", "Service", ObjectKind::Service),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        ObjectKind::EndpointSlice,
    ),
    ("v1", "Node", ObjectKind::Node),
];

/// How a document's `apiVersion` and `kind` relate to what switchyard reads.
#[derive(Debug, PartialEq, Eq)]
enum KindMatch {
    /// One of [`KINDS`].
    Known(ObjectKind),
    /// Probably meant as this kind: a typo, or the right kind under another apiVersion.
    NearMiss(ObjectKind, String),
    /// Something else (a Deployment, a ConfigMap): not switchyard's business.
    Other,
}

/// Whether `a` is within a typo of `b`: an edit distance of at most 1, or 2 for names
/// of 7 characters or more (so `Pod` is not taken for `Node`, nor `Secret` for `Service`).
fn close(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let allowed = if b.len() >= 7 { 2 } else { 1 };
    if a.len().abs_diff(b.len()) > allowed || a.len() > 64 || b.len() > 64 {
        return false;
    }
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            current.push(
                (previous[j] + cost)
                    .min(previous[j + 1] + 1)
                    .min(current[j] + 1),
            );
        }
        previous = current;
    }
    previous[b.len()] <= allowed
}

/// Classifies `(apiVersion, kind)`. Pure.
fn classify(api_version: &str, kind: &str) -> KindMatch {
    for (version, name, object_kind) in KINDS {
        if (version, name) == (api_version, kind) {
            return KindMatch::Known(object_kind);
        }
    }
    for (version, name, object_kind) in KINDS {
        if kind == name {
            return KindMatch::NearMiss(
                object_kind,
                format!(
                    "apiVersion {} does not serve {name}: switchyard reads {name} as apiVersion {version}",
                    names_quote(api_version)
                ),
            );
        }
    }
    for (version, name, object_kind) in KINDS {
        if kind.eq_ignore_ascii_case(name) || (close(kind, name) && api_version == version) {
            return KindMatch::NearMiss(
                object_kind,
                format!(
                    "kind {} is not a kind switchyard reads; did you mean {name} (apiVersion {version})?",
                    names_quote(kind)
                ),
            );
        }
    }
    KindMatch::Other
}

fn names_quote(value: &str) -> String {
    switchyard_proto::names::quote_bounded(value)
}

impl FileParser<'_> {
    fn finish(mut self) -> Parsed {
        let problems = &mut self.parsed.problems;
        if problems.len() > MAX_PROBLEMS {
            let left_out = problems.len() - MAX_PROBLEMS;
            problems.truncate(MAX_PROBLEMS);
            problems.push(FileProblem {
                object: None,
                message: format!(
                    "{}: {left_out} more problems not listed",
                    self.path.display()
                ),
            });
        }
        self.parsed
    }

    fn file_problem(&mut self, message: String) {
        self.parsed.problems.push(FileProblem {
            object: None,
            message: one_line(&format!("{}: {message}", self.path.display())),
        });
    }

    fn syntax_error(&mut self, document: usize, error: &dyn fmt::Display) {
        let format = if self.path.extension().is_some_and(|e| e == "json") {
            "JSON"
        } else {
            "YAML"
        };
        self.file_problem(format!("document {document}: not valid {format}: {error}"));
    }

    fn problem(&mut self, object: Option<ObjectRef>, location: &str, message: impl fmt::Display) {
        let what = object
            .as_ref()
            .map(|o| format!("{o}: "))
            .unwrap_or_default();
        self.parsed.problems.push(FileProblem {
            message: one_line(&format!(
                "{}: {location}: {what}{message}",
                self.path.display()
            )),
            object,
        });
    }

    fn document(&mut self, index: usize, value: Value) {
        self.value(format!("document {index}"), value);
    }

    /// One object (or list of objects) at `location` ("document 2", "document 2: items[3]").
    fn value(&mut self, location: String, mut value: Value) {
        let Value::Object(fields) = &mut value else {
            if !value.is_null() {
                self.problem(None, &location, "not an object with apiVersion and kind");
            }
            // An empty document (`---` at the end, a file of comments) holds nothing.
            return;
        };
        let api_version = fields.get("apiVersion").and_then(Value::as_str);
        let kind = fields.get("kind").and_then(Value::as_str);
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            self.problem(None, &location, "apiVersion and kind must be set");
            return;
        };
        let (api_version, kind) = (api_version.to_owned(), kind.to_owned());

        if let Some(item_kind) = kind.strip_suffix("List")
            && let Some(items) = fields.get_mut("items")
        {
            let items = match items.take() {
                Value::Array(items) => items,
                Value::Null => Vec::new(),
                _ => {
                    self.problem(None, &location, "items: must be a list");
                    return;
                }
            };
            for (i, mut item) in items.into_iter().enumerate() {
                // Items of a typed list (`ServiceList`) may leave out their type.
                if let (Value::Object(item_fields), false) = (&mut item, item_kind.is_empty()) {
                    item_fields
                        .entry("apiVersion")
                        .or_insert_with(|| api_version.clone().into());
                    item_fields
                        .entry("kind")
                        .or_insert_with(|| item_kind.into());
                }
                self.value(format!("{location}: items[{i}]"), item);
            }
            return;
        }

        let object_kind = match classify(&api_version, &kind) {
            KindMatch::Known(kind) => kind,
            KindMatch::NearMiss(meant, message) => {
                if meant != ObjectKind::Node {
                    default_namespace(&mut value);
                }
                self.problem(raw_object_ref(meant, &value), &location, message);
                return;
            }
            KindMatch::Other => {
                tracing::debug!(
                    file = %self.path.display(),
                    %location,
                    api_version = %names_quote(&api_version),
                    kind = %names_quote(&kind),
                    "ignoring a kind switchyard does not use"
                );
                return;
            }
        };
        if object_kind != ObjectKind::Node {
            default_namespace(&mut value);
        }
        let object_ref = raw_object_ref(object_kind, &value);
        let converted = match object_kind {
            ObjectKind::Service => serde_json::from_value::<core::Service>(value)
                .map_err(|e| e.to_string())
                .and_then(|s| convert::service(&s).map_err(|e| e.to_string()))
                .map(|s| Some(Object::Service(s))),
            ObjectKind::EndpointSlice => serde_json::from_value::<discovery::EndpointSlice>(value)
                .map_err(|e| e.to_string())
                .and_then(|s| convert::endpoint_slice(&s).map_err(|e| e.to_string()))
                .map(|s| s.map(Object::EndpointSlice)),
            ObjectKind::Node => serde_json::from_value::<core::Node>(value)
                .map_err(|e| e.to_string())
                .and_then(|n| convert::node(&n).map_err(|e| e.to_string()))
                .map(|n| Some(Object::Node(n))),
        };
        match converted {
            Ok(Some(object)) => {
                let object_ref = object.object_ref();
                if let Some(first) = self.seen.get(&object_ref) {
                    let message = format!("defined again (first in {first})");
                    self.problem(Some(object_ref), &location, message);
                } else {
                    self.seen.insert(object_ref, location);
                    self.parsed.objects.push(object);
                }
            }
            Ok(None) => {
                tracing::debug!(file = %self.path.display(), %location, "ignoring an FQDN EndpointSlice");
            }
            Err(message) => self.problem(object_ref, &location, message),
        }
    }
}

/// Sets `metadata.namespace` to [`DEFAULT_NAMESPACE`] when it is absent or empty.
fn default_namespace(value: &mut Value) {
    let Value::Object(fields) = value else { return };
    let metadata = fields
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(metadata) = metadata {
        let namespace = metadata.entry("namespace").or_insert(Value::Null);
        if namespace.as_str().is_none_or(str::is_empty) {
            *namespace = DEFAULT_NAMESPACE.into();
        }
    }
}

/// The object a raw document describes, for problems found before conversion succeeds.
/// Names that no object could have (the API server would refuse them) name no object.
fn raw_object_ref(kind: ObjectKind, value: &Value) -> Option<ObjectRef> {
    use switchyard_proto::names;
    let metadata = value.get("metadata")?;
    let name = metadata.get("name")?.as_str()?;
    names::dns1123_subdomain(name).ok()?;
    let namespace = match kind {
        ObjectKind::Node => "",
        _ => {
            let namespace = metadata.get("namespace")?.as_str()?;
            names::dns1123_label(namespace).ok()?;
            namespace
        }
    };
    Some(ObjectRef {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// Whether YAML `text` opens flow collections (`[`, `{`) nested more than `limit` deep.
///
/// A small lexer, enough to tell flow indicators from text: quoted scalars, comments
/// and block scalars (`|`, `>`) are skipped, and in block context a bracket opens a
/// collection only where a value starts. Where it cannot tell, it counts (a bracket in
/// an odd place may be taken for a collection, never the other way round), so it errs
/// towards refusing. Linear time.
pub fn flow_depth_exceeds(text: &str, limit: usize) -> bool {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum State {
        Plain,
        Single,
        Double,
        Comment,
    }
    let mut state = State::Plain;
    let mut depth = 0usize;
    // The line being read: its indentation (None until its first non-blank character),
    // the last significant character, whether the last character was blank, and the
    // column where the last node on it started.
    let mut column = 0usize;
    let mut indent: Option<usize> = None;
    let mut previous_significant: Option<char> = None;
    let mut after_blank = true;
    let mut node_column = 0usize;
    // Block scalar: the column its content must pass, and the content's indentation
    // once known.
    let mut block: Option<(usize, Option<usize>)> = None;
    let mut skipping_line = false;
    let mut escaped = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' {
            if state == State::Comment {
                state = State::Plain;
            }
            column = 0;
            indent = None;
            after_blank = true;
            skipping_line = false;
            if depth == 0 && state == State::Plain {
                previous_significant = None;
            }
            continue;
        }
        let blank = c == ' ' || c == '\t' || c == '\r';
        if indent.is_none() && !blank {
            indent = Some(column);
            if let Some((parent, content)) = block {
                match content {
                    None if column > parent => {
                        block = Some((parent, Some(column)));
                        skipping_line = true;
                    }
                    Some(content) if column >= content => skipping_line = true,
                    _ => block = None,
                }
            }
        }
        column += 1;
        if skipping_line {
            continue;
        }
        match state {
            State::Comment => continue,
            State::Single => {
                if c == '\'' {
                    if chars.peek() == Some(&'\'') {
                        chars.next();
                        column += 1;
                    } else {
                        state = State::Plain;
                        previous_significant = Some(c);
                        after_blank = false;
                    }
                }
                continue;
            }
            State::Double => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    state = State::Plain;
                    previous_significant = Some(c);
                    after_blank = false;
                }
                continue;
            }
            State::Plain => {}
        }
        if blank {
            after_blank = true;
            continue;
        }
        let in_flow = depth > 0;
        let value_start = (after_blank
            && matches!(
                previous_significant,
                None | Some(':' | '-' | '?' | ',' | '[' | '{')
            ))
            || (in_flow && matches!(previous_significant, Some('[' | '{' | ',')) && !after_blank);
        if after_blank && !matches!(c, ':' | '|' | '>' | '#') {
            node_column = column - 1;
        }
        match c {
            '#' if after_blank => {
                state = State::Comment;
                continue;
            }
            '[' | '{' if in_flow || value_start => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            ']' | '}' if in_flow => depth -= 1,
            '\'' if value_start => state = State::Single,
            '"' if value_start => state = State::Double,
            '|' | '>' if !in_flow && value_start => {
                // Content must be indented past the node the scalar belongs to (`key`
                // in `- key: |`); taking the deepest start on the line skips no line
                // the parser would read as structure.
                block = Some((node_column, None));
                // The rest of the line is the block scalar's header.
                state = State::Comment;
            }
            _ => {}
        }
        previous_significant = Some(c);
        after_blank = false;
    }
    false
}

/// What is left of a file's expansion budget, and how deep the value being read is.
struct Budget {
    left: usize,
    depth: usize,
}

impl Budget {
    fn charge<E: de::Error>(&mut self, bytes: usize) -> Result<(), E> {
        match self.left.checked_sub(VALUE_COST + bytes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "the file expands to more than its budget (aliases repeating large parts?); \
                 reading stopped here"
            ))),
        }
    }
}

/// Deserializes a [`Value`] while charging the budget for every value and string and
/// refusing to nest deeper than [`MAX_DEPTH`].
struct Bounded<'b>(&'b mut Budget);

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.charge(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.0.charge(v.len())?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.charge(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let budget = self.0;
        budget.charge(0)?;
        if budget.depth >= MAX_DEPTH {
            return Err(de::Error::custom(format_args!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
        }
        budget.depth += 1;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Bounded(budget))? {
            items.push(item);
        }
        budget.depth -= 1;
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let budget = self.0;
        budget.charge(0)?;
        if budget.depth >= MAX_DEPTH {
            return Err(de::Error::custom(format_args!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
        }
        budget.depth += 1;
        let mut fields = Map::new();
        while let Some(key) = map.next_key_seed(Key(budget))? {
            let value = map.next_value_seed(Bounded(budget))?;
            fields.insert(key, value);
        }
        budget.depth -= 1;
        Ok(Value::Object(fields))
    }
}

/// A mapping key, read as a string (YAML's `1:` and `true:` keys become "1" and "true",
/// as a string field would read them), charged to the budget.
struct Key<'b>(&'b mut Budget);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        let key = String::deserialize(deserializer)?;
        self.0.charge(key.len())?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests;
