import { Connection, type Sink } from './connection.js';
import { Emitter } from './emitter.js';
import { HeraldError } from './errors.js';
import { Inbox } from './inbox.js';
import { SeqCursor } from './storage.js';
import { Tokens } from './token.js';
import type { ConnectionState, HeraldEvents, HeraldOptions, ReadMark } from './types.js';
import { type Endpoints } from './urls.js';
/** How notifications reach this instance. */
export interface Link {
    readonly isLeader: boolean;
    start(): void;
    stop(): void;
    /** Over the socket (directly or through the leader tab). */
    markRead(mark: ReadMark): Promise<void>;
}
export declare class Core {
    private readonly options;
    readonly emitter: Emitter<HeraldEvents>;
    readonly endpoints: Endpoints;
    readonly tokens: Tokens;
    readonly cursor: SeqCursor;
    readonly inbox: Inbox;
    private readonly storage;
    private readonly backoff;
    private readonly share;
    private readonly fetchFn;
    private readonly WebSocketCtor;
    private current;
    private session;
    private link;
    private storageKey;
    /** Bumped by close(): a start still awaiting the token knows it was cancelled. */
    private generation;
    private starting;
    private waiters;
    constructor(options: HeraldOptions);
    get state(): ConnectionState;
    /** The open session's id (the welcome's `session_id`); `null` while not open. */
    get sessionId(): string | null;
    get isLeader(): boolean;
    connect(): Promise<void>;
    close(): void;
    markRead(mark: ReadMark): Promise<void>;
    emit<K extends keyof HeraldEvents>(name: K, value: HeraldEvents[K]): void;
    /**
     * Sets and announces the state; `open` settles `connect()`, `closed` fails it with `error`.
     * `sessionId` is the open session's (set before the state is announced; any other state clears it).
     */
    setState(state: ConnectionState, error?: HeraldError, sessionId?: string | null): void;
    /** The server refused the user for good (4003): report, stop, and say `closed`. */
    stopped(error: HeraldError): void;
    /** This tab is about to hold the connection: it now writes the seq, starting from the newest one known. */
    takeOver(): Promise<void>;
    newConnection(sink: Sink, first: 'connecting' | 'reconnecting'): Connection;
    /** Asks for the token (its `sub` names the stored seq and the tab group), then links up. */
    private start;
}
