//! The contract between the agent runtime and a dataplane (iptables, IPVS, eBPF):
//! apply a change, read back what the kernel holds, say what a Service should look like
//! in the kernel, and remove everything on request. Dataplanes add only kernel code.

use std::{collections::BTreeMap, sync::Arc};

use switchyard_proto::{
    state::{DataplaneKind, ServiceState},
    v1,
};

/// One Service the node must hold, with the version the controller sent for it. Cheap
/// to clone: the state is shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub version: u64,
    pub state: Arc<ServiceState>,
}

impl DesiredService {
    pub fn new(version: u64, state: ServiceState) -> Self {
        Self {
            version,
            state: Arc::new(state),
        }
    }
}

/// Everything the node must hold, by resource name (`namespace/name`). A persistent
/// map: a copy costs O(1) and a change O(log n), so the runtime keeps the previous
/// state for readers and for rollback without copying the node's Services.
pub type Desired = imbl::OrdMap<String, DesiredService>;

/// What an apply must change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Resources to add or replace; their state is in the [`Desired`] passed along.
    pub upserted: Vec<String>,
    /// Resources to remove, after the upserts are in place.
    pub removed: Vec<String>,
    /// Rewrite everything the dataplane owns from `desired` (startup, periodic full
    /// sync, drift repair), not only the named resources.
    pub full: bool,
}

impl Change {
    /// The resources an apply writes: every one of `desired` for a full sync, else the
    /// upserted ones.
    pub fn to_write<'a>(&'a self, desired: &'a Desired) -> Vec<&'a String> {
        if self.full {
            desired.keys().collect()
        } else {
            self.upserted.iter().collect()
        }
    }
}

/// One Service as read back from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgrammedService {
    /// The version the kernel objects were programmed from, if they record it.
    pub version: Option<u64>,
    /// The kernel objects, in the dataplane's notation (iptables-save lines, ipvsadm
    /// entries, map entries), sorted so that equal states compare equal.
    pub kernel_objects: Vec<String>,
}

/// Everything the dataplane finds in the kernel, by resource name.
pub type Programmed = BTreeMap<String, ProgrammedService>;

/// How an apply went: the resources that could not be programmed, with why. Every
/// resource not listed is in force when `apply` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub failed: BTreeMap<String, String>,
}

/// A failure of the dataplane as a whole (the kernel interface, not one resource).
/// Retryable: the runtime retries with backoff and keeps what the kernel holds.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// An external command failed (e.g. `iptables-restore`), with what it printed.
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    /// A system call or file operation failed.
    #[error("{operation}: {source}")]
    Io {
        operation: String,
        #[source]
        source: std::io::Error,
    },
    /// What the kernel returned could not be understood.
    #[error("cannot read back kernel state: {0}")]
    ReadBack(String),
}

/// The kernel-facing part of an agent. Methods block (they run external commands or
/// system calls); the runtime calls them off the async executor, one at a time.
pub trait Dataplane: Send + 'static {
    /// Which dataplane this is, as the agent reports itself to the controller.
    fn kind(&self) -> v1::Dataplane;

    /// Makes the kernel hold `desired` for every resource `change` names (every
    /// resource when `change.full`), leaving the others untouched. Traffic to Services
    /// not named must never be interrupted.
    fn apply(&mut self, desired: &Desired, change: &Change)
    -> Result<ApplyOutcome, DataplaneError>;

    /// What the kernel holds now.
    fn read_back(&mut self) -> Result<Programmed, DataplaneError>;

    /// The kernel objects `service` renders to, in the notation of [`Dataplane::read_back`]:
    /// the runtime compares the two to find drift.
    fn expected(&self, name: &str, service: &DesiredService) -> Vec<String>;

    /// Removes everything this dataplane ever installed (but not the connection-tracking
    /// hold: [`Dataplane::hold_connection_tracking`] decides that).
    fn cleanup(&mut self) -> Result<(), DataplaneError>;

    /// Whether this dataplane translates through the kernel's connection tracking
    /// (netfilter NAT, IPVS with `conntrack=1`). A connection it translated keeps its
    /// translation in a conntrack entry, which the kernel consults only while something
    /// in the network namespace uses connection tracking: when the last rule that does
    /// goes, conntrack stops seeing packets and such a connection loses its NAT.
    fn tracks_connections(&self) -> bool {
        false
    }

    /// Keeps connection tracking on in the namespace once this dataplane's own rules are
    /// gone (`hold`), or stops keeping it (see [`crate::netfilter::CONNTRACK_HOLD_CHAIN`]).
    /// Nothing to do for a dataplane that does not [track
    /// connections](Dataplane::tracks_connections).
    fn hold_connection_tracking(&mut self, hold: bool) -> Result<(), DataplaneError> {
        let _ = hold;
        Ok(())
    }

    /// Moves the node to dataplane `to` while traffic flows: programs `desired` with
    /// it, checks the kernel holds exactly that, then removes everything this one
    /// created (see [`crate::switch`]). `Ok(false)`: already `to`, or a dataplane that
    /// cannot become another, which is every one but [`crate::switch::Switchable`].
    fn switch_to(&mut self, to: DataplaneKind, desired: &Desired) -> Result<bool, DataplaneError> {
        let _ = (to, desired);
        Ok(false)
    }
}
