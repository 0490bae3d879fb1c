//! How many connections and sessions a node takes.
//!
//! Every TCP connection costs the process a file descriptor, and so does each
//! of the node's own: the store's connections and files, Redis, log files, a
//! JWKS fetch. A node whose clients took the last descriptor could not
//! reconnect to its store or broker, so the connections clients hold are
//! capped below the process's open-file limit, leaving a reserve
//! ([`reserve`]) for the node's own; and WebSocket sessions are capped below
//! that, leaving room for the HTTP API, so a node full of sessions still
//! takes publishes.
//!
//! - At start `herald serve` raises its soft open-file limit to the hard one
//!   ([`raise_open_file_limit`]), as Go's runtime and nginx's
//!   `worker_rlimit_nofile` do: the soft limit is often 1024.
//! - `HERALD_MAX_CONNECTIONS` (default `auto`: the limit minus the reserve):
//!   at the cap the node stops accepting, and new connections wait in the
//!   listen queue until one closes ([`crate::listen::Slots`]).
//! - `HERALD_MAX_SESSIONS` (default `auto`: the connections minus 1% of
//!   them, and minus at least 64 when there are 128 or more, half below
//!   that, kept for the HTTP API): above it a handshake is
//!   refused before the upgrade with 503 `node_full` and `Retry-After`
//!   ([`crate::limit::Limits::node_place`]).

use std::fmt;

/// A capacity setting: `auto`, `off`, or a whole number of at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Auto,
    Off,
    At(usize),
}

/// The largest explicit cap: more than any process can open (Linux's
/// `fs.nr_open` stops at 2^30), and far below what a semaphore can count.
const MOST: usize = 1 << 32;

impl Cap {
    pub fn parse(v: &str) -> Result<Cap, String> {
        match v.trim() {
            "auto" => Ok(Cap::Auto),
            "off" | "0" => Ok(Cap::Off),
            n => match n.parse::<usize>() {
                Ok(n) if n <= MOST => Ok(Cap::At(n)),
                Ok(_) => Err(format!("`{n}` is more than any process can hold (at most {MOST})")),
                Err(_) => Err(format!("`{n}` is not a whole number (or `auto`, or `off`)")),
            },
        }
    }
}

/// What a node takes, resolved from the settings and the open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The process's soft open-file limit; `None` when it is unlimited.
    pub open_files: Option<u64>,
    /// Descriptors kept for the node's own use ([`reserve`]).
    pub reserve: usize,
    /// Client connections (HTTP and WebSocket) held at once; `None`: no cap.
    pub connections: Option<usize>,
    /// WebSocket sessions open at once; `None`: no cap of its own.
    pub sessions: Option<usize>,
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_off = |n: Option<usize>| n.map_or_else(|| "off".to_string(), |n| n.to_string());
        write!(
            f,
            "open files {}, connections {}, sessions {}",
            self.open_files.map_or_else(|| "unlimited".to_string(), |n| n.to_string()),
            or_off(self.connections),
            or_off(self.sessions)
        )
    }
}

/// Descriptors a node keeps for itself: a margin for the runtime, logs and
/// passing fetches (JWKS, trace export, certificate reloads), plus up to
/// three per store connection (a PostgreSQL socket; SQLite's database and
/// WAL files, with SQLite's reader threads counted in).
pub fn reserve(db_pool_size: u32) -> usize {
    64 + 3 * db_pool_size as usize
}

/// Sessions when `HERALD_MAX_SESSIONS` is `auto`: the connections minus
/// 1% of them, and minus at least 64 when that leaves half of them or more,
/// kept for HTTP requests (publishers' keep-alive pools, inbox reads).
fn auto_sessions(connections: usize) -> usize {
    let room = (connections / 100).max(64.min(connections / 2));
    connections - room
}

/// Resolves the two settings against `open_files` (the soft limit, `None`
/// when unlimited). An explicit cap the limit cannot hold is an error that
/// names the setting, as a bad setting is.
pub fn resolve(connections: Cap, sessions: Cap, reserve: usize, open_files: Option<u64>) -> Result<Capacity, String> {
    let budget = open_files.map(|n| usize::try_from(n).unwrap_or(usize::MAX).saturating_sub(reserve));
    let limit = open_files.map_or_else(String::new, |n| n.to_string());
    let connections = match (connections, budget) {
        (Cap::Off, _) | (Cap::Auto, None) => None,
        (Cap::Auto, Some(0)) => {
            return Err(format!(
                "HERALD_MAX_CONNECTIONS: this process may open {limit} files and the node keeps {reserve} for \
                 itself, which leaves none for clients: raise the limit (`ulimit -n`, systemd's LimitNOFILE=)"
            ))
        }
        (Cap::Auto, Some(budget)) => Some(budget),
        (Cap::At(n), Some(budget)) if n > budget => {
            return Err(format!(
                "HERALD_MAX_CONNECTIONS: {n} connections need {} open files with the {reserve} the node keeps for \
                 itself, and this process may open {limit}: raise the limit (`ulimit -n`, systemd's \
                 LimitNOFILE=) or lower the setting (at most {budget} here)",
                n + reserve
            ))
        }
        (Cap::At(n), _) => Some(n),
    };
    let sessions = match (sessions, connections) {
        (Cap::Off, _) | (Cap::Auto, None) => None,
        (Cap::Auto, Some(c)) => Some(auto_sessions(c)),
        (Cap::At(n), Some(c)) if n > c => {
            return Err(format!(
                "HERALD_MAX_SESSIONS: {n} is more than the {c} connections this node takes (HERALD_MAX_CONNECTIONS); \
                 every session is a connection"
            ))
        }
        (Cap::At(n), _) => Some(n),
    };
    Ok(Capacity { open_files, reserve, connections, sessions })
}

/// [`resolve`]s `settings` against the process's open-file limit now.
pub fn of(settings: &crate::config::Settings) -> Result<Capacity, String> {
    resolve(settings.max_connections, settings.max_sessions, reserve(settings.db_pool_size), open_file_limit())
}

/// The soft open-file limit, `None` when unlimited (or unknown).
pub fn open_file_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

/// Raises the soft open-file limit to the hard one. An unlimited hard
/// limit is raised towards instead: Linux's `fs.nr_open`, or else (macOS,
/// whose soft limit is 256) the first of 1,048,576, 65,536 and 10,240
/// (macOS's `OPEN_MAX`) the kernel takes. Returns the soft limit before and
/// after; a refused raise leaves it, and the capacity is worked out from it.
pub fn raise_open_file_limit() -> (Option<u64>, Option<u64>) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let before = open_file_limit();
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return (before, before) };
    let targets = if hard != RLIM_INFINITY {
        vec![hard]
    } else {
        match std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()) {
            Some(nr_open) => vec![nr_open],
            None => vec![1 << 20, 65_536, 10_240],
        }
    };
    if soft != RLIM_INFINITY {
        for target in targets.into_iter().filter(|t| *t > soft) {
            if setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
                break;
            }
        }
    }
    (before, open_file_limit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse() {
        assert_eq!(Cap::parse("auto"), Ok(Cap::Auto));
        assert_eq!(Cap::parse("off"), Ok(Cap::Off));
        assert_eq!(Cap::parse("0"), Ok(Cap::Off));
        assert_eq!(Cap::parse(" 500 "), Ok(Cap::At(500)));
        assert!(Cap::parse("-1").is_err());
        assert_eq!(Cap::parse("4294967296"), Ok(Cap::At(1 << 32)));
        assert!(Cap::parse("4294967297").is_err());
        assert!(Cap::parse("18446744073709551615").is_err());
        assert!(Cap::parse("lots").is_err());
    }

    #[test]
    fn auto_leaves_the_reserve_and_room_for_http() {
        let c = resolve(Cap::Auto, Cap::Auto, 88, Some(20_000)).unwrap();
        assert_eq!(c.connections, Some(19_912));
        assert_eq!(c.sessions, Some(19_912 - 199));
        // A soft limit of 1024: 64 connections kept for HTTP.
        let c = resolve(Cap::Auto, Cap::Auto, 88, Some(1024)).unwrap();
        assert_eq!((c.connections, c.sessions), (Some(936), Some(872)));
        // A tiny limit: half for HTTP.
        let c = resolve(Cap::Auto, Cap::Auto, 88, Some(100)).unwrap();
        assert_eq!((c.connections, c.sessions), (Some(12), Some(6)));
        // Unlimited: no caps.
        let c = resolve(Cap::Auto, Cap::Auto, 88, None).unwrap();
        assert_eq!((c.connections, c.sessions), (None, None));
    }

    #[test]
    fn explicit_caps_must_fit() {
        let c = resolve(Cap::At(500), Cap::At(400), 88, Some(1024)).unwrap();
        assert_eq!((c.connections, c.sessions), (Some(500), Some(400)));
        // Sessions follow an explicit connection cap.
        let c = resolve(Cap::At(10_000), Cap::Auto, 88, Some(20_000)).unwrap();
        assert_eq!(c.sessions, Some(9_900));
        // All of the budget may be used, not more.
        assert!(resolve(Cap::At(936), Cap::Auto, 88, Some(1024)).is_ok());
        let e = resolve(Cap::At(937), Cap::Auto, 88, Some(1024)).unwrap_err();
        assert!(e.starts_with("HERALD_MAX_CONNECTIONS") && e.contains("at most 936"), "{e}");
        let e = resolve(Cap::At(500), Cap::At(501), 88, Some(1024)).unwrap_err();
        assert!(e.starts_with("HERALD_MAX_SESSIONS"), "{e}");
        let e = resolve(Cap::Auto, Cap::Auto, 88, Some(80)).unwrap_err();
        assert!(e.starts_with("HERALD_MAX_CONNECTIONS"), "{e}");
        // Off is off, whatever the limit.
        let c = resolve(Cap::Off, Cap::At(50_000), 88, Some(1024)).unwrap();
        assert_eq!((c.connections, c.sessions), (None, Some(50_000)));
        let c = resolve(Cap::At(500), Cap::Off, 88, None).unwrap();
        assert_eq!((c.connections, c.sessions), (Some(500), None));
    }
}
