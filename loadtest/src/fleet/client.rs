//! One simulated client inside a worker process: a bare WebSocket session
//! (no reconnecting `herald_client::Client`: a worker holds up to ~20,000 of
//! these, so each is one task with a 4 KiB read buffer) that checks every
//! seq it receives.
//!
//! A client waits for a `Connect` command, opens its session (with `since`
//! when it was connected before), and reads until it is dropped, told to
//! quit, or closed by the server — then it reconnects with `since` after a
//! short pause, as a real client would. A paused client keeps its socket but
//! stops reading it. Dropped and quitting clients end with a TCP reset.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use herald_protocol::{ServerFrame, Welcome};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::frame::{self, Seen};
use super::protocol::user_id;
use super::worker::{unix_ns, Control, Shared};

type Ws = WebSocketStream<TcpStream>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts per `Connect` command before the client gives up until the next one.
const ATTEMPTS: u32 = 3;
/// Tokens outlive any run.
const TOKEN_TTL_SECS: i64 = 24 * 3600;
/// Sent as browsers send theirs, so a node holds (and lists) what it would
/// for real clients: about 130 bytes.
const USER_AGENT: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
                          Chrome/131.0.0.0 Safari/537.36 herald-loadtest";

/// How a session ended.
enum End {
    /// The coordinator dropped it (`Drop`): wait for the next `Connect`.
    Dropped,
    Quit,
    /// The server closed it, or the connection failed; the close code (1006: none).
    Closed(u16),
}

/// A client's running state; `last` is the newest seq it received.
struct Client {
    shared: Arc<Shared>,
    /// Index among this worker's clients.
    i: usize,
    /// Global index: user `<prefix>-<j>`.
    j: usize,
    control: watch::Receiver<Control>,
    last: i64,
    connected_once: bool,
    drops_seen: u64,
}

/// Reconnect catch-up in progress: done when `last` reaches `target`.
struct CatchUp {
    target: i64,
    started: Instant,
    command_ns: Option<u64>,
}

pub async fn run(shared: Arc<Shared>, i: usize) {
    let control = shared.control.subscribe();
    let drops_seen = control.borrow().drop_gen;
    let j = shared.spec.worker + i * shared.spec.processes;
    let mut client = Client { shared, i, j, control, last: -1, connected_once: false, drops_seen };
    let mut served_gen = 0;
    loop {
        let Ok(c) = client.control.wait_for(|c| c.quit || c.connect_gen > served_gen).await.map(|c| c.clone()) else {
            return;
        };
        if c.quit {
            return;
        }
        served_gen = c.connect_gen;
        if let End::Quit = client.sessions(c.connect_at_ns).await {
            return;
        }
    }
}

impl Client {
    /// Sessions until dropped or quit: reconnects (with `since`) after server closes.
    async fn sessions(&mut self, command_ns: u64) -> End {
        let mut command_ns = Some(command_ns);
        loop {
            let since = self.connected_once.then_some(self.last);
            let (ws, welcome, started) = match self.open_with_retries(since).await {
                Ok(opened) => opened,
                Err(end) => return end,
            };
            let c = &self.shared.counters;
            c.handshakes.fetch_add(1, Ordering::Relaxed);
            c.open.fetch_add(1, Ordering::Relaxed);
            self.shared.record(&self.shared.hists.handshake, started.elapsed().as_micros() as u64);
            let catch_up = match self.connected_once {
                true => Some(CatchUp { target: welcome.last_seq, started, command_ns: command_ns.take() }),
                false => {
                    self.connected_once = true;
                    self.last = welcome.last_seq;
                    self.shared.table.start[self.i].store(welcome.last_seq, Ordering::Relaxed);
                    self.shared.table.last[self.i].store(welcome.last_seq, Ordering::Relaxed);
                    None
                }
            };
            let end = self.serve(ws, catch_up).await;
            self.shared.counters.open.fetch_sub(1, Ordering::Relaxed);
            match end {
                End::Closed(code) => {
                    self.shared.counters.drops.fetch_add(1, Ordering::Relaxed);
                    *self.shared.closes.lock().unwrap().entry(code).or_default() += 1;
                    self.shared.table.last_close[self.i].store(code as u32, Ordering::Relaxed);
                    self.shared.table.closed[self.i].fetch_add(1, Ordering::Relaxed);
                    let pause = Duration::from_millis(100 + rand::random::<u64>() % 400);
                    if let Some(end) = self.pause(pause).await {
                        return end;
                    }
                }
                other => return other,
            }
        }
    }

    /// Opens a session, retrying a failed attempt after a second. Also
    /// returns when the successful attempt began (after pacing and queueing).
    async fn open_with_retries(&mut self, since: Option<i64>) -> Result<(Ws, Welcome, Instant), End> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.shared.pacer.wait().await;
            let (result, started) = {
                let _permit = self.shared.inflight.acquire().await.expect("never closed");
                let started = Instant::now();
                (self.open(since).await, started)
            };
            match result {
                Ok((ws, welcome)) => return Ok((ws, welcome, started)),
                Err(kind) => {
                    self.shared.counters.failures.fetch_add(1, Ordering::Relaxed);
                    *self.shared.failure_kinds.lock().unwrap().entry(kind).or_default() += 1;
                }
            }
            if attempt >= ATTEMPTS {
                return Err(End::Dropped);
            }
            if let Some(end) = self.pause(Duration::from_secs(1)).await {
                return Err(end);
            }
        }
    }

    /// Sleeps unless dropped or told to quit meanwhile.
    async fn pause(&mut self, wait: Duration) -> Option<End> {
        let deadline = Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return None,
                changed = self.control.changed() => {
                    if changed.is_err() {
                        return Some(End::Quit);
                    }
                    if let Some(end) = self.told_to_end() {
                        return Some(end);
                    }
                }
            }
        }
    }

    /// A `Drop` or `Quit` that this client has not acted on.
    fn told_to_end(&mut self) -> Option<End> {
        let c = self.control.borrow_and_update();
        if c.quit {
            return Some(End::Quit);
        }
        if c.drop_gen > self.drops_seen {
            self.drops_seen = c.drop_gen;
            return Some(End::Dropped);
        }
        None
    }

    /// TCP connect (from this client's source address), upgrade, welcome.
    async fn open(&self, since: Option<i64>) -> Result<(Ws, Welcome), String> {
        let spec = &self.shared.spec;
        let node = self.j % spec.urls.len();
        let addr = self.shared.addrs[node];
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
        let socket = socket.map_err(|e| format!("socket: {:?}", e.kind()))?;
        if !spec.source_ips.is_empty() {
            let ip = spec.source_ips[self.i % spec.source_ips.len()];
            if ip.is_ipv4() == addr.is_ipv4() {
                // Let connect() pick the port: bind(ip, 0) alone reserves one
                // per address for every destination, and searching for a free
                // one gets slow (and blocks this worker) as the range fills.
                let _ = nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true);
                socket.bind((ip, 0).into()).map_err(|e| format!("bind {ip}: {:?}", e.kind()))?;
            }
        }
        let handshake = async {
            let tcp = socket.connect(addr).await.map_err(|e| format!("connect: {:?}", e.kind()))?;
            tcp.set_nodelay(true).map_err(|e| format!("nodelay: {:?}", e.kind()))?;
            let query = since.map(|s| format!("?since={s}")).unwrap_or_default();
            let mut request = format!("{}/v1/ws{query}", spec.urls[node])
                .into_client_request()
                .map_err(|e| format!("request: {e}"))?;
            let token = herald_server::auth::mint(&spec.jwt_secret, &user_id(&spec.prefix, self.j), TOKEN_TTL_SECS);
            let bearer = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
            request.headers_mut().insert("authorization", bearer);
            request.headers_mut().insert("user-agent", HeaderValue::from_static(USER_AGENT));
            let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await.map_err(|e| match e {
                    tungstenite::Error::Http(response) => format!("http {}", response.status().as_u16()),
                    tungstenite::Error::Io(e) => format!("io: {:?}", e.kind()),
                    other => format!("websocket: {other}"),
                })?;
            let welcome = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                        Ok(ServerFrame::Welcome(w)) => break w,
                        _ => return Err("first frame not a welcome".to_string()),
                    },
                    Some(Ok(Message::Close(f))) => return Err(format!("closed {}", f.map_or(1005, |f| f.code.into()))),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(format!("before welcome: {e}")),
                    None => return Err("closed before welcome".to_string()),
                }
            };
            Ok((ws, welcome))
        };
        timeout(CONNECT_TIMEOUT, handshake).await.map_err(|_| "timeout".to_string())?
    }

    /// Reads the session until it ends.
    async fn serve(&mut self, mut ws: Ws, mut catch_up: Option<CatchUp>) -> End {
        if let Some(c) = &catch_up {
            if self.last >= c.target {
                self.caught_up(c);
                catch_up = None;
            }
        }
        let mut paused = self.shared.table.paused[self.i].load(Ordering::Relaxed);
        loop {
            tokio::select! {
                biased;
                changed = self.control.changed() => {
                    if changed.is_err() {
                        return End::Quit;
                    }
                    match self.told_to_end() {
                        Some(end) => {
                            reset(ws);
                            return end;
                        }
                        None => paused = self.shared.table.paused[self.i].load(Ordering::Relaxed),
                    }
                }
                message = ws.next(), if !paused => match message {
                    Some(Ok(Message::Text(text))) => self.on_text(&text, &mut catch_up),
                    Some(Ok(Message::Close(f))) => {
                        // Let tungstenite send its answer, then stop.
                        let _ = timeout(Duration::from_secs(1), ws.next()).await;
                        return End::Closed(f.map_or(1005, |f| f.code.into()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return End::Closed(1006),
                },
            }
        }
    }

    fn on_text(&mut self, text: &str, catch_up: &mut Option<CatchUp>) {
        let Some(Seen::Notification { seq, sent_ns }) = frame::parse(text) else { return };
        let c = &self.shared.counters;
        if seq <= self.last {
            c.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if seq > self.last + 1 {
            c.gaps.fetch_add((seq - self.last - 1) as u64, Ordering::Relaxed);
        }
        c.advanced.fetch_add((seq - self.last) as u64, Ordering::Relaxed);
        c.delivered.fetch_add(1, Ordering::Relaxed);
        self.last = seq;
        self.shared.table.last[self.i].store(seq, Ordering::Relaxed);
        let now = unix_ns();
        c.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
        match catch_up {
            Some(cu) if seq >= cu.target => {
                self.caught_up(cu);
                *catch_up = None;
            }
            Some(_) => {}
            None if self.shared.table.stalled[self.i].load(Ordering::Relaxed) => {}
            None => {
                if let Some(sent) = sent_ns {
                    self.shared.record(&self.shared.hists.latency, now.saturating_sub(sent) / 1000);
                }
            }
        }
    }

    fn caught_up(&self, c: &CatchUp) {
        let now = unix_ns();
        self.shared.counters.caught_up.fetch_add(1, Ordering::Relaxed);
        self.shared.counters.last_caught_up_ns.fetch_max(now, Ordering::Relaxed);
        self.shared.record(&self.shared.hists.catch_up, c.started.elapsed().as_micros() as u64);
        if let Some(at) = c.command_ns {
            self.shared.record(&self.shared.hists.catch_up_since_command, now.saturating_sub(at) / 1000);
        }
    }
}

/// Ends a connection with a TCP reset: as a network failure looks to the
/// server, and without leaving TIME_WAIT entries on either end that would
/// slow down the next connects to the same ports (a SYN that meets the
/// server's TIME_WAIT entry can be answered late, costing a 1 s retransmit).
fn reset(ws: Ws) {
    let _ = ws.get_ref().set_zero_linger();
    drop(ws);
}
