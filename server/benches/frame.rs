//! Encoding a stored notification as its frame: what every replayed
//! notification costs before it reaches the socket.
//!
//! `cargo bench -p herald-server --bench frame` prints nanoseconds per call
//! (the best of five rounds of a million). Results: docs/BENCHMARKS.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use herald_server::store::{rfc3339_ms, StoredNotification};
use serde_json::value::RawValue;

const CALLS: u32 = 1_000_000;

/// The best per-call time of five rounds of `CALLS` calls of `f(i)`.
fn best_of_five(mut f: impl FnMut(u32) -> usize) -> f64 {
    (0..5)
        .map(|_| {
            let started = Instant::now();
            for i in 0..CALLS {
                black_box(f(black_box(i)));
            }
            started.elapsed().as_nanos() as f64 / f64::from(CALLS)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // As the load tool publishes: a 40-byte payload, a UUIDv7 id.
    let stored = StoredNotification {
        user_id: "lt0b7117e6-100".into(),
        seq: 42,
        id: "019aef3c-5e1d-7c4a-9b1e-3f2a4c5d6e7f".into(),
        topic: "loadtest".into(),
        payload: Arc::from(RawValue::from_string(r#"{"sent_ns":1764980000000000000,"pad":""}"#.into()).unwrap()),
        created_at_ms: 1_764_980_000_123,
        read: false,
    };
    let created_at = |i: u32| 1_764_980_000_123 + i64::from(i) * 7;
    println!("rfc3339_ms                 {:6.1} ns", best_of_five(|i| rfc3339_ms(created_at(i)).len()));
    let mut n = stored.clone();
    println!(
        "StoredNotification::frame {:6.1} ns",
        best_of_five(|i| {
            n.created_at_ms = created_at(i);
            n.frame().len()
        })
    );
}
