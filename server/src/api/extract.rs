//! Extractors that answer refusals with *our* error body: credentials,
//! JSON bodies and query strings.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::auth::{bearer, AuthError, Scopes, UserToken};
use crate::limit::Decision;
use crate::AppState;

fn authorization(parts: &Parts) -> Option<&str> {
    parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer)
}

/// A backend service whose API key grants at least one of the scopes `S`
/// (the bits of a [`Scopes`]); the aliases below name what each route needs.
/// A key that is not configured is a 401, a key without the scope a 403
/// `insufficient_scope` (spec §4).
pub struct ApiKey<const S: u8>;

/// History, unread counts and presence: the `read` scope.
pub type ReadKey = ApiKey<{ Scopes::READ.bits() }>;
/// Marking a user's notifications read: the `publish` scope (publishing
/// itself also counts the key's publish rate: [`Publisher`]).
pub type PublishKey = ApiKey<{ Scopes::PUBLISH.bits() }>;
/// Job status: `read`, or `publish` (whoever starts a job follows it).
pub type JobKey = ApiKey<{ Scopes::READ.union(Scopes::PUBLISH).bits() }>;
/// Erasure: the `erase` scope.
pub type EraseKey = ApiKey<{ Scopes::ERASE.bits() }>;
/// Closing a user's sessions: the `disconnect` scope.
pub type DisconnectKey = ApiKey<{ Scopes::DISCONNECT.bits() }>;

impl<const S: u8> FromRequestParts<AppState> for ApiKey<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        api_key(parts, state, Scopes::from_bits(S)).map(|_| ApiKey)
    }
}

fn api_key<'a>(parts: &'a Parts, state: &AppState, wanted: Scopes) -> Result<&'a str, ApiError> {
    let key = authorization(parts)
        .ok_or_else(|| ApiError::unauthorized("missing_api_key", "send Authorization: Bearer <api key>"))?;
    match state.api_keys.check(key) {
        None => Err(ApiError::unauthorized("invalid_api_key", "the API key is not valid")),
        Some(granted) if !granted.any_of(wanted) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!(
                "this API key may not do this: it needs the {} scope, and it has {}",
                wanted.names().replace(", ", " or "),
                granted.names()
            ),
        )),
        Some(_) => Ok(key),
    }
}

/// A backend service whose API key may publish and has room under its
/// publish rate (checked before the body is read). Carries the rate's state
/// for the `X-RateLimit-*` headers; `None` when publishes are not limited.
pub struct Publisher(pub Option<Decision>);

impl FromRequestParts<AppState> for Publisher {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = api_key(parts, state, Scopes::PUBLISH)?;
        let rate = state.limits.publish(key).await;
        match rate {
            Some(d) if !d.allowed => Err(ApiError::rate_limited(
                "this API key is over its publish rate; retry after Retry-After seconds",
                d.retry_after_secs(),
                Some(d),
            )),
            rate => Ok(Publisher(rate)),
        }
    }
}

/// The client's IP for the abuse limits: the TCP peer, or what a trusted
/// proxy forwarded (see [`crate::limit`]). `None` if the server did not
/// record the peer.
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        Ok(ClientIp(state.limits.client_ip(peer, &parts.headers)))
    }
}

/// A user holding a valid token (`Authorization: Bearer <jwt>`).
pub struct User(pub UserToken);

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = authorization(parts).ok_or(AuthError::Missing)?;
        Ok(User(state.authenticate(token).await?))
    }
}

/// A JSON body; malformed → 400, well-formed but wrong → 422, too big → 413.
pub struct JsonBody<T>(pub T);

/// The body must arrive within `HERALD_BODY_TIMEOUT` once the headers are
/// in, or the request gets 408 `request_timeout` (a client that stalls
/// its body would otherwise hold the connection for as long as it likes).
impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let read = axum::Json::<T>::from_request(req, state);
        match tokio::time::timeout(state.settings.body_timeout, read).await {
            Ok(Ok(axum::Json(value))) => Ok(JsonBody(value)),
            Ok(Err(rejection)) => Err(json_error(rejection)),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request body did not arrive within {:?}", state.settings.body_timeout),
            )),
        }
    }
}

/// Refuses a body whose `Content-Length` is over `limit` from the headers
/// alone (413), before any of it is read, so a client that sent `Expect:
/// 100-continue` is not told to go on and upload it. A body without a
/// length (chunked) is cut off at the limit while it is read
/// (`DefaultBodyLimit`, the same 413).
pub async fn declared_length(State(limit): State<usize>, request: Request, next: Next) -> Result<Response, ApiError> {
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    Ok(next.run(request).await)
}

fn too_large() -> ApiError {
    ApiError::too_large("the request body is too large")
}

fn json_error(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => ApiError::unprocessable("invalid_request", e.body_text()),
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request("bad_request", e.body_text()),
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::bad_request("bad_request", "send Content-Type: application/json")
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        other => ApiError::bad_request("bad_request", other.body_text()),
    }
}

/// A query string; anything unparsable → 400 `invalid_query`.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(QueryParams(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(ApiError::bad_request("invalid_query", e.body_text()))
            }
            Err(other) => Err(ApiError::bad_request("invalid_query", other.body_text())),
        }
    }
}

/// `{user_id}` and `{jti}` path segments, 1 to 256 bytes each
/// (percent-decoded: a `jti` with a `/` in it is sent as `%2F`).
pub struct UserTokenPath {
    pub user: String,
    pub jti: String,
}

impl<S: Send + Sync> FromRequestParts<S> for UserTokenPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (user, jti) = user_and(parts, state).await?;
        crate::auth::check_token_id(&jti).map_err(|m| ApiError::bad_request("invalid_jti", m))?;
        Ok(UserTokenPath { user, jti })
    }
}

/// `{user_id}` and `{session_id}` path segments: a session id is the
/// UUID a `welcome` carries.
pub struct UserSessionPath {
    pub user: String,
    pub session_id: uuid::Uuid,
}

impl<S: Send + Sync> FromRequestParts<S> for UserSessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (user, session_id) = user_and(parts, state).await?;
        let session_id = session_id.parse().map_err(|_| {
            ApiError::bad_request("invalid_session_id", "a session id is the UUID its `welcome` frame carries")
        })?;
        Ok(UserSessionPath { user, session_id })
    }
}

/// A checked `{user_id}` and the path segment after it.
async fn user_and<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<(String, String), ApiError> {
    let axum::extract::Path((user, second)) = axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
        .await
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
    crate::api::publish::check_user_id(&user).map_err(|m| ApiError::bad_request("invalid_user_id", m))?;
    Ok((user, second))
}

/// A `{user_id}` path segment, 1 to 256 bytes.
pub struct UserPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for UserPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(user) = axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_user_id", e.body_text()))?;
        crate::api::publish::check_user_id(&user).map_err(|m| ApiError::bad_request("invalid_user_id", m))?;
        Ok(UserPath(user))
    }
}
