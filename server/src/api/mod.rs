//! The HTTP API (spec §3): publishing for backend services, the inbox for
//! users, and operations endpoints. Handlers are thin: they check
//! credentials and input, then call the store, the broker and the hub.

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{middleware, Router};

use crate::AppState;

pub mod cors;
mod demo;
pub mod error;
pub mod extract;
mod inbox;
mod jobs;
mod ops;
pub mod publish;
pub mod request;
mod revoke;
mod sessions;

use error::ApiError;

pub fn router(state: AppState) -> Router {
    let settings = &state.settings;
    // Publishes: room for the payload plus the largest audience (user ids are
    // at most 256 bytes). Everything else is small.
    let publish_limit = settings.max_payload_bytes + settings.max_audience * 260 + 64 * 1024;
    let body_limit = settings.max_payload_bytes + 64 * 1024;
    // Where a body is read, one declared over the limit is refused before it is sent.
    let declared = |limit| middleware::from_fn_with_state(limit, extract::declared_length);
    // The user's own routes, called from browser apps on other origins.
    // Each takes OPTIONS, so that a preflight reaches the CORS layer.
    let me = Router::new()
        .route("/v1/me/notifications", get(inbox::list).options(cors::options("GET, HEAD, OPTIONS")))
        .route(
            "/v1/me/notifications/read",
            post(inbox::mark_read).layer(declared(body_limit)).options(cors::options("POST, OPTIONS")),
        )
        .route("/v1/me/unread", get(inbox::unread).options(cors::options("GET, HEAD, OPTIONS")))
        .layer(middleware::from_fn_with_state(state.clone(), cors::cors));
    Router::new()
        .route("/v1/ws", get(crate::ws::handshake::upgrade))
        .route(
            "/v1/notifications",
            post(publish::publish).layer(DefaultBodyLimit::max(publish_limit)).layer(declared(publish_limit)),
        )
        .route("/v1/jobs/{id}", get(jobs::status))
        .route("/v1/users/{user_id}/notifications", get(inbox::user_history).delete(inbox::erase))
        .route("/v1/users/{user_id}/presence", get(sessions::presence))
        .route("/v1/users/{user_id}/sessions", get(sessions::list).delete(sessions::disconnect))
        .route("/v1/users/{user_id}/sessions/{session_id}", delete(sessions::disconnect_one))
        .route("/v1/users/{user_id}/notifications/read", post(inbox::user_mark_read).layer(declared(body_limit)))
        .route("/v1/users/{user_id}/unread", get(inbox::user_unread))
        .route("/v1/users/{user_id}/tokens/revoke", post(revoke::revoke).layer(declared(body_limit)))
        .route("/v1/users/{user_id}/tokens/{jti}/revoke", post(revoke::revoke_token).layer(declared(body_limit)))
        .merge(me)
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .merge(demo::routes(settings.dev_mode).route_layer(declared(body_limit)))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(settings.max_header_bytes, crate::listen::header_size))
        .layer(middleware::from_fn_with_state(error::UnavailableLog::default(), error::log_errors))
        .layer(middleware::from_fn_with_state(state.metrics.clone(), request::traced))
        .with_state(state)
}
