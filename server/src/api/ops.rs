//! Operations: liveness, readiness, metrics.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;
use tokio::time::timeout;

use super::error::ApiError;
use crate::telemetry::PoolState;
use crate::AppState;

/// A probe answers within this, whatever the database does (load balancers
/// time out probes after a second or two).
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// 200 while the process runs.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when the store and broker answer and the node is not draining.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::draining());
    }
    match timeout(PROBE_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => {}
        outcome => {
            tracing::warn!(?outcome, "not ready: store");
            return Err(ApiError::unavailable("store_unavailable", "the store is not answering"));
        }
    }
    match timeout(PROBE_TIMEOUT, state.broker.ping()).await {
        Ok(Ok(())) => {}
        outcome => {
            tracing::warn!(?outcome, "not ready: broker");
            return Err(ApiError::unavailable("broker_unavailable", "the broker is not answering"));
        }
    }
    Ok(Json(json!({"status": "ready", "node_id": state.settings.node_id})))
}

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let (busy, idle) = state.store.pool_usage();
    let pool = &state.metrics.db_pool_connections;
    pool.get_or_create(&PoolState { state: "busy" }).set(busy.into());
    pool.get_or_create(&PoolState { state: "idle" }).set(idle.into());
    state.metrics.revoked_users.set(state.hub.revocation_count() as i64);
    state.metrics.revoked_tokens.set(state.hub.token_revocation_count() as i64);
    state.metrics.connections_open.set(state.connections.open() as i64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.encode())
}
