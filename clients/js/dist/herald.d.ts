import type { Inbox } from './inbox.js';
import type { ConnectionState, HeraldEvents, HeraldOptions, ReadMark } from './types.js';
/**
 * A user's live notifications from a Herald server.
 *
 * ```js
 * const herald = new Herald({ url: 'https://herald.example.com', token: () => getJwt() });
 * herald.on('notification', (n) => show(n));
 * await herald.connect();
 * ```
 *
 * It reconnects by itself (full-jitter backoff, by close code), resumes after
 * the last seq it saw (kept in `localStorage`), refreshes the token in-band
 * when the server warns that it expires, and shares one connection among all
 * tabs of the origin.
 */
export declare class Herald {
    /** The user's inbox over the HTTP API. */
    readonly inbox: Inbox;
    private readonly core;
    constructor(options: HeraldOptions);
    /** `connecting`, `open`, `reconnecting` or `closed` (also before `connect()`). */
    get state(): ConnectionState;
    /** The newest seq this client has seen (or started after); `null` before the first connection. */
    get lastSeq(): number | null;
    /**
     * The id of the session the connection runs on while it is `open` (the
     * welcome's `session_id`; shared by every tab of a group), `null` otherwise:
     * what `GET /v1/users/{id}/sessions` lists, so an app's "your devices" page
     * can mark this one.
     */
    get sessionId(): string | null;
    /** Whether this tab holds the connection (always, without tab sharing). */
    get isLeader(): boolean;
    /** Listens to `name`; returns the function that stops listening. */
    on<K extends keyof HeraldEvents>(name: K, fn: (value: HeraldEvents[K]) => void): () => void;
    /**
     * Starts connecting; resolves once the connection is open (this tab's, or
     * the leader tab's). Rejects only if the client is closed first — by
     * `close()`, or by the server refusing the user (4003) — or the token
     * provider fails before the first connection. Calling it again is harmless.
     */
    connect(): Promise<void>;
    /** Stops: closes this tab's socket (another tab then takes over the group) and reconnects no more. */
    close(): void;
    /**
     * Marks notifications read: `{ seqs: [12, 13] }` or `{ up_to_seq: 13 }`.
     * Goes over the socket with the `read` frame when it is open (from a
     * follower tab, through the leader's), else over HTTP. Every session of the
     * user, this one included, then gets a `read` event.
     */
    markRead(mark: ReadMark): Promise<void>;
}
