import { type Backoff } from './backoff.js';
import { HeraldError } from './errors.js';
import type { SeqCursor } from './storage.js';
import { type Tokens } from './token.js';
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
export declare class Connection {
    private readonly config;
    private readonly sink;
    private readonly firstState;
    private ws;
    /** The token the current socket's session runs on (changed by a refresh). */
    private sessionToken;
    private welcomed;
    private stopped;
    private attempt;
    /** Set once a failed handshake was explained by asking the HTTP API; cleared by a welcome. */
    private probed;
    private refreshing;
    private nextRef;
    private readonly pending;
    private retryTimer;
    private connectTimer;
    private heartbeatTimer;
    private heartbeatMs;
    private lastFrameAt;
    private pingAt;
    private readonly onOnline;
    constructor(config: ConnectionConfig, sink: Sink, firstState?: 'connecting' | 'reconnecting');
    get isOpen(): boolean;
    start(): void;
    /** Closes the socket (1000) and stops for good. */
    stop(): void;
    /** The spec's `read` frame; resolves on the server's `ok`. */
    markRead(mark: ReadMark): Promise<void>;
    private open;
    private retryAfter;
    /** The network came back while waiting: try now instead of at the end of the backoff. */
    private retryNow;
    private onFrame;
    private onWelcome;
    /** Passes on each seq once, in order: anything at or below the last seen seq is a duplicate. */
    private onNotification;
    /** `token_expiring`: a new token from the provider, sent in-band; the session lives on. */
    private refresh;
    /** Sends a frame with a fresh `ref` and waits for its `ok` (resolves) or `error` (rejects). */
    private request;
    /** Answers the request with `ref`; false when there is none. */
    private settle;
    private failPending;
    /**
     * Browsers answer the server's WebSocket pings without telling the page, so
     * the page pings in-band: each beat sends a `ping` unless one is still
     * unanswered; a ping left without any frame for a whole beat means the
     * connection is dead. (A throttled background tab's late timer does not
     * count against the server: the check is "no frame since the ping".)
     */
    private startHeartbeat;
    private beat;
    private stopHeartbeat;
    /** Gives up on a socket that is silent or stuck: handled as a drop (1006) at once. */
    private drop;
    private onClose;
    /**
     * A browser does not say why a handshake failed. When it does, ask the
     * HTTP API with the same token once: a refused token (401) is reported as
     * an `error` with the server's code (`token_expired`, `invalid_token`, `token_revoked`), so
     * the application can sign the user in again. Retrying goes on meanwhile.
     */
    private explainRefusal;
    private clearConnectTimer;
    private clearTimers;
}
