// One tab's WebSocket to Herald: connect with the token and `since`, read the
// frames, answer `token_expiring` with an in-band `refresh`, watch liveness,
// and after a close decide by its code whether and when to come back (see
// backoff.ts). Whoever holds a Connection — the page itself, or the leader of
// a tab group — receives what happens through a Sink.

import { type Backoff, backoffDelay, closeAction } from './backoff.js';
import { HeraldError, TOKEN_CODES } from './errors.js';
import { readBody } from './inbox.js';
import type { SeqCursor } from './storage.js';
import { readClaims, type Tokens } from './token.js';
import type { Endpoints } from './urls.js';
import type { ConnectionState, Notification, ReadEvent, ReadMark, Truncation, WebSocketConstructor } from './types.js';

/**
 * What a Connection reports. `stopped` is final: the server refused the user for good (4003).
 * `state('open', sessionId)` carries the welcome's `session_id`.
 */
export interface Sink {
  state(state: Exclude<ConnectionState, 'closed'>, sessionId?: string | null): void;
  notification(n: Notification): void;
  read(mark: ReadEvent): void;
  truncated(t: Truncation): void;
  error(e: HeraldError): void;
  stopped(e: HeraldError): void;
}

export interface ConnectionConfig {
  endpoints: Endpoints;
  transport: 'subprotocol' | 'query';
  backoff: Backoff;
  tokens: Tokens;
  cursor: SeqCursor;
  WebSocket: WebSocketConstructor;
  fetch: typeof fetch;
}

/** A socket that has not said `welcome` within this long is given up and retried. */
const CONNECT_TIMEOUT_MS = 15_000;
/** How long a frame with a `ref` waits for its `ok` / `error`. */
const REQUEST_TIMEOUT_MS = 10_000;
const DEFAULT_HEARTBEAT_SECS = 25;

interface Pending {
  resolve: () => void;
  reject: (e: HeraldError) => void;
  timer: ReturnType<typeof setTimeout>;
}

export class Connection {
  private ws: WebSocket | null = null;
  /** The token the current socket's session runs on (changed by a refresh). */
  private sessionToken: string | null = null;
  private welcomed = false;
  private stopped = false;
  private attempt = 0;
  /** Set once a failed handshake was explained by asking the HTTP API; cleared by a welcome. */
  private probed = false;
  private refreshing = false;
  private nextRef = 1;
  private readonly pending = new Map<number, Pending>();
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private connectTimer: ReturnType<typeof setTimeout> | null = null;
  private heartbeatTimer: ReturnType<typeof setInterval> | null = null;
  private heartbeatMs = DEFAULT_HEARTBEAT_SECS * 1000;
  private lastFrameAt = 0;
  private pingAt: number | null = null;
  private readonly onOnline = () => this.retryNow();

  constructor(
    private readonly config: ConnectionConfig,
    private readonly sink: Sink,
    private readonly firstState: 'connecting' | 'reconnecting' = 'connecting',
  ) {}

  get isOpen(): boolean {
    return this.welcomed && this.ws !== null;
  }

  start(): void {
    (globalThis as { addEventListener?: typeof addEventListener }).addEventListener?.('online', this.onOnline);
    this.sink.state(this.firstState);
    void this.open();
  }

  /** Closes the socket (1000) and stops for good. */
  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    (globalThis as { removeEventListener?: typeof removeEventListener }).removeEventListener?.('online', this.onOnline);
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, 'client closed');
      } catch {
        // Already closing.
      }
    }
    this.failPending(new HeraldError('closed', 'the client was closed'));
  }

  /** The spec's `read` frame; resolves on the server's `ok`. */
  async markRead(mark: ReadMark): Promise<void> {
    await this.request({ type: 'read', ...readBody(mark) });
  }

  // ------------------------------------------------------------ connecting

  private async open(): Promise<void> {
    this.retryTimer = null;
    let token: string;
    try {
      token = await this.config.tokens.forConnect();
    } catch (e) {
      if (this.stopped) return;
      this.sink.error(asHeraldError(e, 'token_provider_failed'));
      this.retryAfter(backoffDelay(this.attempt++, this.config.backoff));
      return;
    }
    if (this.stopped) return;
    const url = new URL(this.config.endpoints.ws);
    const since = this.config.cursor.value;
    if (since !== null) url.searchParams.set('since', String(since));
    const epoch = this.config.cursor.epoch;
    if (since !== null && epoch !== null) url.searchParams.set('epoch', epoch);
    const protocols = ['herald.v1'];
    if (this.config.transport === 'query') url.searchParams.set('access_token', token);
    else protocols.push(`herald.bearer.${token}`);

    let ws: WebSocket;
    try {
      ws = new this.config.WebSocket(url.toString(), protocols);
    } catch (e) {
      this.sink.error(asHeraldError(e, 'network'));
      this.retryAfter(backoffDelay(this.attempt++, this.config.backoff));
      return;
    }
    this.ws = ws;
    this.sessionToken = token;
    this.welcomed = false;
    ws.onmessage = (event: MessageEvent) => {
      if (this.ws === ws) this.onFrame(event.data);
    };
    ws.onclose = (event: CloseEvent) => {
      if (this.ws === ws) this.onClose(event.code, event.reason);
    };
    ws.onerror = () => {
      // A close event follows; it decides.
    };
    this.connectTimer = setTimeout(() => this.drop('no welcome in time'), CONNECT_TIMEOUT_MS);
  }

  private retryAfter(delayMs: number): void {
    if (this.stopped) return;
    this.retryTimer = setTimeout(() => void this.open(), delayMs);
  }

  /** The network came back while waiting: try now instead of at the end of the backoff. */
  private retryNow(): void {
    if (this.stopped || this.retryTimer === null) return;
    clearTimeout(this.retryTimer);
    void this.open();
  }

  // ------------------------------------------------------------ frames

  private onFrame(data: unknown): void {
    this.lastFrameAt = Date.now();
    if (typeof data !== 'string') return;
    let frame: Record<string, unknown>;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    switch (frame.type) {
      case 'welcome':
        this.onWelcome(frame);
        break;
      case 'notification':
        this.onNotification(frame);
        break;
      case 'read':
        if (Array.isArray(frame.seqs)) this.sink.read({ seqs: frame.seqs as number[] });
        else if (typeof frame.up_to_seq === 'number') this.sink.read({ up_to_seq: frame.up_to_seq });
        break;
      case 'token_expiring':
        void this.refresh();
        break;
      case 'ok':
        this.settle(frame.ref, null);
        break;
      case 'error': {
        const error = new HeraldError(String(frame.code ?? 'error'), String(frame.message ?? 'the server refused a frame'));
        if (!this.settle(frame.ref, error)) this.sink.error(error);
        break;
      }
      default:
        // `pong`, and frame types added later.
        break;
    }
  }

  private onWelcome(frame: Record<string, unknown>): void {
    this.welcomed = true;
    this.probed = false;
    this.attempt = 0;
    this.clearConnectTimer();
    const cursor = this.config.cursor;
    const since = cursor.value;
    const lastSeq = frame.last_seq;
    // Without `since` the session starts after `last_seq`. With one, the
    // server resumes after `frame.since` (servers before store epochs: after
    // `last_seq` when our `since` is above it). That is below ours when our
    // seqs ran past the store's (another database) or belong to an earlier
    // epoch (a restore from a backup: what followed the backup was lost, and
    // its seqs were handed out again). We must follow, or we would drop what
    // the server sends up to our old seq.
    const resumed = typeof frame.since === 'number' ? frame.since : lastSeq;
    if (since === null) {
      if (typeof lastSeq === 'number') cursor.set(lastSeq);
    } else if (typeof resumed === 'number' && resumed < since) {
      cursor.set(resumed);
    }
    // After the seq, so a crash between the two writes costs a replay, not a gap.
    if (typeof frame.epoch === 'string') cursor.setEpoch(frame.epoch);
    if (frame.truncated === true && since !== null && typeof frame.oldest_seq === 'number') {
      this.sink.truncated({ since, oldest_seq: frame.oldest_seq });
    }
    const secs = typeof frame.heartbeat_secs === 'number' && frame.heartbeat_secs > 0 ? frame.heartbeat_secs : null;
    this.startHeartbeat((secs ?? DEFAULT_HEARTBEAT_SECS) * 1000);
    this.sink.state('open', typeof frame.session_id === 'string' ? frame.session_id : null);
  }

  /** Passes on each seq once, in order: anything at or below the last seen seq is a duplicate. */
  private onNotification(frame: Record<string, unknown>): void {
    const seq = frame.seq;
    if (typeof seq !== 'number' || !Number.isSafeInteger(seq)) return;
    const last = this.config.cursor.value;
    if (last !== null && seq <= last) return;
    this.config.cursor.set(seq);
    const { type: _type, ...notification } = frame;
    this.sink.notification(notification as unknown as Notification);
  }

  /** `token_expiring`: a new token from the provider, sent in-band; the session lives on. */
  private async refresh(): Promise<void> {
    if (this.refreshing) return;
    this.refreshing = true;
    const ws = this.ws;
    try {
      const token = await this.config.tokens.fresh();
      if (ws !== this.ws || this.stopped) return;
      const before = this.sessionToken;
      const oldExp = before ? readClaims(before).exp : undefined;
      const newExp = readClaims(token).exp;
      // Nothing newer to offer: the server ends the session at expiry (4001)
      // and the reconnect asks the provider again.
      if (token === before || (oldExp !== undefined && newExp !== undefined && newExp <= oldExp)) return;
      await this.request({ type: 'refresh', token });
      if (ws === this.ws) this.sessionToken = token;
    } catch (e) {
      const error = asHeraldError(e, 'token_provider_failed');
      if (error.code !== 'connection_lost' && error.code !== 'closed') this.sink.error(error);
    } finally {
      this.refreshing = false;
    }
  }

  /** Sends a frame with a fresh `ref` and waits for its `ok` (resolves) or `error` (rejects). */
  private request(frame: Record<string, unknown>): Promise<void> {
    const ws = this.ws;
    if (!ws || !this.welcomed) {
      return Promise.reject(new HeraldError('not_connected', 'the connection is not open'));
    }
    const ref = this.nextRef++;
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new HeraldError('timeout', `no answer to ${frame.type} in ${REQUEST_TIMEOUT_MS} ms`));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(ref, { resolve, reject, timer });
      try {
        ws.send(JSON.stringify({ ...frame, ref }));
      } catch {
        this.settle(ref, new HeraldError('connection_lost', 'the connection closed before the frame was sent'));
      }
    });
  }

  /** Answers the request with `ref`; false when there is none. */
  private settle(ref: unknown, error: HeraldError | null): boolean {
    if (typeof ref !== 'number') return false;
    const pending = this.pending.get(ref);
    if (!pending) return false;
    this.pending.delete(ref);
    clearTimeout(pending.timer);
    if (error) pending.reject(error);
    else pending.resolve();
    return true;
  }

  private failPending(error: HeraldError): void {
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
  private startHeartbeat(ms: number): void {
    this.stopHeartbeat();
    this.heartbeatMs = ms;
    this.pingAt = null;
    this.heartbeatTimer = setInterval(() => this.beat(), ms);
  }

  private beat(): void {
    const ws = this.ws;
    if (!ws || !this.welcomed) return;
    const now = Date.now();
    if (this.pingAt !== null && this.lastFrameAt < this.pingAt) {
      if (now - this.pingAt >= this.heartbeatMs) this.drop('no answer to ping');
      return;
    }
    try {
      ws.send('{"type":"ping"}');
      this.pingAt = now;
    } catch {
      this.drop('send failed');
    }
  }

  private stopHeartbeat(): void {
    if (this.heartbeatTimer !== null) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }

  /** Gives up on a socket that is silent or stuck: handled as a drop (1006) at once. */
  private drop(_reason: string): void {
    const ws = this.ws;
    if (!ws) return;
    detach(ws);
    try {
      ws.close();
    } catch {
      // Already closed.
    }
    this.onClose(1006, _reason);
  }

  // ------------------------------------------------------------ closing

  private onClose(code: number, reason: string): void {
    const opened = this.welcomed;
    this.ws = null;
    this.welcomed = false;
    this.clearTimers();
    this.failPending(new HeraldError('connection_lost', 'the connection closed before the server answered'));
    if (this.stopped) return;

    const action = closeAction(code);
    let delay: number;
    switch (action.kind) {
      case 'stop': {
        this.stop();
        this.sink.stopped(
          new HeraldError(action.error, reason || `the server refused this user (close ${code})`, { closeCode: code }),
        );
        return;
      }
      case 'new-token':
        // The next connect asks the provider anyway; the first retry is immediate.
        delay = this.attempt === 0 ? 0 : backoffDelay(this.attempt, this.config.backoff);
        break;
      case 'prompt':
        // Another node takes us: soon, spread over `baseMs` so a node's
        // sessions do not all arrive at once.
        this.attempt = 0;
        delay = backoffDelay(0, this.config.backoff);
        break;
      case 'backoff':
        if (action.error) {
          this.sink.error(new HeraldError(action.error, reason || `closed with ${code}`, { closeCode: code }));
        }
        delay = backoffDelay(this.attempt, this.config.backoff);
        break;
    }
    this.attempt += 1;
    this.sink.state('reconnecting');
    if (!opened && code === 1006) void this.explainRefusal();
    this.retryAfter(delay);
  }

  /**
   * A browser does not say why a handshake failed. When it does, ask the
   * HTTP API with the same token once: a refused token (401) is reported as
   * an `error` with the server's code (`token_expired`, `invalid_token`, `token_revoked`), so
   * the application can sign the user in again. Retrying goes on meanwhile.
   */
  private async explainRefusal(): Promise<void> {
    const token = this.sessionToken;
    if (this.probed || !token) return;
    this.probed = true;
    try {
      const response = await this.config.fetch(`${this.config.endpoints.http}/v1/me/unread`, {
        headers: { Authorization: `Bearer ${token}` },
        credentials: 'omit',
        cache: 'no-store',
      });
      if (response.status !== 401 || this.stopped) return;
      const body = (await response.json().catch(() => null)) as { error?: { code?: string; message?: string } } | null;
      const code = body?.error?.code;
      if (code && TOKEN_CODES.has(code)) {
        this.sink.error(new HeraldError(code, body?.error?.message ?? 'the token was refused', { status: 401 }));
      }
    } catch {
      // The server is unreachable: nothing to explain.
    }
  }

  private clearConnectTimer(): void {
    if (this.connectTimer !== null) clearTimeout(this.connectTimer);
    this.connectTimer = null;
  }

  private clearTimers(): void {
    this.clearConnectTimer();
    this.stopHeartbeat();
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }
}

function detach(ws: WebSocket): void {
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}

function asHeraldError(e: unknown, code: string): HeraldError {
  if (e instanceof HeraldError) return e;
  return new HeraldError(code, e instanceof Error ? e.message : String(e), { cause: e });
}
