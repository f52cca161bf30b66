//! The one writer of kernel state: the desired cache and every call into the dataplane
//! (stream deltas, drift repair, full syncs), serialized, each off the async executor.
//!
//! The desired cache holds exactly what the kernel was successfully programmed with, so
//! the versions the agent declares on reconnect are the versions it applied.
//!
//! Cost: a delta costs what it changes, not the node's Service count: the desired map
//! is persistent (readers keep the previous snapshot at O(1)), and the cache file takes
//! an appended record per changed resource (see [`crate::cache`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use switchyard_proto::{state::DataplaneKind, v1};
use tokio::time::Instant;

use crate::{
    cache::{CacheFile, Reconciled, reconcile},
    dataplane::{Change, Dataplane, DataplaneError, Desired, DesiredService, Programmed},
    drift::{self, Drift, DriftKind},
    health::ProxyHealth,
    healthcheck::HealthChecks,
    metrics::Metrics,
    switch::{DataplanePolicy, DataplaneRecord},
};

/// What an apply that the kernel took was, for the bookkeeping after it.
#[derive(Clone, Copy, Debug)]
enum Committed<'a> {
    /// A delta naming these resources: only they can have changed.
    Delta(&'a [String]),
    /// A drift repair: the desired state is unchanged.
    Repair,
    /// A full sync: the desired state is unchanged.
    FullSync,
}

/// When and how the last apply went, for the query API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyTiming {
    pub at: SystemTime,
    pub duration: Duration,
    pub resources: u32,
    pub full_sync: bool,
}

/// What one delta did.
#[derive(Debug, Default)]
pub(crate) struct DeltaReport {
    /// Resources that could not be programmed, with why.
    pub failed: BTreeMap<String, String>,
    /// Resources now in force.
    pub applied: u32,
    /// How long the dataplane's apply took.
    pub duration: Duration,
    /// When the kernel held the change (the dataplane's apply returned).
    pub kernel_done: Option<SystemTime>,
}

struct Authoritative {
    desired: Arc<Desired>,
    /// Kernel resources of unknown state declared at start, until the controller
    /// resends or removes them; drift repair leaves them alone meanwhile.
    unknown: BTreeSet<String>,
}

/// What readers see, without waiting for an apply.
#[derive(Clone, Debug, Default)]
pub(crate) struct View {
    pub desired: Arc<Desired>,
    pub last_apply: Option<ApplyTiming>,
    pub connected: bool,
    pub drift_repairs: u64,
    /// The dataplane programming the kernel now.
    pub dataplane: v1::Dataplane,
}

pub(crate) struct Engine<D> {
    dataplane: Arc<Mutex<D>>,
    /// Which dataplane the node should use; `None`: the one given, always.
    policy: Option<DataplanePolicy>,
    /// The Node's `switchyard.io/dataplane` label as last received (and persisted).
    label: Mutex<Option<DataplaneKind>>,
    /// Where the dataplane record is kept (the desired cache's directory).
    state_dir: PathBuf,
    state: tokio::sync::Mutex<Authoritative>,
    view: RwLock<View>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<ProxyHealth>,
    healthchecks: HealthChecks,
    cache: CacheFile,
}

impl<D: Dataplane> Engine<D> {
    /// Reads the kernel back and the cache, and starts from what both confirm. Calls no
    /// apply: the kernel is left exactly as found.
    pub async fn start(
        dataplane: D,
        policy: Option<DataplanePolicy>,
        cache: CacheFile,
        metrics: Arc<Metrics>,
        health: Arc<ProxyHealth>,
        healthchecks: HealthChecks,
    ) -> Arc<Self> {
        let kind = dataplane.kind();
        let state_dir = cache
            .path()
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let record = DataplaneRecord::load(&state_dir);
        let record = DataplaneRecord {
            in_force: DataplaneKind::from_wire(kind),
            ..record
        };
        if let Err(error) = record.store(&state_dir) {
            tracing::warn!(%error, "cannot record the dataplane in force");
        }
        metrics.set_dataplane(crate::client::dataplane_name(kind));
        let dataplane = Arc::new(Mutex::new(dataplane));
        let file = cache.clone();
        let cached = tokio::task::spawn_blocking(move || {
            file.load().unwrap_or_else(|error| {
                tracing::warn!(%error, "cannot load the desired cache; every kernel resource counts as unknown");
                Desired::new()
            })
        })
        .await
        .unwrap_or_default();
        let kernel = read_back_on_start(&dataplane).await;
        let Reconciled { held, unknown } = match kernel {
            Some(kernel) => {
                blocking(&dataplane, move |d| {
                    reconcile(&kernel, cached, |n, s| d.expected(n, s))
                })
                .await
            }
            // Without a read-back nothing is trusted; what the cache names is declared
            // unknown so the controller resends or removes it.
            None => Reconciled {
                held: Desired::new(),
                unknown: cached.keys().cloned().collect(),
            },
        };
        tracing::info!(
            held = held.len(),
            unknown = unknown.len(),
            "resuming from the kernel without rewriting it"
        );
        let desired = Arc::new(held);
        healthchecks.sync(&desired);
        Arc::new(Self {
            dataplane,
            policy,
            label: Mutex::new(record.label),
            state_dir,
            state: tokio::sync::Mutex::new(Authoritative {
                desired: desired.clone(),
                unknown,
            }),
            view: RwLock::new(View {
                desired,
                dataplane: kind,
                ..View::default()
            }),
            metrics,
            health,
            healthchecks,
            cache,
        })
    }

    pub fn view(&self) -> View {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update_view(&self, f: impl FnOnce(&mut View)) {
        f(&mut self.view.write().unwrap_or_else(PoisonError::into_inner));
    }

    /// The dataplane programming the kernel now.
    pub fn kind(&self) -> v1::Dataplane {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .dataplane
    }

    /// Notes the Node's `switchyard.io/dataplane` label as the controller sent it.
    pub fn note_label(&self, label: v1::Dataplane) {
        let label = DataplaneKind::from_wire(label);
        let mut held = self.label.lock().unwrap_or_else(PoisonError::into_inner);
        if *held != label {
            *held = label;
            let record = DataplaneRecord {
                in_force: DataplaneKind::from_wire(self.kind()),
                label,
            };
            if let Err(error) = record.store(&self.state_dir) {
                tracing::warn!(%error, "cannot record the dataplane label");
            }
        }
    }

    /// The label the agent declares on a new stream (the controller sends it only when
    /// it differs).
    pub fn label(&self) -> v1::Dataplane {
        self.label
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map_or(v1::Dataplane::Unspecified, DataplaneKind::to_wire)
    }

    /// Switches to the dataplane the policy wants, if it is not the one in force and
    /// every resource the kernel holds is known (after a restart, those the cache could
    /// not confirm wait for the controller). Returns the new dataplane, if it switched.
    /// On failure the old dataplane stays in force; the next call tries again.
    pub async fn reconcile_dataplane(&self) -> Result<Option<DataplaneKind>, DataplaneError> {
        let Some(policy) = self.policy else {
            return Ok(None);
        };
        let label = *self.label.lock().unwrap_or_else(PoisonError::into_inner);
        let wanted = policy.wanted(label);
        if self.kind() == wanted.to_wire() {
            return Ok(None);
        }
        let state = self.state.lock().await;
        if !state.unknown.is_empty() {
            return Ok(None);
        }
        let from = self.kind();
        let desired = state.desired.clone();
        tracing::info!(from = ?from, to = %wanted, services = desired.len(), "switching dataplanes");
        let started = Instant::now();
        let switched = self
            .with_dataplane(move |d| d.switch_to(wanted, &desired))
            .await;
        let result = match &switched {
            Ok(true) => "switched",
            Ok(false) => "unsupported",
            Err(_) => "failed",
        };
        self.metrics
            .dataplane_switches
            .get_or_create(&vec![
                ("to".to_string(), wanted.name().to_string()),
                ("result".to_string(), result.to_string()),
            ])
            .inc();
        if !switched? {
            return Ok(None);
        }
        self.update_view(|v| v.dataplane = wanted.to_wire());
        self.metrics.set_dataplane(wanted.name());
        let record = DataplaneRecord {
            in_force: Some(wanted),
            label,
        };
        if let Err(error) = record.store(&self.state_dir) {
            tracing::warn!(%error, "cannot record the dataplane in force");
        }
        tracing::info!(to = %wanted, took = ?started.elapsed(), "dataplane switched");
        drop(state);
        Ok(Some(wanted))
    }

    pub fn set_connected(&self, connected: bool) {
        self.metrics.controller_connected.set(i64::from(connected));
        self.update_view(|v| v.connected = connected);
    }

    /// `initial_resource_versions` for a new stream.
    pub async fn declared_versions(&self) -> BTreeMap<String, String> {
        let state = self.state.lock().await;
        Reconciled::declared(&state.desired, &state.unknown)
    }

    /// Runs `f` on the dataplane off the executor.
    pub async fn with_dataplane<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut D) -> T + Send + 'static,
    ) -> T {
        blocking(&self.dataplane, f).await
    }

    /// Applies one delta: upserts, then removals. Resources that fail keep their previous
    /// state in the cache (they were not applied); on a whole-dataplane failure nothing
    /// changes in the cache.
    pub async fn apply_delta(
        &self,
        upserts: Vec<(String, DesiredService)>,
        removals: Vec<String>,
    ) -> Result<DeltaReport, DataplaneError> {
        if upserts.is_empty() && removals.is_empty() {
            // Nothing convertible in the response: the kernel has nothing to do.
            return Ok(DeltaReport::default());
        }
        let mut state = self.state.lock().await;
        let previous = state.desired.clone();
        let mut next = (*previous).clone();
        let change = Change {
            upserted: upserts.iter().map(|(n, _)| n.clone()).collect(),
            removed: removals.clone(),
            full: false,
        };
        for (name, service) in upserts {
            next.insert(name, service);
        }
        for name in &removals {
            next.remove(name);
        }
        let next = Arc::new(next);
        let started = Instant::now();
        let outcome = {
            let desired = next.clone();
            let change = change.clone();
            self.with_dataplane(move |d| d.apply(&desired, &change))
                .await?
        };
        let duration = started.elapsed();
        let kernel_done = SystemTime::now();
        let mut next = Arc::try_unwrap(next).unwrap_or_else(|shared| (*shared).clone());
        for name in outcome.failed.keys() {
            match previous.get(name) {
                Some(old) => next.insert(name.clone(), old.clone()),
                None => next.remove(name),
            };
        }
        for name in change.upserted.iter().chain(&change.removed) {
            if !outcome.failed.contains_key(name) {
                state.unknown.remove(name);
            }
        }
        let applied =
            (change.upserted.len() + change.removed.len()).saturating_sub(outcome.failed.len());
        let applied = u32::try_from(applied).unwrap_or(u32::MAX);
        let next = Arc::new(next);
        state.desired = next.clone();
        let names: Vec<String> = change
            .upserted
            .iter()
            .chain(&change.removed)
            .cloned()
            .collect();
        self.record(&next, names.clone()).await;
        self.committed(&next, duration, applied, Committed::Delta(&names));
        Ok(DeltaReport {
            failed: outcome.failed,
            applied,
            duration,
            kernel_done: Some(kernel_done),
        })
    }

    /// Records in the cache file that `names` now hold what `desired` says.
    async fn record(&self, desired: &Arc<Desired>, names: Vec<String>) {
        let cache = self.cache.clone();
        let snapshot = desired.clone();
        match tokio::task::spawn_blocking(move || cache.record(&snapshot, &names)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot persist the desired cache"),
            Err(error) => tracing::warn!(%error, "persisting the desired cache panicked"),
        }
    }

    /// Bookkeeping after the kernel took a change: view, metrics, health checks.
    fn committed(
        &self,
        desired: &Arc<Desired>,
        duration: Duration,
        resources: u32,
        what: Committed<'_>,
    ) {
        let full = matches!(what, Committed::FullSync);
        let now = SystemTime::now();
        let histogram = if full {
            &self.metrics.sync_full_proxy_rules_duration
        } else {
            &self.metrics.sync_proxy_rules_duration
        };
        histogram.observe(duration.as_secs_f64());
        self.metrics.sync_proxy_rules_last_timestamp.set(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        self.update_view(|v| {
            v.desired = desired.clone();
            v.last_apply = Some(ApplyTiming {
                at: now,
                duration,
                resources,
                full_sync: full,
            });
        });
        match what {
            Committed::Delta(names) => self.healthchecks.sync_changed(desired, names),
            Committed::Repair | Committed::FullSync => self.healthchecks.sync(desired),
        }
    }

    /// Reads the kernel back and compares it with the desired cache.
    pub async fn drift(&self) -> Result<(Programmed, Vec<Drift>), DataplaneError> {
        let desired = self.view().desired;
        self.with_dataplane(move |d| {
            let kernel = d.read_back()?;
            let drift = drift::compare(&desired, &kernel, |n, s| d.expected(n, s));
            Ok((kernel, drift))
        })
        .await
    }

    /// Finds drift and repairs it with one apply naming the drifted resources. Returns
    /// what was found. Kernel resources of unknown state declared at start are left for
    /// the controller to resend or remove.
    pub async fn repair_drift(&self) -> Result<Vec<Drift>, DataplaneError> {
        let state = self.state.lock().await;
        let desired = state.desired.clone();
        let unknown = state.unknown.clone();
        let drift = self
            .with_dataplane({
                let desired = desired.clone();
                move |d| {
                    let kernel = d.read_back()?;
                    Ok::<_, DataplaneError>(drift::compare(&desired, &kernel, |n, s| {
                        d.expected(n, s)
                    }))
                }
            })
            .await?
            .into_iter()
            .filter(|d| !(d.kind == DriftKind::Unexpected && unknown.contains(&d.name)))
            .collect::<Vec<_>>();
        if drift.is_empty() {
            return Ok(drift);
        }
        let mut change = Change::default();
        for d in &drift {
            match d.kind {
                DriftKind::Missing | DriftKind::Differs => change.upserted.push(d.name.clone()),
                DriftKind::Unexpected => change.removed.push(d.name.clone()),
            }
        }
        tracing::warn!(drifted = drift.len(), "repairing kernel drift");
        let started = Instant::now();
        let outcome = {
            let desired = desired.clone();
            let change = change.clone();
            self.with_dataplane(move |d| d.apply(&desired, &change))
                .await?
        };
        let duration = started.elapsed();
        for (name, error) in &outcome.failed {
            tracing::warn!(%name, %error, "drift repair failed for a resource");
        }
        let repaired = drift.len().saturating_sub(outcome.failed.len()) as u64;
        self.metrics.drift_repairs.inc_by(repaired);
        self.update_view(|v| v.drift_repairs += repaired);
        let resources = u32::try_from(repaired).unwrap_or(u32::MAX);
        drop(state);
        // The desired state did not change: the cache file already holds it.
        self.committed(&desired, duration, resources, Committed::Repair);
        Ok(drift)
    }

    /// Rewrites everything the dataplane owns from the desired cache.
    pub async fn full_sync(&self) -> Result<(), DataplaneError> {
        let state = self.state.lock().await;
        let desired = state.desired.clone();
        let change = Change {
            upserted: desired.keys().cloned().collect(),
            removed: Vec::new(),
            full: true,
        };
        let started = Instant::now();
        let outcome = {
            let desired = desired.clone();
            self.with_dataplane(move |d| d.apply(&desired, &change))
                .await?
        };
        let duration = started.elapsed();
        for (name, error) in &outcome.failed {
            tracing::warn!(%name, %error, "full sync failed for a resource");
        }
        let resources =
            u32::try_from(desired.len().saturating_sub(outcome.failed.len())).unwrap_or(u32::MAX);
        drop(state);
        self.committed(&desired, duration, resources, Committed::FullSync);
        Ok(())
    }
}

/// Reads the kernel back, retrying a few times: resuming without it means trusting
/// nothing the kernel holds.
async fn read_back_on_start<D: Dataplane>(dataplane: &Arc<Mutex<D>>) -> Option<Programmed> {
    let mut backoff =
        crate::client::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    for attempt in 1..=5 {
        match blocking(dataplane, |d| d.read_back()).await {
            Ok(kernel) => return Some(kernel),
            Err(error) => {
                tracing::warn!(%error, attempt, "cannot read the kernel back on start");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    tracing::error!("resuming without a kernel read-back; every cached resource counts as unknown");
    None
}

async fn blocking<D: Send + 'static, T: Send + 'static>(
    dataplane: &Arc<Mutex<D>>,
    f: impl FnOnce(&mut D) -> T + Send + 'static,
) -> T {
    let dataplane = dataplane.clone();
    match tokio::task::spawn_blocking(move || {
        let mut guard = dataplane.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    })
    .await
    {
        Ok(value) => value,
        // A panicking dataplane takes the agent down; the kernel keeps its rules.
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}
