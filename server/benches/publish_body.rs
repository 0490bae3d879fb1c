//! Reading a publish body: what `POST /v1/notifications` costs before the
//! store — JSON into the request type, then the checks (`parse_body`).
//!
//! `cargo bench -p herald-server --bench publish_body` prints microseconds
//! per call (the best of five rounds). Results: docs/BENCHMARKS.md.

use std::hint::black_box;
use std::time::Instant;

use herald_server::api::publish::parse_body;
use herald_server::config::Settings;

/// The best per-call time of five rounds of `calls` calls of `f()`, in µs.
fn best_of_five(calls: u32, mut f: impl FnMut() -> usize) -> f64 {
    (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..calls {
                black_box(f());
            }
            started.elapsed().as_secs_f64() * 1e6 / f64::from(calls)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let env = std::collections::HashMap::from([("HERALD_API_KEYS", "k")]);
    let settings = Settings::load(&env, None).expect("settings");
    // As the load tool publishes: one user, a 40-byte payload.
    let one = br#"{"user_id":"lt0b7117e6-100","topic":"loadtest","payload":{"sent_ns":1764980000000000000,"pad":""}}"#;
    // A richer payload: nested objects, escapes, numbers (≈1 KiB).
    let item = r#"{"order":{"id":"A-1029","total":129.95,"lines":[{"sku":"x\u00e9-1","qty":2},{"sku":"y-2","qty":1}]},"note":"line\nbreak","ok":true}"#;
    let rich = format!(r#"{{"user_id":"alice","topic":"orders","payload":[{}]}}"#, [item; 8].join(","));
    // 1,000 users, as the batched load runs publish.
    let users: Vec<String> = (0..1000).map(|i| format!("\"lt0b7117e6-{i}\"")).collect();
    let batch =
        format!(r#"{{"user_ids":[{}],"topic":"loadtest","payload":{{"sent_ns":1,"pad":""}}}}"#, users.join(","));
    let parse = |body: &[u8]| parse_body(&settings, body).expect("a valid publish").1.len();
    println!("one user, 40-byte payload      {:7.3} µs", best_of_five(1_000_000, || parse(one)));
    println!("one user, {} B payload       {:7.3} µs", rich.len(), best_of_five(200_000, || parse(rich.as_bytes())));
    println!("1,000 users, 40-byte payload   {:7.3} µs", best_of_five(2_000, || parse(batch.as_bytes())));
}
