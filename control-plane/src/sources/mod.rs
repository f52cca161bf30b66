//! Where cluster objects come from: the Kubernetes API ([`kube`]) or a folder of
//! manifests ([`manifests`]). Both report to the store through a [`StoreSender`].

use std::time::SystemTime;

use tokio::sync::mpsc;

use crate::model::{Object, ObjectRef};

pub mod kube;
pub mod manifests;

/// Names where objects came from: a manifest file's path, or `kubernetes/<Kind>` for
/// one kind's watcher. Replacing an origin's objects never touches another origin's.
pub type Origin = String;

/// What a source tells the store.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreUpdate {
    /// The origin now holds exactly these objects (a manifest file read, a relist).
    Replace {
        origin: Origin,
        objects: Vec<Object>,
        at: SystemTime,
    },
    /// One object was added or modified.
    Upsert {
        origin: Origin,
        object: Object,
        at: SystemTime,
    },
    /// One object was deleted.
    Delete {
        origin: Origin,
        object: ObjectRef,
        at: SystemTime,
    },
    /// Something from this origin could not be used: `object` is `None` for the whole
    /// origin (a file that does not parse). The origin's last good objects stay.
    Problem {
        origin: Origin,
        object: Option<ObjectRef>,
        message: String,
    },
    /// Clears a problem reported earlier (`object: None` clears every problem of the origin).
    ClearProblem {
        origin: Origin,
        object: Option<ObjectRef>,
    },
    /// The origin's problems are now exactly these, each listed on its own even when
    /// several name the same object (duplicates found by the store stay).
    ReplaceProblems {
        origin: Origin,
        problems: Vec<(Option<ObjectRef>, String)>,
    },
    /// The source has sent everything of its first full read: from now on the store
    /// holds the whole cluster, and agents may be served.
    Synced,
}

/// Sending half of the store's update channel.
pub type StoreSender = mpsc::Sender<StoreUpdate>;
