//! The Services' health-check node ports: for every desired Service with
//! `externalTrafficPolicy: Local` and a `healthCheckNodePort`, an HTTP server on that
//! port (all addresses) telling load balancers whether this node has local endpoints.
//! Entry point: [`HealthChecks::sync`].
//!
//! Answers match kube-proxy's `service_health.go`: any path, 200 when the Service has
//! local endpoints and the agent is healthy, else 503, with the JSON body
//! `{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": B}`
//! and the `X-Load-Balancing-Endpoint-Weight: N` header. N counts distinct IPs of the
//! node's ready local endpoints across ports (kube-proxy's local *ready* endpoints:
//! terminating ones make the node fail the check so load balancers drain it).

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use tokio::net::TcpListener;

use crate::{
    dataplane::Desired,
    health::ProxyHealth,
    http::{self, AbortOnDrop},
    state::{ServiceKey, ServiceState, TrafficPolicy},
};

struct Instance {
    port: u16,
    local_endpoints: Arc<AtomicUsize>,
    _server: AbortOnDrop,
}

/// The running health-check servers, one per Service. Cheap to clone.
#[derive(Clone)]
pub struct HealthChecks {
    servers: Arc<Mutex<HashMap<ServiceKey, Instance>>>,
    health: Arc<ProxyHealth>,
}

/// The health-check node port a Service needs served, if any.
pub fn health_check_port(service: &ServiceState) -> Option<u16> {
    (service.external_traffic_policy == TrafficPolicy::Local)
        .then_some(service.health_check_node_port)
        .flatten()
}

/// The port a Service's health-check server needs and the count it reports, if any.
fn wanted(service: &ServiceState) -> Option<(u16, usize)> {
    health_check_port(service).map(|port| (port, local_endpoint_count(service)))
}

/// How many distinct IPs of ready local endpoints a Service has on this node.
pub fn local_endpoint_count(service: &ServiceState) -> usize {
    service
        .ports
        .iter()
        .flat_map(|p| &p.local_endpoints)
        .filter(|e| e.ready)
        .map(|e| e.ip)
        .collect::<BTreeSet<IpAddr>>()
        .len()
}

/// kube-proxy's body, byte for byte in layout.
pub fn body(key: &ServiceKey, local_endpoints: usize, proxy_healthy: bool) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("strings serialize");
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quote(&key.namespace),
        quote(&key.name)
    )
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    // The IPv6 wildcard also accepts IPv4 unless the host forbids it.
    let listener = std::net::TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
        .or_else(|_| {
            std::net::TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
        })?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

impl HealthChecks {
    pub fn new(health: Arc<ProxyHealth>) -> Self {
        Self {
            servers: Arc::new(Mutex::new(HashMap::new())),
            health,
        }
    }

    /// Opens servers for new Services, closes those of Services gone (or whose port
    /// moved), and updates every count. Must run inside a tokio runtime.
    pub fn sync(&self, desired: &Desired) {
        let wanted: HashMap<ServiceKey, (u16, usize)> = desired
            .values()
            .filter_map(|s| wanted(&s.state).map(|w| (s.state.key.clone(), w)))
            .collect();
        let mut servers = self.servers.lock().unwrap_or_else(PoisonError::into_inner);
        servers.retain(|key, instance| {
            let keep = wanted
                .get(key)
                .is_some_and(|(port, _)| *port == instance.port);
            if !keep {
                tracing::info!(service = %key, port = instance.port, "closing health check");
            }
            keep
        });
        for (key, want) in wanted {
            self.serve(&mut servers, key, want);
        }
    }

    /// [`HealthChecks::sync`] for the resources `names` only (`namespace/name`; absent
    /// from `desired`: removed), so a change costs what it touches. Must run inside a
    /// tokio runtime.
    pub fn sync_changed<'a>(&self, desired: &Desired, names: impl IntoIterator<Item = &'a String>) {
        let mut servers = self.servers.lock().unwrap_or_else(PoisonError::into_inner);
        for name in names {
            let (key, want) = match desired.get(name) {
                Some(s) => (s.state.key.clone(), wanted(&s.state)),
                None => match name.split_once('/') {
                    Some((namespace, n)) => (ServiceKey::new(namespace, n), None),
                    None => continue,
                },
            };
            if servers
                .get(&key)
                .is_some_and(|i| want.is_none_or(|(port, _)| port != i.port))
                && let Some(instance) = servers.remove(&key)
            {
                tracing::info!(service = %key, port = instance.port, "closing health check");
            }
            if let Some(want) = want {
                self.serve(&mut servers, key, want);
            }
        }
    }

    /// Updates the count of `key`'s server, opening it if it does not run yet.
    fn serve(
        &self,
        servers: &mut HashMap<ServiceKey, Instance>,
        key: ServiceKey,
        (port, count): (u16, usize),
    ) {
        if let Some(instance) = servers.get(&key) {
            instance.local_endpoints.store(count, Ordering::Relaxed);
            return;
        }
        let listener = match bind(port) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(service = %key, port, %error, "cannot open the health check node port");
                return;
            }
        };
        tracing::info!(service = %key, port, "opening health check");
        let local_endpoints = Arc::new(AtomicUsize::new(count));
        let server = http::serve(listener, self.handler(key.clone(), local_endpoints.clone()));
        servers.insert(
            key,
            Instance {
                port,
                local_endpoints,
                _server: server,
            },
        );
    }

    /// Ports currently served, by Service.
    pub fn ports(&self) -> HashMap<ServiceKey, u16> {
        self.servers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, i)| (k.clone(), i.port))
            .collect()
    }

    fn handler(&self, key: ServiceKey, local_endpoints: Arc<AtomicUsize>) -> http::Handler {
        let health = self.health.clone();
        Arc::new(move |_: &Request<Incoming>| -> Response<Full<Bytes>> {
            let count = local_endpoints.load(Ordering::Relaxed);
            let healthy = health.is_healthy().0;
            let status = if count > 0 && healthy { 200 } else { 503 };
            let mut response = http::json(status, body(&key, count, healthy));
            response.headers_mut().insert(
                "X-Load-Balancing-Endpoint-Weight",
                count
                    .to_string()
                    .parse()
                    .expect("a number is a valid header value"),
            );
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{desired, service};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn local_lb(name: &str, port: u16) -> (String, crate::dataplane::DesiredService) {
        let mut s = service(name, &["10.96.0.30"], vec![]);
        s.external_traffic_policy = TrafficPolicy::Local;
        s.health_check_node_port = Some(port);
        (name.to_string(), desired(s))
    }

    #[tokio::test]
    async fn a_change_opens_moves_and_closes_only_the_servers_of_the_services_it_names() {
        let checks = HealthChecks::new(Arc::new(crate::health::ProxyHealth::new(
            std::time::Duration::from_secs(60),
        )));
        let (a, b, moved) = (free_port(), free_port(), free_port());
        let mut want = Desired::new();
        want.extend([local_lb("shop/a", a), local_lb("shop/b", b)]);
        checks.sync(&want);
        let key = |n: &str| ServiceKey::new("shop", n);
        assert_eq!(
            checks.ports(),
            HashMap::from([(key("a"), a), (key("b"), b)])
        );

        want.extend([local_lb("shop/a", moved)]);
        checks.sync_changed(&want, &["shop/a".to_string()]);
        assert_eq!(
            checks.ports(),
            HashMap::from([(key("a"), moved), (key("b"), b)])
        );

        want.remove("shop/b");
        checks.sync_changed(&want, &["shop/b".to_string(), "shop/never".to_string()]);
        assert_eq!(checks.ports(), HashMap::from([(key("a"), moved)]));
    }

    #[test]
    fn the_body_has_kube_proxys_layout() {
        assert_eq!(
            body(&ServiceKey::new("ns", "web"), 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }
}
