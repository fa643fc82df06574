//! The HTTP endpoint: `/healthz` (the process serves), `/readyz` (recovery is complete and
//! clients are accepted), `/metrics` (Prometheus text from `metrics`) and the management
//! API under `/api` (`management`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::broker::Broker;

pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::management::router())
        .with_state(broker)
}

async fn readyz(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    if broker.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        broker.metrics.render(&broker.node),
    )
}

pub async fn serve(listener: TcpListener, broker: Arc<Broker>) {
    let mut shutdown = broker.shutdown.subscribe();
    let app = router(broker);
    // The management API needs the caller's address (the loopback-only users).
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP endpoint failed");
    }
}
