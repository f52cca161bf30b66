//! Drift between the desired state and what the kernel holds: a pure comparison
//! ([`compare`]); the runtime repairs what it finds with one apply naming exactly the
//! drifted resources (see `Agent::repair_drift`).

use std::fmt;

use switchyard_proto::format_version;

use crate::dataplane::{Desired, DesiredService, Programmed};

/// How one resource differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DriftKind {
    /// Desired, not in the kernel.
    Missing,
    /// In the kernel, not desired.
    Unexpected,
    /// In the kernel at another version, or its kernel objects are not what the desired
    /// version renders to.
    Differs,
}

impl fmt::Display for DriftKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriftKind::Missing => "missing",
            DriftKind::Unexpected => "unexpected",
            DriftKind::Differs => "differs",
        })
    }
}

/// One drifted resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    pub name: String,
    pub kind: DriftKind,
    pub detail: String,
}

/// Every resource where `programmed` (read back) differs from `desired`, by name.
/// `expected` renders a desired Service into kernel objects (`Dataplane::expected`).
pub fn compare(
    desired: &Desired,
    programmed: &Programmed,
    expected: impl Fn(&str, &DesiredService) -> Vec<String>,
) -> Vec<Drift> {
    let mut drift = Vec::new();
    for (name, service) in desired {
        let Some(kernel) = programmed.get(name) else {
            drift.push(Drift {
                name: name.clone(),
                kind: DriftKind::Missing,
                detail: format!(
                    "version {} is not in the kernel",
                    format_version(service.version)
                ),
            });
            continue;
        };
        if let Some(version) = kernel.version
            && version != service.version
        {
            drift.push(Drift {
                name: name.clone(),
                kind: DriftKind::Differs,
                detail: format!(
                    "kernel holds version {}, desired {}",
                    format_version(version),
                    format_version(service.version)
                ),
            });
            continue;
        }
        let want = expected(name, service);
        if want != kernel.kernel_objects {
            let extra = kernel
                .kernel_objects
                .iter()
                .filter(|o| !want.contains(o))
                .count();
            let absent = want
                .iter()
                .filter(|o| !kernel.kernel_objects.contains(o))
                .count();
            drift.push(Drift {
                name: name.clone(),
                kind: DriftKind::Differs,
                detail: format!(
                    "kernel objects differ: {absent} missing, {extra} unexpected (of {} expected)",
                    want.len()
                ),
            });
        }
    }
    for (name, kernel) in programmed {
        if !desired.contains_key(name) {
            drift.push(Drift {
                name: name.clone(),
                kind: DriftKind::Unexpected,
                detail: format!(
                    "{} kernel objects{}",
                    kernel.kernel_objects.len(),
                    kernel
                        .version
                        .map(|v| format!(" at version {}", format_version(v)))
                        .unwrap_or_default()
                ),
            });
        }
    }
    drift.sort_by(|a, b| a.name.cmp(&b.name));
    drift
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dataplane::ProgrammedService, state::ServiceState, testing::memory_objects};
    use switchyard_proto::{state::ServiceKey, v1};

    fn service(name: &str, version: u64) -> DesiredService {
        let (ns, n) = name.split_once('/').unwrap();
        let wire = v1::ServiceState {
            namespace: ns.into(),
            name: n.into(),
            ..Default::default()
        };
        let state = ServiceState::try_from(&wire).unwrap();
        assert_eq!(state.key, ServiceKey::new(ns, n));
        DesiredService::new(version, state)
    }

    fn programmed(name: &str, service: &DesiredService) -> ProgrammedService {
        ProgrammedService {
            version: Some(service.version),
            kernel_objects: memory_objects(name, service),
        }
    }

    #[test]
    fn drift_is_classified_as_missing_unexpected_or_differs() {
        let a = service("ns/a", 1);
        let b = service("ns/b", 2);
        let c = service("ns/c", 3);
        let stale_b = service("ns/b", 7);
        let mut tampered = programmed("ns/c", &c);
        tampered.kernel_objects.push("rogue rule".into());
        let mut unversioned = programmed("ns/a", &a);
        unversioned.version = None;

        struct Case {
            about: &'static str,
            desired: Vec<(&'static str, DesiredService)>,
            kernel: Vec<(&'static str, ProgrammedService)>,
            want: Vec<(&'static str, DriftKind)>,
        }
        let cases = [
            Case {
                about: "in sync",
                desired: vec![("ns/a", a.clone()), ("ns/b", b.clone())],
                kernel: vec![
                    ("ns/a", programmed("ns/a", &a)),
                    ("ns/b", programmed("ns/b", &b)),
                ],
                want: vec![],
            },
            Case {
                about: "a desired resource is not in the kernel",
                desired: vec![("ns/a", a.clone()), ("ns/b", b.clone())],
                kernel: vec![("ns/a", programmed("ns/a", &a))],
                want: vec![("ns/b", DriftKind::Missing)],
            },
            Case {
                about: "the kernel holds what nobody wants",
                desired: vec![("ns/a", a.clone())],
                kernel: vec![
                    ("ns/a", programmed("ns/a", &a)),
                    ("ns/b", programmed("ns/b", &b)),
                ],
                want: vec![("ns/b", DriftKind::Unexpected)],
            },
            Case {
                about: "the kernel holds another version",
                desired: vec![("ns/b", b.clone())],
                kernel: vec![("ns/b", programmed("ns/b", &stale_b))],
                want: vec![("ns/b", DriftKind::Differs)],
            },
            Case {
                about: "the kernel objects were tampered with",
                desired: vec![("ns/c", c.clone())],
                kernel: vec![("ns/c", tampered.clone())],
                want: vec![("ns/c", DriftKind::Differs)],
            },
            Case {
                about: "a kernel without versions is judged by its objects alone",
                desired: vec![("ns/a", a.clone())],
                kernel: vec![("ns/a", unversioned.clone())],
                want: vec![],
            },
            Case {
                about: "every kind at once, sorted by name",
                desired: vec![("ns/a", a.clone()), ("ns/c", c.clone())],
                kernel: vec![("ns/b", programmed("ns/b", &b)), ("ns/c", tampered.clone())],
                want: vec![
                    ("ns/a", DriftKind::Missing),
                    ("ns/b", DriftKind::Unexpected),
                    ("ns/c", DriftKind::Differs),
                ],
            },
        ];
        for case in cases {
            let desired: Desired = case
                .desired
                .into_iter()
                .map(|(n, s)| (n.to_string(), s))
                .collect();
            let kernel: Programmed = case
                .kernel
                .into_iter()
                .map(|(n, p)| (n.to_string(), p))
                .collect();
            let got: Vec<_> = compare(&desired, &kernel, memory_objects)
                .into_iter()
                .map(|d| (d.name, d.kind))
                .collect();
            let want: Vec<_> = case
                .want
                .into_iter()
                .map(|(n, k)| (n.to_string(), k))
                .collect();
            assert_eq!(got, want, "{}", case.about);
        }
    }
}
