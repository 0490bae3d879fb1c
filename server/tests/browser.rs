//! The browser SDK's suite (`clients/js/test`, node:test) in headless Chromium
//! against this build's `herald` binary over wss: resume across a restart,
//! in-band token refresh, read marks across devices, tab sharing, close codes,
//! a browser's session listed with its own `User-Agent` and closed alone,
//! resuming across a restore from a backup (store epochs),
//! the /demo page, and the committed `dist/` matching `src/`.
//!
//! Needs Node.js (≥ 20, with npm) and Chromium at /usr/bin/chromium (or
//! `HERALD_CHROMIUM`); CI installs both. Without them this test fails and says
//! what is missing: it never passes by skipping. `npm ci` runs first when
//! `clients/js/node_modules` is missing. The suite's output streams as it runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_herald");

fn js_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js").canonicalize().expect("clients/js exists")
}

/// `program --version`, or a failure that says how to get it.
fn require_tool(program: &str, hint: &str) {
    match Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("`{program} --version` failed ({status}): {hint}"),
        Err(e) => panic!("`{program}` cannot be run ({e}): {hint}"),
    }
}

#[test]
fn browser_sdk_suite_passes_in_headless_chromium() {
    let js = js_root();
    require_tool("node", "the browser suite needs Node.js 20 or newer (e.g. `apt-get install nodejs npm`)");
    let chromium = std::env::var("HERALD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: the browser suite needs it (`apt-get install chromium`, or set HERALD_CHROMIUM)"
    );

    if !js.join("node_modules").exists() {
        require_tool("npm", "installing the SDK's dev dependencies needs npm");
        eprintln!("browser suite: npm ci in {}", js.display());
        let status =
            Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(&js).status().expect("npm runs");
        assert!(status.success(), "`npm ci` in {} failed ({status})", js.display());
    }

    let started = Instant::now();
    // Inherited stdout and stderr: the TAP output streams past cargo's capture.
    let status = Command::new("node")
        .args(["--test", "test/"])
        .current_dir(&js)
        .env("HERALD_BIN", BIN)
        .env("HERALD_CHROMIUM", &chromium)
        .status()
        .expect("node runs");
    eprintln!("browser suite: {status} after {:.1} s", started.elapsed().as_secs_f64());
    assert!(status.success(), "the browser suite failed ({status}); its output is above");
}
