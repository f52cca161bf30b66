//! Live switching between dataplanes: which dataplane the node should use
//! ([`DataplanePolicy`]), a dataplane that can become another one while traffic flows
//! ([`Switchable`]), and the record of both kept beside the desired cache
//! ([`DataplaneRecord`]) so a restarted agent knows what the kernel holds.
//!
//! # The switch
//! [`Switchable::switch_to`] builds the new dataplane, programs the whole desired state
//! with it, reads the kernel back and checks it holds exactly that, and only then has the
//! old dataplane remove everything it created. If the new one fails at any step it
//! removes what it wrote and the old one stays in force. Both hold the same state for a
//! moment; which one a packet meets depends on the hook order, so during the overlap the
//! one that sees packets first serves them, and the other takes over the instant the
//! first goes (see the README's "Switching dataplanes" for each direction).
//!
//! Agent-core stays dataplane-agnostic: the agent binary hands [`Switchable`] a way to
//! build a dataplane by kind.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use switchyard_proto::{state::DataplaneKind, v1};

use crate::{
    dataplane::{
        ApplyOutcome, Change, Dataplane, DataplaneError, Desired, DesiredService, Programmed,
    },
    drift,
};

/// Which dataplane the node should use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataplanePolicy {
    /// Always this one (`--dataplane iptables|ipvs|ebpf`, or a per-dataplane binary).
    Fixed(DataplaneKind),
    /// The Node's `switchyard.io/dataplane` label, iptables without one
    /// (`--dataplane auto`).
    FollowLabel,
}

impl DataplanePolicy {
    /// The dataplane wanted when the Node's label is `label` (`None`: no label).
    pub fn wanted(self, label: Option<DataplaneKind>) -> DataplaneKind {
        match self {
            DataplanePolicy::Fixed(kind) => kind,
            DataplanePolicy::FollowLabel => label.unwrap_or(DataplaneKind::Iptables),
        }
    }
}

/// Builds a dataplane of a kind (opening its sockets, loading its programs; writing
/// nothing to the kernel).
pub type Factory =
    Box<dyn Fn(DataplaneKind) -> Result<Box<dyn Dataplane>, DataplaneError> + Send + 'static>;

/// A dataplane that can become another kind: delegates to the one in force.
pub struct Switchable {
    current: Box<dyn Dataplane>,
    build: Factory,
}

impl fmt::Debug for Switchable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Switchable")
            .field("current", &self.current.kind())
            .finish_non_exhaustive()
    }
}

impl Switchable {
    /// Starts with a dataplane of kind `initial`, built by `build`.
    pub fn new(initial: DataplaneKind, build: Factory) -> Result<Self, DataplaneError> {
        let current = build(initial)?;
        Ok(Self { current, build })
    }
}

/// Why a switch did not happen; the old dataplane stays in force.
fn refused(to: DataplaneKind, why: impl fmt::Display) -> DataplaneError {
    DataplaneError::Command {
        command: format!("switching to the {to} dataplane"),
        message: why.to_string(),
    }
}

impl Dataplane for Switchable {
    fn kind(&self) -> v1::Dataplane {
        self.current.kind()
    }

    fn apply(
        &mut self,
        desired: &Desired,
        change: &Change,
    ) -> Result<ApplyOutcome, DataplaneError> {
        self.current.apply(desired, change)
    }

    fn read_back(&mut self) -> Result<Programmed, DataplaneError> {
        self.current.read_back()
    }

    fn expected(&self, name: &str, service: &DesiredService) -> Vec<String> {
        self.current.expected(name, service)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.current.cleanup()
    }

    fn tracks_connections(&self) -> bool {
        self.current.tracks_connections()
    }

    fn hold_connection_tracking(&mut self, hold: bool) -> Result<(), DataplaneError> {
        self.current.hold_connection_tracking(hold)
    }

    fn switch_to(&mut self, to: DataplaneKind, desired: &Desired) -> Result<bool, DataplaneError> {
        if self.current.kind() == to.to_wire() {
            return Ok(false);
        }
        let mut next = (self.build)(to).map_err(|e| refused(to, e))?;
        let full = Change {
            upserted: desired.keys().cloned().collect(),
            removed: Vec::new(),
            full: true,
        };
        // Make: the new dataplane holds everything and reads back as it should…
        let verified = next
            .apply(desired, &full)
            .and_then(|outcome| match outcome.failed.first_key_value() {
                Some((name, error)) => Err(refused(
                    to,
                    format!(
                        "{} Services failed, {name} first: {error}",
                        outcome.failed.len()
                    ),
                )),
                None => Ok(()),
            })
            .and_then(|()| next.read_back())
            .and_then(|kernel| {
                let drift = drift::compare(desired, &kernel, |n, s| next.expected(n, s));
                match drift.first() {
                    None => Ok(()),
                    Some(d) => Err(refused(
                        to,
                        format!(
                            "{} Services read back wrong, {} first ({})",
                            drift.len(),
                            d.name,
                            d.kind
                        ),
                    )),
                }
            });
        if let Err(error) = verified {
            if let Err(cleanup) = next.cleanup() {
                tracing::warn!(%cleanup, "removing what the refused dataplane wrote failed");
            }
            return Err(error);
        }
        // …then break: the old one removes everything it created. Connections it
        // translated through conntrack keep their NAT only while conntrack stays on, so
        // when the new one uses none (eBPF) the old one first leaves a hold behind; a new
        // one that tracks connections keeps conntrack on itself, and removes the hold.
        let mut old = std::mem::replace(&mut self.current, next);
        let handing_over_conntrack = old.tracks_connections() && !self.current.tracks_connections();
        if handing_over_conntrack && let Err(error) = old.hold_connection_tracking(true) {
            tracing::warn!(%error, "cannot keep connection tracking on: connections the old dataplane translated may lose their translation");
        }
        if let Err(error) = old.cleanup() {
            tracing::error!(%error, "the new dataplane is in force but the old one left objects behind");
        }
        if self.current.tracks_connections()
            && let Err(error) = self.current.hold_connection_tracking(false)
        {
            tracing::warn!(%error, "cannot remove the connection-tracking hold");
        }
        Ok(true)
    }
}

/// What the kernel holds and what the label last said, kept in the state directory
/// beside the desired cache (`dataplane`, one `key value` per line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneRecord {
    /// The dataplane whose objects the kernel holds.
    pub in_force: Option<DataplaneKind>,
    /// The Node's `switchyard.io/dataplane` label as last received.
    pub label: Option<DataplaneKind>,
}

impl DataplaneRecord {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("dataplane")
    }

    /// The record in `state_dir`; empty when there is none or it cannot be read.
    pub fn load(state_dir: &Path) -> Self {
        let Ok(text) = std::fs::read_to_string(Self::path(state_dir)) else {
            return Self::default();
        };
        let mut record = Self::default();
        for line in text.lines() {
            let value = |v: &str| v.trim().parse::<DataplaneKind>().ok();
            match line.split_once(' ') {
                Some(("in-force", v)) => record.in_force = value(v),
                Some(("label", v)) => record.label = value(v),
                _ => {}
            }
        }
        record
    }

    /// Writes the record (atomically: a new file renamed over the old one).
    pub fn store(&self, state_dir: &Path) -> std::io::Result<()> {
        let mut text = String::new();
        if let Some(kind) = self.in_force {
            text.push_str(&format!("in-force {kind}\n"));
        }
        if let Some(kind) = self.label {
            text.push_str(&format!("label {kind}\n"));
        }
        std::fs::create_dir_all(state_dir)?;
        let path = Self::path(state_dir);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_follows_the_label_or_the_flag_and_defaults_to_iptables() {
        let follow = DataplanePolicy::FollowLabel;
        assert_eq!(follow.wanted(None), DataplaneKind::Iptables);
        assert_eq!(
            follow.wanted(Some(DataplaneKind::Ebpf)),
            DataplaneKind::Ebpf
        );
        let fixed = DataplanePolicy::Fixed(DataplaneKind::Ipvs);
        assert_eq!(fixed.wanted(Some(DataplaneKind::Ebpf)), DataplaneKind::Ipvs);
    }

    /// A dataplane that writes nothing and logs what the switch asks of it.
    struct Logged {
        kind: DataplaneKind,
        log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Logged {
        fn note(&self, what: &str) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} {what}", self.kind.name()));
        }
    }

    impl Dataplane for Logged {
        fn kind(&self) -> v1::Dataplane {
            self.kind.to_wire()
        }
        fn apply(&mut self, _: &Desired, _: &Change) -> Result<ApplyOutcome, DataplaneError> {
            Ok(ApplyOutcome::default())
        }
        fn read_back(&mut self) -> Result<Programmed, DataplaneError> {
            Ok(Programmed::new())
        }
        fn expected(&self, _: &str, _: &DesiredService) -> Vec<String> {
            Vec::new()
        }
        fn cleanup(&mut self) -> Result<(), DataplaneError> {
            self.note("cleanup");
            Ok(())
        }
        fn tracks_connections(&self) -> bool {
            self.kind != DataplaneKind::Ebpf
        }
        fn hold_connection_tracking(&mut self, hold: bool) -> Result<(), DataplaneError> {
            self.note(if hold { "hold" } else { "release" });
            Ok(())
        }
    }

    #[test]
    fn a_switch_to_ebpf_holds_conntrack_before_the_old_rules_go_and_netfilter_releases_it() {
        use DataplaneKind::{Ebpf, Iptables, Ipvs};
        let cases = [
            (Iptables, Ebpf, vec!["iptables hold", "iptables cleanup"]),
            (Ipvs, Ebpf, vec!["ipvs hold", "ipvs cleanup"]),
            (Ebpf, Ipvs, vec!["ebpf cleanup", "ipvs release"]),
            (Iptables, Ipvs, vec!["iptables cleanup", "ipvs release"]),
            (Ipvs, Iptables, vec!["ipvs cleanup", "iptables release"]),
        ];
        for (from, to, want) in cases {
            let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let built = log.clone();
            let build: Factory = Box::new(move |kind| {
                Ok(Box::new(Logged {
                    kind,
                    log: built.clone(),
                }))
            });
            let mut switchable = Switchable::new(from, build).unwrap();
            assert!(switchable.switch_to(to, &Desired::new()).unwrap());
            assert_eq!(*log.lock().unwrap(), want, "{from:?} to {to:?}");
        }
    }

    #[test]
    fn the_record_round_trips_and_a_missing_or_broken_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            DataplaneRecord::load(dir.path()),
            DataplaneRecord::default()
        );
        let record = DataplaneRecord {
            in_force: Some(DataplaneKind::Ipvs),
            label: Some(DataplaneKind::Ebpf),
        };
        record.store(dir.path()).unwrap();
        assert_eq!(DataplaneRecord::load(dir.path()), record);
        std::fs::write(dir.path().join("dataplane"), "in-force xdp\ngarbage\n").unwrap();
        assert_eq!(
            DataplaneRecord::load(dir.path()),
            DataplaneRecord::default()
        );
    }
}
