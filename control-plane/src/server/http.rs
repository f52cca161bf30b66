//! The controller's plain HTTP endpoint (`--http-listen`): `/healthz` and `/readyz` for
//! kubelet probes, which cannot present client certificates to the gRPC port.
//!
//! - `/healthz`: 200 while the process serves HTTP at all.
//! - `/readyz`: 200 once the source's first full read is published (agents then get a
//!   whole cluster, never a half-listed one) and the gRPC server runs; 503 before, with
//!   the reason.
//! - `/metrics`: the Prometheus text of [`super::metrics::ControllerMetrics`].

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use super::metrics::SharedMetrics;

/// How long a client may take to send its request headers (slow clients hold nothing).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the probes report.
#[derive(Clone, Debug)]
pub struct Probes {
    /// The hub's readiness: the source's first full read is published.
    pub source_ready: watch::Receiver<bool>,
    /// Whether the gRPC server is serving.
    pub serving: watch::Receiver<bool>,
    /// What `/metrics` exports.
    pub metrics: SharedMetrics,
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "text/plain; charset=utf-8")
        .header("X-Content-Type-Options", "nosniff")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static headers are valid")
}

/// The answer to one request; `metrics` gives the exposition text when asked for it.
/// Pure but for `metrics`.
pub fn answer(
    method: &Method,
    path: &str,
    source_ready: bool,
    serving: bool,
    metrics: impl FnOnce() -> String,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
    }
    match path {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match (source_ready, serving) {
            (true, true) => text(StatusCode::OK, "ok\n"),
            (false, _) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the source's first full read is not published yet\n",
            ),
            (true, false) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the gRPC server is not serving\n",
            ),
        },
        "/metrics" => Response::builder()
            .status(StatusCode::OK)
            .header(
                "Content-Type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(metrics())))
            .expect("static headers are valid"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}

/// Serves the probes on `listener` until the returned task is aborted.
pub fn serve(listener: TcpListener, probes: Probes) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let probes = probes.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let response = answer(
                        request.method(),
                        request.uri().path(),
                        *probes.source_ready.borrow(),
                        *probes.serving.borrow(),
                        || probes.metrics.encode(),
                    );
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(16 << 10)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "HTTP connection ended with an error");
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_answer_as_kubelet_expects() {
        let get = Method::GET;
        let cases = [
            ("/healthz", false, false, 200),
            ("/livez", false, false, 200),
            ("/readyz", false, true, 503),
            ("/readyz", true, false, 503),
            ("/readyz", true, true, 200),
            ("/metrics", false, false, 200),
            ("/other", true, true, 404),
        ];
        for (path, source_ready, serving, expected) in cases {
            let response = answer(&get, path, source_ready, serving, String::new);
            assert_eq!(
                response.status().as_u16(),
                expected,
                "{path} {source_ready} {serving}"
            );
        }
        assert_eq!(
            answer(&Method::POST, "/healthz", true, true, String::new).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
