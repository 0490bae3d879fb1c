//! Operations: liveness, readiness, metrics.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use crate::AppState;

/// 200 while the process runs.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when the store and broker answer and the node is not draining.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::draining());
    }
    if let Err(e) = state.store.ping().await {
        tracing::warn!(error = %e, "not ready: store");
        return Err(ApiError::unavailable("store_unavailable", "the store is not answering"));
    }
    if let Err(e) = state.broker.ping().await {
        tracing::warn!(error = %e, "not ready: broker");
        return Err(ApiError::unavailable("broker_unavailable", "the broker is not answering"));
    }
    Ok(Json(json!({"status": "ready", "node_id": state.settings.node_id})))
}

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.encode())
}
