// @herald/client 0.1.0 (MIT). Built from src/ by scripts/build.mjs: do not edit.

// src/backoff.ts
var DEFAULT_BACKOFF = { baseMs: 500, capMs: 3e4 };
function resolveBackoff(options = {}) {
  const baseMs = positive(options.baseMs, DEFAULT_BACKOFF.baseMs);
  const capMs = Math.max(baseMs, positive(options.capMs, DEFAULT_BACKOFF.capMs));
  return { baseMs, capMs };
}
function positive(value, fallback) {
  return typeof value === "number" && Number.isFinite(value) && value >= 0 ? value : fallback;
}
function backoffCeiling(attempt, backoff) {
  return Math.min(backoff.capMs, backoff.baseMs * 2 ** Math.min(Math.max(attempt, 0), 30));
}
function backoffDelay(attempt, backoff, random = Math.random) {
  return Math.floor(random() * (backoffCeiling(attempt, backoff) + 1));
}
function closeAction(code) {
  switch (code) {
    case 4003:
      return { kind: "stop", error: "forbidden" };
    case 4001:
      return { kind: "new-token" };
    case 1001:
      return { kind: "prompt" };
    case 1008:
      return { kind: "backoff", error: "policy_violation" };
    case 1009:
      return { kind: "backoff", error: "frame_too_large" };
    case 1002:
      return { kind: "backoff", error: "protocol_error" };
    case 1007:
      return { kind: "backoff", error: "invalid_data" };
    default:
      return { kind: "backoff" };
  }
}

// src/errors.ts
var HeraldError = class extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
    if (details.status !== void 0) this.status = details.status;
    if (details.retryAfter !== void 0) this.retryAfter = details.retryAfter;
    if (details.closeCode !== void 0) this.closeCode = details.closeCode;
    if (details.cause !== void 0) this.cause = details.cause;
  }
};
var TOKEN_CODES = /* @__PURE__ */ new Set([
  "missing_token",
  "invalid_token",
  "token_expired",
  "token_revoked"
]);

// src/inbox.ts
var Inbox = class {
  /** @internal */
  constructor(base, tokens, fetchFn) {
    this.base = base;
    this.tokens = tokens;
    this.fetchFn = fetchFn;
  }
  /** `GET /v1/me/notifications`: newest first; page back with `before_seq`. */
  async list(query = {}) {
    const params = new URLSearchParams();
    for (const name of ["limit", "before_seq", "after_seq", "unread", "topic"]) {
      const value = query[name];
      if (value !== void 0 && value !== null) params.set(name, String(value));
    }
    const search = params.toString();
    return await this.request("GET", `/v1/me/notifications${search ? `?${search}` : ""}`);
  }
  /** `POST /v1/me/notifications/read`: every open session of the user gets a `read` event. */
  async markRead(mark) {
    await this.request("POST", "/v1/me/notifications/read", readBody(mark));
  }
  /** `GET /v1/me/unread`: `{ total, by_topic }`. */
  async unread() {
    return await this.request("GET", "/v1/me/unread");
  }
  /** One call; a refused cached token is replaced from the provider and the call tried once more. */
  async request(method, path, body) {
    let token = await this.tokens.forHttp();
    for (let attempt = 0; ; attempt += 1) {
      const response = await this.send(method, path, token, body);
      if (response.ok) {
        return response.status === 204 ? void 0 : readJson(response);
      }
      const error = await errorOf(response);
      if (attempt > 0 || response.status !== 401 || !TOKEN_CODES.has(error.code)) throw error;
      const fresh = await this.tokens.fresh();
      if (fresh === token) throw error;
      token = fresh;
    }
  }
  async send(method, path, token, body) {
    const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
    if (body !== void 0) headers["Content-Type"] = "application/json";
    try {
      return await this.fetchFn(`${this.base}${path}`, {
        method,
        headers,
        ...body !== void 0 ? { body: JSON.stringify(body) } : {},
        credentials: "omit",
        cache: "no-store"
      });
    } catch (cause) {
      throw new HeraldError("network", `${method} ${path} failed: ${cause instanceof Error ? cause.message : cause}`, {
        cause
      });
    }
  }
};
function readBody(mark) {
  const m = mark ?? {};
  const isSeq = (v) => Number.isSafeInteger(v) && v >= 1;
  if (m.topic !== void 0) {
    const t = m.topic;
    const chars = typeof t === "string" ? [...t] : [];
    const topicOk = chars.length >= 1 && chars.length <= 128 && !/[\u0000-\u001f\u007f-\u009f]/.test(t);
    if (topicOk && m.seqs === void 0 && (m.up_to_seq === void 0 || isSeq(m.up_to_seq))) {
      return m.up_to_seq === void 0 ? { topic: t } : { topic: t, up_to_seq: m.up_to_seq };
    }
  } else if (m.seqs !== void 0 && m.up_to_seq === void 0) {
    if (Array.isArray(m.seqs) && m.seqs.length >= 1 && m.seqs.length <= 1e3 && m.seqs.every(isSeq)) {
      return { seqs: [...m.seqs] };
    }
  } else if (m.up_to_seq !== void 0 && m.seqs === void 0 && isSeq(m.up_to_seq)) {
    return { up_to_seq: m.up_to_seq };
  }
  throw new HeraldError(
    "invalid_argument",
    "a read mark is {seqs: [1 to 1000 seqs ≥ 1]}, {up_to_seq: a seq ≥ 1} or {topic: 1 to 128 characters, up_to_seq?: a seq ≥ 1}"
  );
}
async function readJson(response) {
  try {
    return await response.json();
  } catch (cause) {
    throw new HeraldError("bad_response", `the server answered ${response.status} with a body that is not JSON`, {
      status: response.status,
      cause
    });
  }
}
async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
  }
  const error = body?.error;
  const code = typeof error?.code === "string" ? error.code : `http_${response.status}`;
  const message = typeof error?.message === "string" ? error.message : `HTTP ${response.status}`;
  const header = response.headers.get("retry-after");
  const retryAfter = header !== null && /^\d+$/.test(header.trim()) ? Number(header.trim()) : void 0;
  return new HeraldError(code, message, { status: response.status, retryAfter });
}

// src/token.ts
function readClaims(token) {
  const part = token.split(".")[1];
  if (!part) return {};
  try {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, "="));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    if (!claims || typeof claims !== "object") return {};
    const { sub, exp } = claims;
    return {
      ...typeof sub === "string" ? { sub } : {},
      ...typeof exp === "number" ? { exp } : {}
    };
  } catch {
    return {};
  }
}
var HTTP_MARGIN_SECS = 30;
var Tokens = class {
  constructor(provider) {
    this.provider = provider;
    this.latest = null;
    /** A token fetched by `connect()` that the first connection may use without asking again. */
    this.unused = null;
  }
  /** The last token the provider gave, if any. */
  get current() {
    return this.latest;
  }
  /** Asks the provider. */
  async fresh() {
    let token;
    try {
      token = await this.provider();
    } catch (cause) {
      throw new HeraldError("token_provider_failed", `the token provider failed: ${describe(cause)}`, { cause });
    }
    if (typeof token !== "string" || token === "") {
      throw new HeraldError("token_provider_failed", "the token provider returned no token");
    }
    this.latest = token;
    return token;
  }
  /** Asks the provider, and lets the next `forConnect()` use the answer. */
  async prime() {
    const token = await this.fresh();
    this.unused = token;
    return token;
  }
  /** For a new connection: the primed token once, else the provider's answer. */
  async forConnect() {
    const primed = this.unused;
    this.unused = null;
    return primed ?? this.fresh();
  }
  /** For an HTTP call: the cached token while it is good for a while, else the provider's. */
  async forHttp() {
    const cached = this.latest;
    if (cached) {
      const { exp } = readClaims(cached);
      if (exp === void 0 || exp - HTTP_MARGIN_SECS > Date.now() / 1e3) return cached;
    }
    return this.fresh();
  }
};
function describe(e) {
  return e instanceof Error ? e.message : String(e);
}

// src/connection.ts
var CONNECT_TIMEOUT_MS = 15e3;
var REQUEST_TIMEOUT_MS = 1e4;
var DEFAULT_HEARTBEAT_SECS = 25;
var Connection = class {
  constructor(config, sink, firstState = "connecting") {
    this.config = config;
    this.sink = sink;
    this.firstState = firstState;
    this.ws = null;
    /** The token the current socket's session runs on (changed by a refresh). */
    this.sessionToken = null;
    this.welcomed = false;
    this.stopped = false;
    this.attempt = 0;
    /** Set once a failed handshake was explained by asking the HTTP API; cleared by a welcome. */
    this.probed = false;
    this.refreshing = false;
    this.nextRef = 1;
    this.pending = /* @__PURE__ */ new Map();
    this.retryTimer = null;
    this.connectTimer = null;
    this.heartbeatTimer = null;
    this.heartbeatMs = DEFAULT_HEARTBEAT_SECS * 1e3;
    this.lastFrameAt = 0;
    this.pingAt = null;
    this.onOnline = () => this.retryNow();
  }
  get isOpen() {
    return this.welcomed && this.ws !== null;
  }
  start() {
    globalThis.addEventListener?.("online", this.onOnline);
    this.sink.state(this.firstState);
    void this.open();
  }
  /** Closes the socket (1000) and stops for good. */
  stop() {
    if (this.stopped) return;
    this.stopped = true;
    globalThis.removeEventListener?.("online", this.onOnline);
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1e3, "client closed");
      } catch {
      }
    }
    this.failPending(new HeraldError("closed", "the client was closed"));
  }
  /** The spec's `read` frame; resolves on the server's `ok`. */
  async markRead(mark) {
    await this.request({ type: "read", ...readBody(mark) });
  }
  // ------------------------------------------------------------ connecting
  async open() {
    this.retryTimer = null;
    let token;
    try {
      token = await this.config.tokens.forConnect();
    } catch (e) {
      if (this.stopped) return;
      this.sink.error(asHeraldError(e, "token_provider_failed"));
      this.retryAfter(backoffDelay(this.attempt++, this.config.backoff));
      return;
    }
    if (this.stopped) return;
    const url = new URL(this.config.endpoints.ws);
    const since = this.config.cursor.value;
    if (since !== null) url.searchParams.set("since", String(since));
    const epoch = this.config.cursor.epoch;
    if (since !== null && epoch !== null) url.searchParams.set("epoch", epoch);
    const protocols = ["herald.v1"];
    if (this.config.transport === "query") url.searchParams.set("access_token", token);
    else protocols.push(`herald.bearer.${token}`);
    let ws;
    try {
      ws = new this.config.WebSocket(url.toString(), protocols);
    } catch (e) {
      this.sink.error(asHeraldError(e, "network"));
      this.retryAfter(backoffDelay(this.attempt++, this.config.backoff));
      return;
    }
    this.ws = ws;
    this.sessionToken = token;
    this.welcomed = false;
    ws.onmessage = (event) => {
      if (this.ws === ws) this.onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (this.ws === ws) this.onClose(event.code, event.reason);
    };
    ws.onerror = () => {
    };
    this.connectTimer = setTimeout(() => this.drop("no welcome in time"), CONNECT_TIMEOUT_MS);
  }
  retryAfter(delayMs) {
    if (this.stopped) return;
    this.retryTimer = setTimeout(() => void this.open(), delayMs);
  }
  /** The network came back while waiting: try now instead of at the end of the backoff. */
  retryNow() {
    if (this.stopped || this.retryTimer === null) return;
    clearTimeout(this.retryTimer);
    void this.open();
  }
  // ------------------------------------------------------------ frames
  onFrame(data) {
    this.lastFrameAt = Date.now();
    if (typeof data !== "string") return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "welcome":
        this.onWelcome(frame);
        break;
      case "notification":
        this.onNotification(frame);
        break;
      case "read":
        if (Array.isArray(frame.seqs)) this.sink.read({ seqs: frame.seqs });
        else if (typeof frame.up_to_seq === "number") this.sink.read({ up_to_seq: frame.up_to_seq });
        break;
      case "token_expiring":
        void this.refresh();
        break;
      case "ok":
        this.settle(frame.ref, null);
        break;
      case "error": {
        const error = new HeraldError(String(frame.code ?? "error"), String(frame.message ?? "the server refused a frame"));
        if (!this.settle(frame.ref, error)) this.sink.error(error);
        break;
      }
      default:
        break;
    }
  }
  onWelcome(frame) {
    this.welcomed = true;
    this.probed = false;
    this.attempt = 0;
    this.clearConnectTimer();
    const cursor = this.config.cursor;
    const since = cursor.value;
    const lastSeq = frame.last_seq;
    const resumed = typeof frame.since === "number" ? frame.since : lastSeq;
    if (since === null) {
      if (typeof lastSeq === "number") cursor.set(lastSeq);
    } else if (typeof resumed === "number" && resumed < since) {
      cursor.set(resumed);
    }
    if (typeof frame.epoch === "string") cursor.setEpoch(frame.epoch);
    if (frame.truncated === true && since !== null && typeof frame.oldest_seq === "number") {
      this.sink.truncated({ since, oldest_seq: frame.oldest_seq });
    }
    const secs = typeof frame.heartbeat_secs === "number" && frame.heartbeat_secs > 0 ? frame.heartbeat_secs : null;
    this.startHeartbeat((secs ?? DEFAULT_HEARTBEAT_SECS) * 1e3);
    this.sink.state("open", typeof frame.session_id === "string" ? frame.session_id : null);
  }
  /** Passes on each seq once, in order: anything at or below the last seen seq is a duplicate. */
  onNotification(frame) {
    const seq = frame.seq;
    if (typeof seq !== "number" || !Number.isSafeInteger(seq)) return;
    const last = this.config.cursor.value;
    if (last !== null && seq <= last) return;
    this.config.cursor.set(seq);
    const { type: _type, ...notification } = frame;
    this.sink.notification(notification);
  }
  /** `token_expiring`: a new token from the provider, sent in-band; the session lives on. */
  async refresh() {
    if (this.refreshing) return;
    this.refreshing = true;
    const ws = this.ws;
    try {
      const token = await this.config.tokens.fresh();
      if (ws !== this.ws || this.stopped) return;
      const before = this.sessionToken;
      const oldExp = before ? readClaims(before).exp : void 0;
      const newExp = readClaims(token).exp;
      if (token === before || oldExp !== void 0 && newExp !== void 0 && newExp <= oldExp) return;
      await this.request({ type: "refresh", token });
      if (ws === this.ws) this.sessionToken = token;
    } catch (e) {
      const error = asHeraldError(e, "token_provider_failed");
      if (error.code !== "connection_lost" && error.code !== "closed") this.sink.error(error);
    } finally {
      this.refreshing = false;
    }
  }
  /** Sends a frame with a fresh `ref` and waits for its `ok` (resolves) or `error` (rejects). */
  request(frame) {
    const ws = this.ws;
    if (!ws || !this.welcomed) {
      return Promise.reject(new HeraldError("not_connected", "the connection is not open"));
    }
    const ref = this.nextRef++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new HeraldError("timeout", `no answer to ${frame.type} in ${REQUEST_TIMEOUT_MS} ms`));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(ref, { resolve, reject, timer });
      try {
        ws.send(JSON.stringify({ ...frame, ref }));
      } catch {
        this.settle(ref, new HeraldError("connection_lost", "the connection closed before the frame was sent"));
      }
    });
  }
  /** Answers the request with `ref`; false when there is none. */
  settle(ref, error) {
    if (typeof ref !== "number") return false;
    const pending = this.pending.get(ref);
    if (!pending) return false;
    this.pending.delete(ref);
    clearTimeout(pending.timer);
    if (error) pending.reject(error);
    else pending.resolve();
    return true;
  }
  failPending(error) {
    for (const [ref] of this.pending) this.settle(ref, error);
  }
  // ------------------------------------------------------------ liveness
  /**
   * Browsers answer the server's WebSocket pings without telling the page, so
   * the page pings in-band: each beat sends a `ping` unless one is still
   * unanswered; a ping left without any frame for a whole beat means the
   * connection is dead. (A throttled background tab's late timer does not
   * count against the server: the check is "no frame since the ping".)
   */
  startHeartbeat(ms) {
    this.stopHeartbeat();
    this.heartbeatMs = ms;
    this.pingAt = null;
    this.heartbeatTimer = setInterval(() => this.beat(), ms);
  }
  beat() {
    const ws = this.ws;
    if (!ws || !this.welcomed) return;
    const now = Date.now();
    if (this.pingAt !== null && this.lastFrameAt < this.pingAt) {
      if (now - this.pingAt >= this.heartbeatMs) this.drop("no answer to ping");
      return;
    }
    try {
      ws.send('{"type":"ping"}');
      this.pingAt = now;
    } catch {
      this.drop("send failed");
    }
  }
  stopHeartbeat() {
    if (this.heartbeatTimer !== null) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }
  /** Gives up on a socket that is silent or stuck: handled as a drop (1006) at once. */
  drop(_reason) {
    const ws = this.ws;
    if (!ws) return;
    detach(ws);
    try {
      ws.close();
    } catch {
    }
    this.onClose(1006, _reason);
  }
  // ------------------------------------------------------------ closing
  onClose(code, reason) {
    const opened = this.welcomed;
    this.ws = null;
    this.welcomed = false;
    this.clearTimers();
    this.failPending(new HeraldError("connection_lost", "the connection closed before the server answered"));
    if (this.stopped) return;
    const action = closeAction(code);
    let delay;
    switch (action.kind) {
      case "stop": {
        this.stop();
        this.sink.stopped(
          new HeraldError(action.error, reason || `the server refused this user (close ${code})`, { closeCode: code })
        );
        return;
      }
      case "new-token":
        delay = this.attempt === 0 ? 0 : backoffDelay(this.attempt, this.config.backoff);
        break;
      case "prompt":
        this.attempt = 0;
        delay = backoffDelay(0, this.config.backoff);
        break;
      case "backoff":
        if (action.error) {
          this.sink.error(new HeraldError(action.error, reason || `closed with ${code}`, { closeCode: code }));
        }
        delay = backoffDelay(this.attempt, this.config.backoff);
        break;
    }
    this.attempt += 1;
    this.sink.state("reconnecting");
    if (!opened && code === 1006) void this.explainRefusal();
    this.retryAfter(delay);
  }
  /**
   * A browser does not say why a handshake failed. When it does, ask the
   * HTTP API with the same token once: a refused token (401) is reported as
   * an `error` with the server's code (`token_expired`, `invalid_token`, `token_revoked`), so
   * the application can sign the user in again. Retrying goes on meanwhile.
   */
  async explainRefusal() {
    const token = this.sessionToken;
    if (this.probed || !token) return;
    this.probed = true;
    try {
      const response = await this.config.fetch(`${this.config.endpoints.http}/v1/me/unread`, {
        headers: { Authorization: `Bearer ${token}` },
        credentials: "omit",
        cache: "no-store"
      });
      if (response.status !== 401 || this.stopped) return;
      const body = await response.json().catch(() => null);
      const code = body?.error?.code;
      if (code && TOKEN_CODES.has(code)) {
        this.sink.error(new HeraldError(code, body?.error?.message ?? "the token was refused", { status: 401 }));
      }
    } catch {
    }
  }
  clearConnectTimer() {
    if (this.connectTimer !== null) clearTimeout(this.connectTimer);
    this.connectTimer = null;
  }
  clearTimers() {
    this.clearConnectTimer();
    this.stopHeartbeat();
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }
};
function detach(ws) {
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}
function asHeraldError(e, code) {
  if (e instanceof HeraldError) return e;
  return new HeraldError(code, e instanceof Error ? e.message : String(e), { cause: e });
}

// src/emitter.ts
var Emitter = class {
  constructor() {
    this.listeners = /* @__PURE__ */ new Map();
  }
  on(name, fn) {
    let set = this.listeners.get(name);
    if (!set) {
      set = /* @__PURE__ */ new Set();
      this.listeners.set(name, set);
    }
    set.add(fn);
    return () => {
      set.delete(fn);
    };
  }
  /** Calls each listener; one that throws is reported as an uncaught error and the rest still run. */
  emit(name, value) {
    const set = this.listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(value);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
};

// src/storage.ts
function seqKey(server, sub) {
  return `herald:seq:${server}:${sub}`;
}
function defaultStorage() {
  try {
    const local = globalThis.localStorage;
    if (local) {
      const probe = "herald:probe";
      local.setItem(probe, "1");
      local.removeItem(probe);
      return {
        get: (key) => local.getItem(key),
        set: (key, value) => local.setItem(key, value)
      };
    }
  } catch {
  }
  return memoryStorage();
}
function memoryStorage() {
  const map = /* @__PURE__ */ new Map();
  return {
    get: (key) => map.get(key) ?? null,
    set: (key, value) => {
      map.set(key, value);
    }
  };
}
var SeqCursor = class {
  constructor(storage) {
    this.storage = storage;
    this.current = null;
    this.currentEpoch = null;
    this.persist = false;
    this.key = null;
  }
  get value() {
    return this.current;
  }
  /** The store epoch the seq belongs to, once a server has said. */
  get epoch() {
    return this.currentEpoch;
  }
  /** Names the user's entry and takes the stored seq when it is newer than the one in memory. */
  async load(key) {
    this.key = key;
    let raw;
    try {
      raw = await this.storage.get(key);
    } catch {
      raw = null;
    }
    const stored = raw == null ? NaN : Number(raw);
    let storedEpoch;
    try {
      storedEpoch = await this.storage.get(`${key}:epoch`);
    } catch {
      storedEpoch = null;
    }
    if (Number.isSafeInteger(stored) && stored >= 0 && (this.current === null || stored > this.current)) {
      this.current = stored;
      this.currentEpoch = storedEpoch ?? null;
    } else if (this.currentEpoch === null && storedEpoch != null) {
      this.currentEpoch = storedEpoch;
    }
  }
  /** Sets the seq (also lower: the server's `last_seq` wins when it is below ours). */
  set(seq) {
    this.current = seq;
    this.write("", String(seq));
  }
  /** Sets the store epoch (from a welcome). */
  setEpoch(epoch) {
    if (epoch === this.currentEpoch) return;
    this.currentEpoch = epoch;
    this.write(":epoch", epoch);
  }
  write(suffix, value) {
    if (!this.persist || this.key === null) return;
    try {
      const done = this.storage.set(`${this.key}${suffix}`, value);
      if (done && typeof done.catch === "function") done.catch(() => void 0);
    } catch {
    }
  }
};

// src/tabs.ts
var CALL_TIMEOUT_MS = 5e3;
function canShareTabs() {
  const nav = globalThis.navigator;
  return typeof nav?.locks?.request === "function" && typeof globalThis.BroadcastChannel === "function";
}
var SharedLink = class {
  /** `group` names the server and user: `<http base>|<sub>`. */
  constructor(core, group) {
    this.core = core;
    this.id = randomId();
    this.abort = new AbortController();
    this.connection = null;
    this.release = null;
    this.stopped = false;
    this.calls = /* @__PURE__ */ new Map();
    this.onPageHide = (event) => {
      if (this.connection && !event.persisted) this.post({ t: "leaving" });
    };
    this.channel = new BroadcastChannel(`herald:tabs:${group}`);
    this.lockName = `herald:leader:${group}`;
  }
  get isLeader() {
    return this.connection !== null;
  }
  start() {
    this.channel.onmessage = (event) => this.onMessage(event.data);
    globalThis.addEventListener?.("pagehide", this.onPageHide);
    this.post({ t: "hello" });
    navigator.locks.request(this.lockName, { signal: this.abort.signal }, () => this.lead()).catch(() => {
    });
  }
  stop() {
    if (this.stopped) return;
    this.stopped = true;
    this.abort.abort();
    globalThis.removeEventListener?.("pagehide", this.onPageHide);
    if (this.connection) {
      this.connection.stop();
      this.connection = null;
      this.post({ t: "leaving" });
    }
    this.release?.();
    this.release = null;
    this.failCalls(new HeraldError("closed", "the client was closed"));
    this.channel.close();
  }
  async markRead(mark) {
    if (this.connection) return this.connection.markRead(mark);
    if (this.core.state !== "open") throw new HeraldError("not_connected", "no tab holds an open connection");
    const id = randomId();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.calls.delete(id);
        reject(new HeraldError("timeout", "the leader tab did not answer"));
      }, CALL_TIMEOUT_MS);
      this.calls.set(id, { resolve, reject, timer });
      this.post({ t: "call", id, from: this.id, mark });
    });
  }
  // ------------------------------------------------------------ leading
  /** Runs while this tab holds the lock; the returned promise ends the hold. */
  lead() {
    if (this.stopped) return Promise.resolve();
    return new Promise((release) => {
      this.release = release;
      this.core.takeOver().then(() => {
        if (this.stopped) return release();
        const first = this.core.state === "connecting" ? "connecting" : "reconnecting";
        this.connection = this.core.newConnection(this.leaderSink(), first);
        this.connection.start();
      }).catch((e) => this.core.stopped(asError(e)));
    });
  }
  /** The leader reports to its own page and to every other tab. */
  leaderSink() {
    const core = this.core;
    return {
      state: (state, sessionId) => {
        core.setState(state, void 0, sessionId);
        this.post({ t: "state", state, lastSeq: core.cursor.value, sessionId: core.sessionId });
      },
      notification: (n) => {
        core.emit("notification", n);
        this.post({ t: "event", name: "notification", data: n });
      },
      read: (mark) => {
        core.emit("read", mark);
        this.post({ t: "event", name: "read", data: mark });
      },
      truncated: (t) => {
        core.emit("truncated", t);
        this.post({ t: "event", name: "truncated", data: t });
      },
      error: (e) => {
        core.emit("error", e);
        this.post({ t: "event", name: "error", data: errorData(e) });
      },
      stopped: (e) => {
        this.post({ t: "stopped", error: errorData(e) });
        core.stopped(e);
      }
    };
  }
  // ------------------------------------------------------------ messages
  onMessage(m) {
    if (this.stopped || !m || typeof m !== "object") return;
    const leader = this.connection;
    switch (m.t) {
      case "hello":
        if (leader) {
          const sessionId = this.core.sessionId;
          this.post({ t: "state", state: this.leaderState(), lastSeq: this.core.cursor.value, sessionId });
        }
        break;
      case "call":
        if (leader) {
          leader.markRead(m.mark).then(
            () => this.post({ t: "reply", id: m.id, to: m.from }),
            (e) => this.post({ t: "reply", id: m.id, to: m.from, error: errorData(e) })
          );
        }
        break;
      case "reply":
        if (m.to === this.id) this.settle(m.id, m.error ? fromData(m.error) : null);
        break;
      default:
        if (!leader) this.follow(m);
    }
  }
  /** What a follower does with the leader's reports. */
  follow(m) {
    const core = this.core;
    switch (m.t) {
      case "state":
        if (typeof m.lastSeq === "number") core.cursor.set(m.lastSeq);
        core.setState(m.state, void 0, typeof m.sessionId === "string" ? m.sessionId : null);
        break;
      case "event":
        if (m.name === "notification") {
          const last = core.cursor.value;
          if (last !== null && m.data.seq <= last) return;
          core.cursor.set(m.data.seq);
          core.emit("notification", m.data);
        } else if (m.name === "error") {
          core.emit("error", fromData(m.data));
        } else if (m.name === "read") {
          core.emit("read", m.data);
        } else {
          core.emit("truncated", m.data);
        }
        break;
      case "stopped":
        core.stopped(fromData(m.error));
        break;
      case "leaving":
        if (core.state === "open") core.setState("reconnecting");
        this.failCalls(new HeraldError("connection_lost", "the leader tab left"));
        break;
      default:
        break;
    }
  }
  leaderState() {
    const state = this.core.state;
    return state === "closed" ? "reconnecting" : state;
  }
  post(message) {
    try {
      this.channel.postMessage(message);
    } catch {
    }
  }
  settle(id, error) {
    const call = this.calls.get(id);
    if (!call) return;
    this.calls.delete(id);
    clearTimeout(call.timer);
    if (error) call.reject(error);
    else call.resolve();
  }
  failCalls(error) {
    for (const id of [...this.calls.keys()]) this.settle(id, error);
  }
};
function errorData(e) {
  if (e instanceof HeraldError) {
    return {
      code: e.code,
      message: e.message,
      ...e.status !== void 0 ? { status: e.status } : {},
      ...e.closeCode !== void 0 ? { closeCode: e.closeCode } : {}
    };
  }
  return { code: "error", message: e instanceof Error ? e.message : String(e) };
}
function fromData(d) {
  return new HeraldError(d.code, d.message, { status: d.status, closeCode: d.closeCode });
}
function asError(e) {
  return e instanceof HeraldError ? e : new HeraldError("error", e instanceof Error ? e.message : String(e));
}
function randomId() {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

// src/urls.ts
function endpoints(url) {
  let parsed;
  try {
    const page = globalThis.location?.href;
    parsed = page ? new URL(url, page) : new URL(url);
  } catch {
    throw new HeraldError("invalid_argument", `url is not a URL: ${url}`);
  }
  const secure = parsed.protocol === "https:" || parsed.protocol === "wss:";
  if (!secure && parsed.protocol !== "http:" && parsed.protocol !== "ws:") {
    throw new HeraldError("invalid_argument", `url must be http(s) or ws(s): ${url}`);
  }
  const base = parsed.pathname.replace(/\/+$/, "").replace(/\/v1\/ws$/, "");
  const host = parsed.host;
  return {
    ws: `${secure ? "wss" : "ws"}://${host}${base}/v1/ws`,
    http: `${secure ? "https" : "http"}://${host}${base}`
  };
}

// src/core.ts
var HTTP_FALLBACK = /* @__PURE__ */ new Set(["not_connected", "connection_lost", "timeout", "closed"]);
var Core = class {
  constructor(options) {
    this.options = options;
    this.emitter = new Emitter();
    this.current = "closed";
    this.session = null;
    this.link = null;
    this.storageKey = null;
    /** Bumped by close(): a start still awaiting the token knows it was cancelled. */
    this.generation = 0;
    this.starting = false;
    this.waiters = [];
    if (!options || typeof options.token !== "function") {
      throw new HeraldError("invalid_argument", "options.token must be a function returning the user token");
    }
    this.endpoints = endpoints(options.url);
    this.tokens = new Tokens(options.token);
    this.storage = options.storage ?? defaultStorage();
    this.cursor = new SeqCursor(this.storage);
    this.backoff = resolveBackoff(options.backoff);
    this.share = options.shareTabs !== false && canShareTabs();
    const f = options.fetch;
    this.fetchFn = f ? (input, init) => f(input, init) : (input, init) => globalThis.fetch(input, init);
    this.WebSocketCtor = options.WebSocket ?? globalThis.WebSocket;
    this.inbox = new Inbox(this.endpoints.http, this.tokens, this.fetchFn);
  }
  get state() {
    return this.current;
  }
  /** The open session's id (the welcome's `session_id`); `null` while not open. */
  get sessionId() {
    return this.session;
  }
  get isLeader() {
    return this.link?.isLeader ?? false;
  }
  connect() {
    if (this.current === "open") return Promise.resolve();
    const opened = new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
    if (!this.link && !this.starting) void this.start(this.generation);
    return opened;
  }
  close() {
    this.generation += 1;
    this.starting = false;
    this.link?.stop();
    this.link = null;
    this.setState("closed", new HeraldError("closed", "the client was closed"));
  }
  async markRead(mark) {
    const link = this.link;
    if (link && this.current === "open") {
      try {
        return await link.markRead(mark);
      } catch (e) {
        if (!(e instanceof HeraldError) || !HTTP_FALLBACK.has(e.code)) throw e;
      }
    }
    return this.inbox.markRead(mark);
  }
  // ------------------------------------------------------------ for links
  emit(name, value) {
    this.emitter.emit(name, value);
  }
  /**
   * Sets and announces the state; `open` settles `connect()`, `closed` fails it with `error`.
   * `sessionId` is the open session's (set before the state is announced; any other state clears it).
   */
  setState(state, error, sessionId = null) {
    this.session = state === "open" ? sessionId : null;
    if (state === this.current) return;
    this.current = state;
    this.emitter.emit("state", state);
    if (state === "open" || state === "closed") {
      const waiters = this.waiters;
      this.waiters = [];
      for (const w of waiters) {
        if (state === "open") w.resolve();
        else w.reject(error ?? new HeraldError("closed", "the client was closed"));
      }
    }
  }
  /** The server refused the user for good (4003): report, stop, and say `closed`. */
  stopped(error) {
    this.generation += 1;
    this.link?.stop();
    this.link = null;
    this.emit("error", error);
    this.setState("closed", error);
  }
  /** This tab is about to hold the connection: it now writes the seq, starting from the newest one known. */
  async takeOver() {
    this.cursor.persist = true;
    if (this.storageKey) await this.cursor.load(this.storageKey);
  }
  newConnection(sink, first) {
    const WebSocketCtor = this.WebSocketCtor;
    if (!WebSocketCtor) throw new HeraldError("invalid_argument", "no WebSocket here: pass options.WebSocket");
    return new Connection(
      {
        endpoints: this.endpoints,
        transport: this.options.tokenTransport === "query" ? "query" : "subprotocol",
        backoff: this.backoff,
        tokens: this.tokens,
        cursor: this.cursor,
        WebSocket: WebSocketCtor,
        fetch: this.fetchFn
      },
      sink,
      first
    );
  }
  // ------------------------------------------------------------ starting
  /** Asks for the token (its `sub` names the stored seq and the tab group), then links up. */
  async start(generation) {
    this.starting = true;
    this.setState("connecting");
    let token;
    try {
      token = await this.tokens.prime();
    } catch (e) {
      if (generation !== this.generation) return;
      this.starting = false;
      const error = e instanceof HeraldError ? e : new HeraldError("token_provider_failed", String(e));
      this.emit("error", error);
      this.setState("closed", error);
      return;
    }
    if (generation !== this.generation) return;
    const sub = readClaims(token).sub ?? "";
    this.storageKey = seqKey(this.endpoints.http, sub);
    await this.cursor.load(this.storageKey);
    if (generation !== this.generation) return;
    this.starting = false;
    this.link = this.share ? new SharedLink(this, `${this.endpoints.http}|${sub}`) : new DirectLink(this);
    this.link.start();
  }
};
var DirectLink = class {
  constructor(core) {
    this.core = core;
    this.connection = null;
    this.stopped = false;
  }
  get isLeader() {
    return true;
  }
  start() {
    const core = this.core;
    core.takeOver().then(() => {
      if (this.stopped) return;
      this.connection = core.newConnection(
        {
          state: (state, sessionId) => core.setState(state, void 0, sessionId),
          notification: (n) => core.emit("notification", n),
          read: (mark) => core.emit("read", mark),
          truncated: (t) => core.emit("truncated", t),
          error: (e) => core.emit("error", e),
          stopped: (e) => core.stopped(e)
        },
        "connecting"
      );
      this.connection.start();
    }).catch((e) => core.stopped(asHeraldError2(e)));
  }
  stop() {
    this.stopped = true;
    this.connection?.stop();
    this.connection = null;
  }
  markRead(mark) {
    if (!this.connection) return Promise.reject(new HeraldError("not_connected", "the connection is not open"));
    return this.connection.markRead(mark);
  }
};
function asHeraldError2(e) {
  return e instanceof HeraldError ? e : new HeraldError("error", e instanceof Error ? e.message : String(e));
}

// src/herald.ts
var Herald = class {
  constructor(options) {
    this.core = new Core(options);
    this.inbox = this.core.inbox;
  }
  /** `connecting`, `open`, `reconnecting` or `closed` (also before `connect()`). */
  get state() {
    return this.core.state;
  }
  /** The newest seq this client has seen (or started after); `null` before the first connection. */
  get lastSeq() {
    return this.core.cursor.value;
  }
  /**
   * The id of the session the connection runs on while it is `open` (the
   * welcome's `session_id`; shared by every tab of a group), `null` otherwise:
   * what `GET /v1/users/{id}/sessions` lists, so an app's "your devices" page
   * can mark this one.
   */
  get sessionId() {
    return this.core.sessionId;
  }
  /** Whether this tab holds the connection (always, without tab sharing). */
  get isLeader() {
    return this.core.isLeader;
  }
  /** Listens to `name`; returns the function that stops listening. */
  on(name, fn) {
    return this.core.emitter.on(name, fn);
  }
  /**
   * Starts connecting; resolves once the connection is open (this tab's, or
   * the leader tab's). Rejects only if the client is closed first — by
   * `close()`, or by the server refusing the user (4003) — or the token
   * provider fails before the first connection. Calling it again is harmless.
   */
  connect() {
    return this.core.connect();
  }
  /** Stops: closes this tab's socket (another tab then takes over the group) and reconnects no more. */
  close() {
    this.core.close();
  }
  /**
   * Marks notifications read: `{ seqs: [12, 13] }` or `{ up_to_seq: 13 }`.
   * Goes over the socket with the `read` frame when it is open (from a
   * follower tab, through the leader's), else over HTTP. Every session of the
   * user, this one included, then gets a `read` event.
   */
  markRead(mark) {
    return this.core.markRead(mark);
  }
};
export {
  Herald,
  HeraldError,
  backoffCeiling,
  backoffDelay,
  closeAction
};
