//! Flags every scenario shares.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Node base URLs (http://host:port), repeated or comma-separated;
    /// clients are spread over them round robin.
    #[arg(long = "url", value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    pub urls: Vec<String>,
    /// The nodes' HERALD_JWT_SECRET, to mint user tokens.
    #[arg(long)]
    pub jwt_secret: String,
    /// One of the nodes' HERALD_API_KEYS, to publish.
    #[arg(long)]
    pub api_key: String,
    /// A herald process to read RSS and CPU of (/proc); repeat for several.
    #[arg(long = "herald-pid")]
    pub herald_pids: Vec<u32>,
    /// Namespace of the run's users (`<prefix>-<n>`); default: a random run id.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Result folder; default target/loadtest/<scenario>-<timestamp>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Free text recorded with the results (e.g. "sqlite" or "postgres+redis").
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct Clients {
    /// WebSocket clients, one user each.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Worker processes holding the clients (default: one per 15,000).
    #[arg(long)]
    pub processes: Option<usize>,
    /// Source addresses to connect from: a range `127.0.0.2-127.0.0.7` or a
    /// comma list. Each gives ~28k ephemeral ports.
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Handshakes per second, all workers together (0: as fast as they go).
    #[arg(long, default_value_t = 2000.0)]
    pub ramp_rate: f64,
    /// Handshakes in flight at once per worker.
    #[arg(long, default_value_t = 128)]
    pub max_inflight: usize,
}

impl Common {
    pub fn prefix(&self) -> String {
        self.prefix.clone().unwrap_or_else(|| format!("lt{:08x}", rand::random::<u32>()))
    }

    /// The nodes as `ws://host:port`.
    pub fn ws_urls(&self) -> anyhow::Result<Vec<String>> {
        self.urls
            .iter()
            .map(|u| match u.trim_end_matches('/').split_once("://") {
                Some(("http" | "ws", rest)) => Ok(format!("ws://{rest}")),
                Some((scheme, _)) => {
                    bail!("--url {u}: {scheme} is not supported by the load generator (plain http only)")
                }
                None => Ok(format!("ws://{u}")),
            })
            .collect()
    }

    /// The nodes as `http://host:port`.
    pub fn http_urls(&self) -> Vec<String> {
        self.urls
            .iter()
            .map(|u| match u.trim_end_matches('/').split_once("://") {
                Some((_, rest)) => format!("http://{rest}"),
                None => format!("http://{u}"),
            })
            .collect()
    }
}

impl Clients {
    pub fn processes(&self) -> usize {
        self.processes.unwrap_or(self.connections.div_ceil(15_000)).clamp(1, self.connections.max(1))
    }

    pub fn source_ips(&self) -> anyhow::Result<Vec<IpAddr>> {
        self.source_ips.as_deref().map_or(Ok(Vec::new()), parse_ips)
    }
}

/// `127.0.0.2-127.0.0.7` (IPv4 only) or `a,b,c`.
pub fn parse_ips(text: &str) -> anyhow::Result<Vec<IpAddr>> {
    if let Some((a, b)) = text.split_once('-') {
        let a: Ipv4Addr = a.trim().parse().with_context(|| format!("bad address {a}"))?;
        let b: Ipv4Addr = b.trim().parse().with_context(|| format!("bad address {b}"))?;
        let (a, b) = (u32::from(a), u32::from(b));
        if b < a || b - a > 1024 {
            bail!("--source-ips {text}: the range is empty or too long");
        }
        return Ok((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))).collect());
    }
    text.split(',').map(|s| s.trim().parse().with_context(|| format!("bad address {s}"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists_and_ranges() {
        let r = parse_ips("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[2].to_string(), "127.0.0.4");
        assert_eq!(parse_ips("127.0.0.2, ::1").unwrap().len(), 2);
        assert!(parse_ips("127.0.0.9-127.0.0.2").is_err());
    }
}
