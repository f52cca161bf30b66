//! An in-memory [`Dataplane`] for tests: the runtime's tests need no kernel (the real
//! kernel is exercised by each dataplane agent's own tests).
//!
//! [`MemoryDataplane`] keeps its "kernel" in a [`MemoryKernel`] handle that tests keep a
//! clone of, to inspect what was applied, make resources fail, or simulate drift; a new
//! dataplane over the same handle simulates an agent restart with the kernel untouched.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use switchyard_proto::{format_version, v1};

use crate::dataplane::{
    ApplyOutcome, Change, Dataplane, DataplaneError, Desired, DesiredService, Programmed,
    ProgrammedService,
};

/// What the in-memory kernel holds and how it should misbehave.
#[derive(Debug, Default)]
pub struct KernelContents {
    /// What `read_back` returns.
    pub programmed: Programmed,
    /// Every `apply` call, in order.
    pub applies: Vec<Change>,
    /// Resources whose apply fails, with the message to report.
    pub fail_resources: BTreeMap<String, String>,
    /// When set, every `apply` fails as a whole with this message.
    pub fail_all: Option<String>,
    /// When set, every `read_back` fails with this message.
    pub fail_read_back: Option<String>,
}

/// A shared handle on the in-memory kernel.
#[derive(Clone, Debug, Default)]
pub struct MemoryKernel(Arc<Mutex<KernelContents>>);

impl MemoryKernel {
    pub fn lock(&self) -> MutexGuard<'_, KernelContents> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many `apply` calls the dataplane received.
    pub fn apply_count(&self) -> usize {
        self.lock().applies.len()
    }

    /// Name → version of what the kernel holds.
    pub fn versions(&self) -> BTreeMap<String, Option<u64>> {
        self.lock()
            .programmed
            .iter()
            .map(|(n, p)| (n.clone(), p.version))
            .collect()
    }
}

/// A [`Dataplane`] that programs a [`MemoryKernel`], reporting itself as `kind`.
#[derive(Debug)]
pub struct MemoryDataplane {
    pub kernel: MemoryKernel,
    pub kind: v1::Dataplane,
}

impl Default for MemoryDataplane {
    fn default() -> Self {
        Self::new(MemoryKernel::default())
    }
}

impl MemoryDataplane {
    /// An in-memory "iptables" dataplane.
    pub fn new(kernel: MemoryKernel) -> Self {
        Self::of_kind(kernel, v1::Dataplane::Iptables)
    }

    /// An in-memory dataplane that reports itself as `kind` (for switching tests).
    pub fn of_kind(kernel: MemoryKernel, kind: v1::Dataplane) -> Self {
        Self { kernel, kind }
    }
}

/// The "kernel objects" a Service renders to in the in-memory notation.
pub fn memory_objects(name: &str, service: &DesiredService) -> Vec<String> {
    let wire = v1::ServiceState::from(service.state.as_ref());
    let mut objects = vec![format!(
        "service {name} {}",
        format_version(service.version)
    )];
    for port in &wire.ports {
        for endpoint in port.cluster_endpoints.iter().chain(&port.local_endpoints) {
            objects.push(format!(
                "endpoint {name} {}/{} -> {}:{}",
                port.protocol, port.port, endpoint.ip, endpoint.port
            ));
        }
    }
    objects.sort();
    objects
}

impl Dataplane for MemoryDataplane {
    fn kind(&self) -> v1::Dataplane {
        self.kind
    }

    fn apply(
        &mut self,
        desired: &Desired,
        change: &Change,
    ) -> Result<ApplyOutcome, DataplaneError> {
        let mut kernel = self.kernel.lock();
        kernel.applies.push(change.clone());
        if let Some(message) = &kernel.fail_all {
            return Err(DataplaneError::Command {
                command: "memory-restore".into(),
                message: message.clone(),
            });
        }
        let mut outcome = ApplyOutcome::default();
        let upserted = change.to_write(desired);
        for name in upserted {
            if let Some(message) = kernel.fail_resources.get(name) {
                outcome.failed.insert(name.clone(), message.clone());
                continue;
            }
            let Some(service) = desired.get(name) else {
                outcome
                    .failed
                    .insert(name.clone(), "not in the desired state".into());
                continue;
            };
            let programmed = ProgrammedService {
                version: Some(service.version),
                kernel_objects: memory_objects(name, service),
            };
            kernel.programmed.insert(name.clone(), programmed);
        }
        for name in &change.removed {
            if let Some(message) = kernel.fail_resources.get(name) {
                outcome.failed.insert(name.clone(), message.clone());
                continue;
            }
            kernel.programmed.remove(name);
        }
        if change.full {
            kernel
                .programmed
                .retain(|name, _| desired.contains_key(name));
        }
        Ok(outcome)
    }

    fn read_back(&mut self) -> Result<Programmed, DataplaneError> {
        let kernel = self.kernel.lock();
        if let Some(message) = &kernel.fail_read_back {
            return Err(DataplaneError::ReadBack(message.clone()));
        }
        Ok(kernel.programmed.clone())
    }

    fn expected(&self, name: &str, service: &DesiredService) -> Vec<String> {
        memory_objects(name, service)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.kernel.lock().programmed.clear();
        Ok(())
    }
}

/// Starts an agent for `node` over a [`MemoryDataplane`] on `kernel`, both listeners on
/// `127.0.0.1:0`, periodic drift checks and full syncs out of the way (tests trigger
/// them with [`crate::Agent::repair_drift`] and [`crate::Agent::full_sync`]).
/// `controller` is one address or several, comma-separated, tried in a shuffled order as
/// an agent does; [`start_memory_agent_in_order`] keeps the order given.
pub async fn start_memory_agent(
    controller: String,
    node: &str,
    kernel: &MemoryKernel,
    state_dir: &std::path::Path,
) -> crate::Agent<MemoryDataplane> {
    start_agent(
        controller,
        node,
        MemoryDataplane::new(kernel.clone()),
        None,
        state_dir,
    )
    .await
}

/// [`start_memory_agent`] over several controllers tried in the order given, not
/// shuffled: the test decides which one the agent tries first.
pub async fn start_memory_agent_in_order(
    controllers: &[String],
    node: &str,
    kernel: &MemoryKernel,
    state_dir: &std::path::Path,
) -> crate::Agent<MemoryDataplane> {
    start(
        options(
            controllers.join(","),
            Default::default(),
            node,
            None,
            state_dir,
        ),
        crate::client::ControllerOrder::AsGiven,
        MemoryDataplane::new(kernel.clone()),
    )
    .await
}

/// [`start_memory_agent`] with TLS to the controller (an `https://` address).
pub async fn start_memory_agent_tls(
    controller: String,
    tls: crate::client::ClientTls,
    node: &str,
    kernel: &MemoryKernel,
    state_dir: &std::path::Path,
) -> crate::Agent<MemoryDataplane> {
    start_agent_tls(
        controller,
        tls,
        node,
        MemoryDataplane::new(kernel.clone()),
        None,
        state_dir,
    )
    .await
}

/// [`start_memory_agent`] over any dataplane, with a dataplane policy (for a dataplane
/// that can switch).
pub async fn start_agent<D: Dataplane>(
    controller: String,
    node: &str,
    dataplane: D,
    policy: Option<crate::switch::DataplanePolicy>,
    state_dir: &std::path::Path,
) -> crate::Agent<D> {
    start_agent_tls(
        controller,
        Default::default(),
        node,
        dataplane,
        policy,
        state_dir,
    )
    .await
}

/// [`start_agent`] with TLS to the controller.
pub async fn start_agent_tls<D: Dataplane>(
    controller: String,
    tls: crate::client::ClientTls,
    node: &str,
    dataplane: D,
    policy: Option<crate::switch::DataplanePolicy>,
    state_dir: &std::path::Path,
) -> crate::Agent<D> {
    start(
        options(controller, tls, node, policy, state_dir),
        crate::client::ControllerOrder::Shuffled,
        dataplane,
    )
    .await
}

/// The options every test agent runs with.
fn options(
    controller: String,
    tls: crate::client::ClientTls,
    node: &str,
    policy: Option<crate::switch::DataplanePolicy>,
    state_dir: &std::path::Path,
) -> crate::AgentOptions {
    crate::AgentOptions {
        controller,
        tls,
        node_name: node.into(),
        state_dir: state_dir.to_path_buf(),
        drift_interval: std::time::Duration::from_secs(3600),
        full_sync_period: std::time::Duration::ZERO,
        agent_version: "test".into(),
        policy,
    }
}

async fn start<D: Dataplane>(
    options: crate::AgentOptions,
    order: crate::client::ControllerOrder,
    dataplane: D,
) -> crate::Agent<D> {
    let listener = || tokio::net::TcpListener::bind("127.0.0.1:0");
    crate::Agent::start_with_order(
        options,
        order,
        dataplane,
        listener().await.expect("bind a loopback port"),
        listener().await.expect("bind a loopback port"),
    )
    .await
    .expect("the agent starts")
}
