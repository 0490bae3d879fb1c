//! Any bytes a backend could POST to /v1/notifications.
#![no_main]

use std::sync::OnceLock;

use herald_server::config::Settings;
use libfuzzer_sys::fuzz_target;

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let env: std::collections::HashMap<String, String> =
            [("HERALD_JWT_SECRET", "fuzz-secret-0123456789abcdef"), ("HERALD_API_KEYS", "k")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        Settings::load(&env, None).expect("fuzz settings")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = herald_server::api::publish::parse_body(settings(), data);
});
