//! `herald-loadtest`: the load generator for Herald.
//!
//! The scenarios (`idle`, `unicast`, `fanout`, `storm`, `slow`) arrive with
//! the load-test issue; until then this binary only checks that a node
//! answers, so the crate and its dependency on `herald-client` stay built.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "herald-loadtest", about = "Load generator for Herald")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish one notification and read it back over a WebSocket.
    Check {
        /// The node, e.g. http://127.0.0.1:8080.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long)]
        api_key: String,
        /// A user token for `--user`.
        #[arg(long)]
        token: String,
        #[arg(long, default_value = "alice")]
        user: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Check { url, api_key, token, user } => {
            let ws = url.replacen("http", "ws", 1);
            let mut session = herald_client::Connect::new(ws, token).connect().await?;
            let published = herald_client::Publisher::new(&url, api_key)
                .publish_one(&user, "loadtest.check", serde_json::json!({"check": true}))
                .await?;
            let started = std::time::Instant::now();
            loop {
                if let herald_client::ServerFrame::Notification(n) = session.next_frame().await? {
                    if n.seq == published.seq {
                        println!("seq {} delivered in {:?}", n.seq, started.elapsed());
                        return Ok(());
                    }
                }
            }
        }
    }
}
