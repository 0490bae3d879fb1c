import type { HeraldError } from './errors.js';
/** A stored notification, as it arrives live and as the inbox API lists it. */
export interface Notification {
    /** The user's sequence number: 1, 2, 3, … with no gaps. */
    seq: number;
    id: string;
    topic: string;
    payload: unknown;
    /** RFC 3339, UTC, millisecond precision. */
    created_at: string;
    read: boolean;
}
/** What a `read` event says is now read: some seqs, or everything up to one. */
export type ReadEvent = {
    seqs: number[];
} | {
    up_to_seq: number;
};
/**
 * Which notifications a read mark covers: some seqs, everything up to one,
 * or the unread ones of one topic (up to a seq, when given). Other tabs and
 * devices hear of a topic mark as the seqs it marked.
 */
export type ReadMark = ReadEvent | {
    topic: string;
    up_to_seq?: number;
};
/**
 * The connection as the application sees it.
 * - `connecting`: the first connection is being opened.
 * - `open`: notifications flow (on this tab's socket, or the leader tab's).
 * - `reconnecting`: the connection dropped; the SDK comes back by itself and resumes.
 * - `closed`: not connected and not trying: before `connect()`, after `close()`,
 *   or after the server refused the user for good (close code 4003, with an `error` event).
 */
export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';
/** Seqs `since + 1 … oldest_seq - 1` expired on the server before this client caught up. */
export interface Truncation {
    since: number;
    oldest_seq: number;
}
/** What `on(name, fn)` hands to `fn`. */
export interface HeraldEvents {
    notification: Notification;
    read: ReadEvent;
    state: ConnectionState;
    error: HeraldError;
    truncated: Truncation;
}
/** Where the last seen seq is remembered; `localStorage` by default. May be async. */
export interface SeqStorage {
    get(key: string): string | null | undefined | Promise<string | null | undefined>;
    set(key: string, value: string): void | Promise<void>;
}
export interface BackoffOptions {
    /** The first retry waits up to this long (default 500 ms). */
    baseMs?: number;
    /** No retry waits longer than this (default 30 s). */
    capMs?: number;
}
/** Anything shaped like the browser's WebSocket constructor (for Node or tests). */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocket;
export interface HeraldOptions {
    /** The server: `https://host[:port][/base]` (or `http:`, `ws:`, `wss:`). */
    url: string;
    /** The user's JWT; called on every connect and when the server warns that the token is expiring. */
    token: () => string | Promise<string>;
    /** How the token travels on the WebSocket: `subprotocol` (default) or the `access_token` query parameter. */
    tokenTransport?: 'subprotocol' | 'query';
    /** Reconnect delays (full-jitter exponential backoff). */
    backoff?: BackoffOptions;
    /** Where the last seen seq is kept; `localStorage` when the page has it, else memory. */
    storage?: SeqStorage;
    /** One connection for all tabs of this origin and user (default true, where Web Locks and BroadcastChannel exist). */
    shareTabs?: boolean;
    /** The WebSocket constructor; `globalThis.WebSocket` by default. */
    WebSocket?: WebSocketConstructor;
    /** The fetch function for the inbox API; `globalThis.fetch` by default. */
    fetch?: typeof fetch;
}
/** One page of `GET /v1/me/notifications`: newest first. */
export interface InboxPage {
    notifications: Notification[];
    /** The user's newest seq. */
    last_seq: number;
}
export interface InboxQuery {
    /** 1–500, default 50. */
    limit?: number;
    /** Only seqs below this one (exclusive): the next older page. */
    before_seq?: number;
    /** Only seqs above this one (exclusive). */
    after_seq?: number;
    /** `true`: unread only; `false`: read only. */
    unread?: boolean;
    /** Only this topic's notifications. */
    topic?: string;
}
/** `GET /v1/me/unread`. */
export interface UnreadCounts {
    total: number;
    by_topic: Record<string, number>;
}
