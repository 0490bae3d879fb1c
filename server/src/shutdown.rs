//! Serving until shutdown, then draining (spec §5.5): on the signal the node
//! turns not-ready, answers new upgrades with 503 `draining`, closes every
//! session with 1001, keeps accepting for `drain_grace` (so load balancers
//! see it go), finishes the requests it accepted — publishes included — and
//! returns within `shutdown_deadline` whatever is still running.

use std::io;

use tokio::net::TcpListener;
use tokio::time::{sleep, timeout_at, Instant};

use crate::store::now_ms;
use crate::AppState;

/// Serves `state` on `listener` until `state.shutdown` is cancelled, then drains.
pub async fn serve(state: AppState, listener: TcpListener) {
    let shutdown = state.shutdown.clone();
    let settings = state.settings.clone();
    let purge = tokio::spawn(retention(state.clone()));
    let mut workers = tokio::spawn(crate::worker::jobs::run(state.clone()));
    let lag_probe = tokio::spawn(crate::telemetry::runtime_lag_probe(state.metrics.clone(), shutdown.clone()));
    // One node alone learns of every revocation as it takes it.
    let revocations = settings.redis_url.is_some().then(|| {
        let follow =
            crate::auth::revocations::follow(state.clone(), state.revocations_loaded_at_ms, settings.repair_interval);
        tokio::spawn(follow)
    });

    let stop_accepting = {
        let shutdown = shutdown.clone();
        let grace = settings.drain_grace;
        async move {
            shutdown.cancelled().await;
            sleep(grace).await;
        }
    };
    let app = crate::api::router(state.clone());
    let limits = crate::listen::ConnectionLimits {
        header_timeout: settings.header_timeout,
        max_header_bytes: settings.max_header_bytes,
    };
    let accept = crate::listen::Accept::new(listener, state.connections.clone());
    let mut server = match &settings.tls {
        None => tokio::spawn(async move {
            crate::listen::serve(accept, app, limits, stop_accepting).await;
            Ok(())
        }),
        // The files were checked with the settings; they can still change before this.
        Some(files) => match crate::tls::Tls::new(files).map_err(io::Error::other) {
            Ok(tls) => tokio::spawn(async move {
                crate::listen::serve(tls.listen(accept), app, limits, stop_accepting).await;
                Ok(())
            }),
            Err(e) => tokio::spawn(async move { Err(e) }),
        },
    };

    // Shutdown first: with no drain grace the server can finish in the same
    // instant, and that is the drain, not a failure. A finished server's
    // handle must not be awaited again (it panics).
    let mut server_done = false;
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {}
        result = &mut server => {
            server_done = true;
            tracing::error!(?result, "the HTTP server stopped on its own");
            shutdown.cancel();
        }
    }
    tracing::info!(sessions = state.metrics.sessions_active.get(), "draining");
    let deadline = Instant::now() + settings.shutdown_deadline;
    let drained = timeout_at(deadline, async {
        if !server_done {
            let _ = (&mut server).await;
        }
        state.sessions.close();
        state.sessions.wait().await;
        // Workers finish the batch in hand and hand their jobs back.
        let _ = (&mut workers).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown deadline passed with work in flight; stopping anyway");
        server.abort();
        workers.abort();
    }
    state.pool.close();
    purge.abort();
    lag_probe.abort();
    if let Some(follow) = revocations {
        follow.abort();
    }
    state.broker.close().await;
    state.store.close().await;
    tracing::info!("stopped");
}

/// Deletes notifications older than the retention (and the idempotency keys
/// of digest entries whose digest is as old), and token revocations past
/// their `expires_at`, every `purge_interval`.
async fn retention(state: AppState) {
    let settings = &state.settings;
    let mut tick = tokio::time::interval(settings.purge_interval);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = now_ms() - settings.retention.as_millis() as i64;
        match state.store.purge(before).await {
            Ok(0) => {}
            Ok(n) => {
                state.metrics.notifications_purged.inc_by(n);
                tracing::info!(purged = n, "retention purge");
            }
            Err(e) => tracing::warn!(error = %e, "retention purge failed; retrying next interval"),
        }
        match state.store.digest_purge_keys(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "digest entry keys past retention deleted"),
            Err(e) => tracing::warn!(error = %e, "purging digest entry keys failed; retrying next interval"),
        }
        let now_secs = crate::auth::unix_now();
        match state.store.purge_revocations(now_secs).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired token revocations deleted"),
            Err(e) => tracing::warn!(error = %e, "purging expired revocations failed; retrying next interval"),
        }
        state.hub.forget_expired_revocations(now_secs);
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
