//! How every node knows every token revocation without reading the
//! database on a handshake.
//!
//! The revocations live in the `revocations` table (one row per user, only
//! ever raised) and the `token_revocations` table (one row per token revoked
//! alone, by its `jti`) and, on each node, in memory in the [`Hub`](crate::hub::Hub),
//! which [`Node::authenticate`](crate::Node::authenticate) and each session
//! consult. A node learns of one in three ways:
//! - at start, [`load`] reads them all before the node serves;
//! - the node that takes `POST /v1/users/{id}/tokens/revoke` (or
//!   `…/tokens/{jti}/revoke`) stores it, then publishes a [`Delivery::Revoke`]
//!   (a [`Delivery::RevokeToken`]): its own hub at once, and with Redis
//!   every node serving one of the user's sessions (they subscribe to the
//!   user's channel), which closes those sessions;
//! - with Redis, [`follow`] re-reads every `HERALD_REPAIR_INTERVAL` the rows
//!   changed since its last read (by the database's clock, with an overlap for
//!   writes that committed late), for the nodes that serve none of the user's
//!   sessions, and those that lost the message. A session opened with a
//!   revoked token on such a node in the meantime closes when it learns.

use std::time::Duration;

use crate::hub::{Delivery, Hub};
use crate::store::{Store, StoreError};
use crate::AppState;

/// How far back each re-read reaches before the previous one began: more
/// than a statement may take between stamping its row and committing.
const OVERLAP_MS: i64 = 30_000;

/// Reads every stored revocation into `hub`; the store's clock at the read.
pub async fn load(store: &dyn Store, hub: &Hub) -> Result<i64, StoreError> {
    read(store, hub, None).await
}

async fn read(store: &dyn Store, hub: &Hub, since_ms: Option<i64>) -> Result<i64, StoreError> {
    let read = store.revocations(since_ms).await?;
    for r in &read.changed {
        hub.deliver(&r.user_id, &Delivery::Revoke { issued_before: r.issued_before, expires_at: r.expires_at });
    }
    for r in &read.tokens {
        hub.deliver(&r.user_id, &Delivery::RevokeToken { jti: r.jti.as_str().into(), expires_at: r.expires_at });
    }
    Ok(read.as_of_ms)
}

/// With Redis: re-reads the revocations changed since `as_of_ms` (from
/// [`load`]) every `interval`, until the node drains.
pub async fn follow(state: AppState, mut as_of_ms: i64, interval: Duration) {
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let reread = read(state.store.as_ref(), &state.hub, Some(as_of_ms.saturating_sub(OVERLAP_MS)));
        match state.metrics.store_op("revocations", reread).await {
            Ok(now) => as_of_ms = now,
            Err(e) => tracing::warn!(error = %e, "could not re-read token revocations; retrying next interval"),
        }
    }
}
