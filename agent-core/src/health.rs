//! The agent's own health with kube-proxy's meaning, and the HTTP listener serving
//! `/healthz`, `/livez` and `/metrics`.
//!
//! # Meaning (kube-proxy's `ProxyHealthServer`)
//! The agent is healthy unless an update it received has waited longer than the health
//! timeout (twice the sync period, here `2 × --drift-interval`) without the kernel
//! taking it. Before the first successful update it is healthy (starting up). `/livez`
//! reports exactly that; `/healthz` is also 503 while the node is not eligible (being
//! deleted: a deletion timestamp or the cluster autoscaler's taint, which the controller
//! sends as `node_being_deleted`). A controller that is unreachable does not make the agent
//! unhealthy: nothing is pending, and the kernel keeps serving (fail-static).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use tokio::{net::TcpListener, time::Instant};

use crate::{
    http::{self, AbortOnDrop},
    metrics::Metrics,
};

#[derive(Debug)]
struct HealthState {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<Instant>,
    node_eligible: bool,
}

/// Tracks whether updates reach the kernel in time. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<HealthState>,
}

impl ProxyHealth {
    /// `timeout`: how long an update may wait before the agent is unhealthy.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            state: Mutex::new(HealthState {
                last_updated: None,
                oldest_pending: None,
                node_eligible: true,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An update arrived and is not in the kernel yet.
    pub fn queued_update(&self) {
        self.lock().oldest_pending.get_or_insert_with(Instant::now);
    }

    /// The kernel holds everything received so far.
    pub fn updated(&self) {
        let mut state = self.lock();
        state.oldest_pending = None;
        state.last_updated = Some(SystemTime::now());
    }

    /// Whether the node may receive traffic (false while it is being deleted).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// The agent's health ignoring the node's eligibility, and when it last updated.
    pub fn is_healthy(&self) -> (bool, Option<SystemTime>) {
        let state = self.lock();
        let late = match (state.last_updated, state.oldest_pending) {
            (Some(_), Some(pending)) => pending.elapsed() >= self.timeout,
            // Never updated: starting up, healthy like kube-proxy.
            _ => false,
        };
        (!late, state.last_updated)
    }

    /// The `/healthz` answer: status and JSON body.
    pub fn healthz(&self) -> (u16, String) {
        let eligible = self.node_eligible();
        let (healthy, last) = self.is_healthy();
        let healthy = healthy && eligible;
        let now = SystemTime::now();
        let last = if healthy { Some(now) } else { last };
        let body = format!(
            r#"{{"lastUpdated": {},"currentTime": {}, "nodeHealthy": {healthy}, "nodeEligible": {eligible}}}"#,
            quoted_time(last),
            quoted_time(Some(now)),
        );
        (if healthy { 200 } else { 503 }, body)
    }

    /// The `/livez` answer: status and JSON body.
    pub fn livez(&self) -> (u16, String) {
        let (healthy, last) = self.is_healthy();
        let now = SystemTime::now();
        let last = if healthy { Some(now) } else { last };
        let body = format!(
            r#"{{"lastUpdated": {},"currentTime": {}}}"#,
            quoted_time(last),
            quoted_time(Some(now)),
        );
        (if healthy { 200 } else { 503 }, body)
    }
}

fn quoted_time(time: Option<SystemTime>) -> String {
    match time {
        Some(t) => format!("\"{}\"", humantime::format_rfc3339_millis(t)),
        None => "\"\"".into(),
    }
}

/// Serves `/healthz`, `/livez` and `/metrics` on `listener` until the guard is dropped.
pub(crate) fn serve(
    listener: TcpListener,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
) -> AbortOnDrop {
    http::serve(
        listener,
        Arc::new(
            move |request: &Request<Incoming>| -> Response<Full<Bytes>> {
                match request.uri().path() {
                    "/healthz" => {
                        let (status, body) = health.healthz();
                        http::json(status, body)
                    }
                    "/livez" => {
                        let (status, body) = health.livez();
                        http::json(status, body)
                    }
                    "/metrics" => Response::builder()
                        .header(
                            "Content-Type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(metrics.encode())))
                        .expect("static headers are valid"),
                    _ => Response::builder()
                        .status(404)
                        .body(Full::new(Bytes::from_static(b"404 page not found\n")))
                        .expect("static headers are valid"),
                }
            },
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_update_pending_longer_than_the_timeout_makes_the_agent_unhealthy() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        health.queued_update();
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(health.is_healthy().0, "healthy while starting up");
        health.updated();
        health.queued_update();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(health.livez().0, 200);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(health.livez().0, 503);
        assert_eq!(health.healthz().0, 503);
        health.updated();
        assert_eq!(health.healthz().0, 200);
    }

    #[test]
    fn healthz_fails_while_the_node_is_not_eligible_but_livez_does_not() {
        let health = ProxyHealth::new(Duration::from_secs(60));
        health.set_node_eligible(false);
        let (status, body) = health.healthz();
        assert_eq!(status, 503);
        assert!(body.contains(r#""nodeHealthy": false"#), "{body}");
        assert_eq!(health.livez().0, 200);
    }
}
