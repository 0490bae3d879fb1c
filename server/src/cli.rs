//! The `herald` command line: `serve` (the default), `migrate`, `check`, `backup`,
//! `restore`, `mark-restored`, `token`, `publish`, `erase`, `sessions`, `disconnect`, `revoke`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::auth::Scopes;
use crate::config::{ProcessEnv, Settings};
use crate::{auth, shutdown, store, telemetry, AppState};

#[derive(Parser)]
#[command(name = "herald", version, about = "Herald, a real-time notification server")]
pub struct Cli {
    /// A TOML file with settings (keys: the HERALD_* names in lower case, without the prefix).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Run the database migrations, then exit.
    Migrate,
    /// Copy the SQLite store into a new file: a consistent snapshot, safe
    /// while the node runs (copying the file is not). PostgreSQL: use pg_dump.
    Backup {
        /// The file to write; it must not exist.
        #[arg(long)]
        to: PathBuf,
    },
    /// Put a `herald backup` in place of the SQLite store (stop the node
    /// first) and mark the store restored. PostgreSQL: pg_restore, then
    /// `herald mark-restored`.
    Restore {
        /// The backup to restore.
        #[arg(long)]
        from: PathBuf,
    },
    /// Record that the store was just restored from a backup (a new store
    /// epoch): clients whose cursors ran past the backup resume from it.
    /// Run with no node serving the store.
    MarkRestored,
    /// Check the store, read-only (safe while nodes run): SQLite's
    /// integrity check, and no notification beyond its user's counter.
    /// Exits 1 if it finds a fault.
    Check,
    /// Mint a user token with HERALD_JWT_SECRET.
    Token {
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// The token's `jti`, the name `herald revoke --jti` refuses it by;
        /// by default a new UUID.
        #[arg(long)]
        jti: Option<String>,
    },
    /// Publish a notification through a running server.
    Publish {
        /// The user to notify (repeat for several).
        #[arg(long = "user", required = true)]
        users: Vec<String>,
        #[arg(long)]
        topic: String,
        /// The payload, as JSON.
        #[arg(long)]
        payload: String,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// The server, by default http://HERALD_LISTEN.
        #[arg(long)]
        url: Option<String>,
        /// By default the first of HERALD_API_KEYS, else of HERALD_API_KEYS_PUBLISH.
        #[arg(long)]
        api_key: Option<String>,
    },
    /// Erase a user's stored notifications through a running server (all of
    /// them, or up to a seq); the seq counter stays.
    Erase {
        #[arg(long)]
        user: String,
        /// Only the notifications with seq up to this one.
        #[arg(long)]
        up_to_seq: Option<i64>,
        /// The server, by default http://HERALD_LISTEN.
        #[arg(long)]
        url: Option<String>,
        /// By default the first of HERALD_API_KEYS, else of HERALD_API_KEYS_ERASE.
        #[arg(long)]
        api_key: Option<String>,
    },
    /// List a user's open sessions on every node: id, node, when it
    /// connected, the token's `jti` and `exp`, address, `User-Agent`.
    Sessions {
        #[arg(long)]
        user: String,
        /// The server, by default http://HERALD_LISTEN.
        #[arg(long)]
        url: Option<String>,
        /// By default the first of HERALD_API_KEYS, else of HERALD_API_KEYS_READ.
        #[arg(long)]
        api_key: Option<String>,
    },
    /// Close every open session of a user, on every node (close code 4003),
    /// or the one with `--session`.
    Disconnect {
        #[arg(long)]
        user: String,
        /// Close only this session (its id, as `herald sessions` lists it).
        #[arg(long)]
        session: Option<String>,
        /// The server, by default http://HERALD_LISTEN.
        #[arg(long)]
        url: Option<String>,
        /// By default the first of HERALD_API_KEYS, else of HERALD_API_KEYS_DISCONNECT.
        #[arg(long)]
        api_key: Option<String>,
    },
    /// Revoke a user's tokens: those issued before a time (or the one token
    /// with `--jti`) are refused, and their sessions close (close code
    /// 4001), on every node.
    Revoke {
        #[arg(long)]
        user: String,
        /// Unix seconds; by default every token issued up to now.
        #[arg(long, conflicts_with = "jti")]
        issued_before: Option<i64>,
        /// Revoke only the token whose `jti` claim this is; the user's other
        /// tokens keep working.
        #[arg(long)]
        jti: Option<String>,
        /// Unix seconds: when the last token revoked expires, after which
        /// the revocation may be forgotten; by default it is kept for good.
        #[arg(long)]
        expires_at: Option<i64>,
        /// The server, by default http://HERALD_LISTEN.
        #[arg(long)]
        url: Option<String>,
        /// By default the first of HERALD_API_KEYS, else of HERALD_API_KEYS_DISCONNECT.
        #[arg(long)]
        api_key: Option<String>,
    },
}

/// Runs the command line; the exit code is 2 for bad configuration.
pub fn main(cli: Cli) -> ExitCode {
    let settings = match Settings::load(&ProcessEnv, cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herald: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    // Before the runtime opens anything: the capacity is checked against
    // the raised limit, and refused like a bad setting.
    let raised = matches!(command, Command::Serve).then(crate::capacity::raise_open_file_limit);
    if raised.is_some() {
        if let Err(e) = crate::capacity::of(&settings) {
            eprintln!("herald: configuration error: {e}");
            return ExitCode::from(2);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a Tokio runtime");
    let result = runtime.block_on(async move {
        match command {
            Command::Serve => serve(settings, raised.unwrap_or_default()).await,
            Command::Migrate => {
                let _tracing = telemetry::init_tracing(&settings);
                store::migrate(&settings.database_url).await?;
                println!("migrations applied to {}", settings.database_display());
                Ok(())
            }
            Command::Backup { to } => {
                let copy = store::backup(&settings.database_url, &to).await?;
                println!(
                    "backed up {} to {}: {} notifications of {} users, {} bytes, checked and synced",
                    settings.database_display(),
                    copy.file.display(),
                    copy.notifications,
                    copy.users,
                    copy.bytes
                );
                Ok(())
            }
            Command::Restore { from } => {
                let (epoch, done) = store::restore(&settings.database_url, &from).await?;
                for (file, aside) in &done.moved_aside {
                    println!("moved {} aside to {}", file.display(), aside.display());
                }
                println!(
                    "restored {} from {}: {} notifications of {} users; store epoch now {epoch}",
                    settings.database_display(),
                    from.display(),
                    done.notifications,
                    done.users
                );
                Ok(())
            }
            Command::MarkRestored => {
                let epoch = store::mark_restored(&settings.database_url).await?;
                println!("marked {} restored; store epoch now {epoch}", settings.database_display());
                Ok(())
            }
            Command::Check => {
                let (users, notifications) = store::check(&settings.database_url).await?;
                println!("{} is sound: {notifications} notifications of {users} users", settings.database_display());
                Ok(())
            }
            Command::Token { sub, ttl, jti } => {
                if settings.dev_mode || settings.jwt.secret.is_none() {
                    anyhow::bail!("HERALD_JWT_SECRET is not set: there is no secret to sign with");
                }
                crate::api::publish::check_user_id(&sub).map_err(anyhow::Error::msg)?;
                let secret = settings.jwt.secret.as_deref().unwrap_or_default();
                let token = match jti {
                    Some(jti) => {
                        auth::check_token_id(&jti).map_err(anyhow::Error::msg)?;
                        auth::mint_named(secret, &sub, ttl.as_secs() as i64, &jti)
                    }
                    None => auth::mint(secret, &sub, ttl.as_secs() as i64),
                };
                println!("{token}");
                Ok(())
            }
            Command::Publish { users, topic, payload, idempotency_key, url, api_key } => {
                let payload: serde_json::Value =
                    serde_json::from_str(&payload).map_err(|e| anyhow::anyhow!("--payload is not JSON: {e}"))?;
                let (user_id, user_ids) =
                    if users.len() == 1 { (users.first().cloned(), None) } else { (None, Some(users)) };
                let request =
                    herald_client::PublishRequest { user_id, user_ids, topic, payload, idempotency_key, digest: None };
                let (_, answer) = publisher(&settings, url, api_key, Scopes::PUBLISH)?.publish(&request).await?;
                println!("{}", serde_json::to_string_pretty(&answer)?);
                Ok(())
            }
            Command::Erase { user, up_to_seq, url, api_key } => {
                let answer = publisher(&settings, url, api_key, Scopes::ERASE)?.erase(&user, up_to_seq).await?;
                println!("{}", serde_json::to_string_pretty(&answer)?);
                Ok(())
            }
            Command::Sessions { user, url, api_key } => {
                let answer = publisher(&settings, url, api_key, Scopes::READ)?.sessions(&user).await?;
                println!("{}", serde_json::to_string_pretty(&answer)?);
                Ok(())
            }
            Command::Disconnect { user, session, url, api_key } => {
                let publisher = publisher(&settings, url, api_key, Scopes::DISCONNECT)?;
                match session {
                    Some(session) => {
                        publisher.disconnect_session(&user, &session).await?;
                        println!("session {session} of {user} was told to close");
                    }
                    None => {
                        publisher.disconnect(&user).await?;
                        println!("the sessions of {user} were told to close");
                    }
                }
                Ok(())
            }
            Command::Revoke { user, issued_before, jti, expires_at, url, api_key } => {
                let publisher = publisher(&settings, url, api_key, Scopes::DISCONNECT)?;
                let answer = match jti {
                    Some(jti) => {
                        let revocation = herald_client::RevokeToken { expires_at };
                        serde_json::to_string_pretty(&publisher.revoke_token(&user, &jti, &revocation).await?)?
                    }
                    None => {
                        let revocation = herald_client::RevokeTokens { issued_before, expires_at };
                        serde_json::to_string_pretty(&publisher.revoke_tokens(&user, &revocation).await?)?
                    }
                };
                println!("{answer}");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A client of the running server at `url` (by default this node's
/// `HERALD_LISTEN`) with `api_key` (by default the first configured one that
/// grants `scope`).
fn publisher(
    settings: &Settings,
    url: Option<String>,
    api_key: Option<String>,
    scope: Scopes,
) -> anyhow::Result<herald_client::Publisher> {
    let api_key = api_key
        .or_else(|| (!settings.dev_mode).then(|| settings.api_key_for(scope).map(str::to_string)).flatten())
        .ok_or_else(|| {
            anyhow::anyhow!("give --api-key, or set HERALD_API_KEYS (or a key with the {} scope)", scope.names())
        })?;
    let url = url.unwrap_or_else(|| format!("{}://{}", settings.http_scheme(), connectable(settings.listen)));
    Ok(herald_client::Publisher::new(url, api_key))
}

/// An address a local client can reach: `0.0.0.0` becomes loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
        SocketAddr::V6(a) if a.ip().is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port())),
        other => other,
    }
}

/// `open_files`: the soft open-file limit before and after it was raised.
async fn serve(settings: Settings, open_files: (Option<u64>, Option<u64>)) -> anyhow::Result<()> {
    let _tracing = telemetry::init_tracing(&settings);
    let (before, after) = open_files;
    if before != after {
        tracing::info!(from = before, to = after, "raised the open-file limit to the hard limit");
    }
    let shutdown = CancellationToken::new();
    let state = AppState::build(settings.clone(), shutdown.clone()).await?;
    let listener = crate::listen::bind(settings.listen)
        .map_err(|e| anyhow::anyhow!("HERALD_LISTEN: cannot listen on {}: {e}", settings.listen))?;
    let addr = listener.local_addr()?;
    // The banner first: whoever waits for the "listening" line (scripts,
    // the tests) then finds the whole banner already written.
    if settings.dev_mode {
        print_dev_banner(&settings, addr);
    }
    tracing::info!(%addr, node_id = %settings.node_id, store = %settings.database_display(), "listening");
    tokio::spawn(async move {
        shutdown::signal().await;
        tracing::info!("signal received; draining (a second signal exits at once)");
        shutdown.cancel();
        shutdown::signal().await;
        std::process::exit(130);
    });
    shutdown::serve(state, listener).await;
    Ok(())
}

/// Dev mode (spec §1): the generated keys, a ready user token and the demo link.
fn print_dev_banner(settings: &Settings, addr: SocketAddr) {
    let secret = settings.jwt.secret.as_deref().unwrap_or_default();
    let api_key = settings.api_key_for(Scopes::ALL).unwrap_or_default();
    let token = auth::mint(secret, "alice", 24 * 3600);
    let base = format!("{}://{}", settings.http_scheme(), connectable(addr));
    println!(
        "\nHerald is running in dev mode: no keys were configured, so these were made for this run only.\n\
         \n  API key:     {api_key}\n  JWT secret:  {secret}\n  user token:  {token}\n               (sub=alice, valid 24h)\n\
         \n  demo page:   {base}/demo#token={token}\n\
         \n  publish:     curl -X POST {base}/v1/notifications -H 'Authorization: Bearer {api_key}' \\\n\
         \x20               -H 'Content-Type: application/json' -d '{{\"user_id\":\"alice\",\"topic\":\"hello\",\"payload\":{{\"text\":\"hi\"}}}}'\n\
         \nSet HERALD_JWT_SECRET (or HERALD_JWT_PUBLIC_KEYS) and HERALD_API_KEYS to leave dev mode.\n"
    );
}
