//! Bounds on what peers hold: agent streams per peer ([`StreamSlots`]) and the query
//! service's concurrency ([`Gated`]).
//!
//! Unary limits are tower layers (`ConcurrencyLimit` behind `LoadShed`, so a query over
//! the limit is refused at once rather than queued). Streams live on after their call
//! returns, which a tower layer does not see, so each holds a [`Slot`] for its life.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tonic::{Status, body::Body, codegen::http, server::NamedService};
use tower::{Service, ServiceBuilder, ServiceExt, limit::ConcurrencyLimit, load_shed::LoadShed};

/// How many agent streams each peer may hold at once.
#[derive(Clone, Debug)]
pub struct StreamSlots {
    limit: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamSlots {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Arc::default(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A slot for one more stream of `peer`, or `None` when it holds `limit` already.
    pub fn try_take(&self, peer: String) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(peer.clone()).or_default();
        if *count >= self.limit {
            if *count == 0 {
                open.remove(&peer);
            }
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: self.clone(),
            peer,
        })
    }

    /// Streams `peer` holds now.
    pub fn held(&self, peer: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(peer).copied().unwrap_or(0)
    }
}

/// One stream's place; freed on drop.
#[derive(Debug)]
pub struct Slot {
    slots: StreamSlots,
    peer: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// A gRPC service behind tower's `ConcurrencyLimit` and `LoadShed`: at most `limit` of
/// its calls run at once, and one more is answered `RESOURCE_EXHAUSTED` at once.
#[derive(Clone)]
pub struct Gated<S> {
    inner: LoadShed<ConcurrencyLimit<S>>,
}

impl<S> Gated<S> {
    pub fn new(service: S, limit: usize) -> Self {
        Self {
            inner: ServiceBuilder::new()
                .load_shed()
                .concurrency_limit(limit)
                .service(service),
        }
    }
}

impl<S: NamedService> NamedService for Gated<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Gated<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is decided per call below, so a shed call gets its own answer.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.inner.clone();
        Box::pin(async move {
            match service.oneshot(request).await {
                Ok(response) => Ok(response),
                Err(_) => Ok(Status::resource_exhausted(
                    "too many queries at once; retry in a moment",
                )
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    #[test]
    fn a_peer_holds_at_most_its_limit_of_slots_and_a_dropped_one_frees() {
        let slots = StreamSlots::new(2);
        let a = slots.try_take("10.0.0.1".into()).unwrap();
        let _b = slots.try_take("10.0.0.1".into()).unwrap();
        assert!(slots.try_take("10.0.0.1".into()).is_none());
        assert!(slots.try_take("10.0.0.2".into()).is_some(), "another peer");
        drop(a);
        assert_eq!(slots.held("10.0.0.1"), 1);
        assert!(slots.try_take("10.0.0.1".into()).is_some());
    }

    #[tokio::test]
    async fn calls_over_the_limit_are_refused_at_once_and_the_others_run() {
        let release = Arc::new(Semaphore::new(0));
        let inner = {
            let release = release.clone();
            tower::service_fn(move |_: http::Request<Body>| {
                let release = release.clone();
                async move {
                    let _permit = release.acquire().await;
                    Ok::<_, Infallible>(http::Response::new(Body::empty()))
                }
            })
        };
        let gated = Gated::new(inner, 2);
        let call = || gated.clone().oneshot(http::Request::new(Body::empty()));
        let first = tokio::spawn(call());
        let second = tokio::spawn(call());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let third = tokio::time::timeout(Duration::from_secs(1), call())
            .await
            .expect("refused at once, not queued")
            .unwrap();
        assert_eq!(third.headers()["grpc-status"], "8", "RESOURCE_EXHAUSTED");
        release.add_permits(2);
        for call in [first, second] {
            let response = call.await.unwrap().unwrap();
            assert!(response.headers().get("grpc-status").is_none());
        }
        // The limit is free again.
        release.add_permits(1);
        let fourth = call().await.unwrap();
        assert!(fourth.headers().get("grpc-status").is_none());
    }
}
