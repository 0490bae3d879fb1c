// The state behind a Herald instance: listeners, the connection state, the
// last seen seq, and the link that brings notifications in — this tab's own
// Connection, or a place in a tab group (tabs.ts).

import { type Backoff, resolveBackoff } from './backoff.js';
import { Connection, type Sink } from './connection.js';
import { Emitter } from './emitter.js';
import { HeraldError } from './errors.js';
import { Inbox } from './inbox.js';
import { defaultStorage, SeqCursor, seqKey } from './storage.js';
import { canShareTabs, SharedLink } from './tabs.js';
import { readClaims, Tokens } from './token.js';
import type { ConnectionState, HeraldEvents, HeraldOptions, ReadMark, SeqStorage, WebSocketConstructor } from './types.js';
import { type Endpoints, endpoints } from './urls.js';

/** How notifications reach this instance. */
export interface Link {
  readonly isLeader: boolean;
  start(): void;
  stop(): void;
  /** Over the socket (directly or through the leader tab). */
  markRead(mark: ReadMark): Promise<void>;
}

/** Errors after which `markRead` is retried over HTTP: the socket could not take it. */
const HTTP_FALLBACK = new Set(['not_connected', 'connection_lost', 'timeout', 'closed']);

interface Waiter {
  resolve: () => void;
  reject: (e: HeraldError) => void;
}

export class Core {
  readonly emitter = new Emitter<HeraldEvents>();
  readonly endpoints: Endpoints;
  readonly tokens: Tokens;
  readonly cursor: SeqCursor;
  readonly inbox: Inbox;
  private readonly storage: SeqStorage;
  private readonly backoff: Backoff;
  private readonly share: boolean;
  private readonly fetchFn: typeof fetch;
  private readonly WebSocketCtor: WebSocketConstructor | undefined;
  private current: ConnectionState = 'closed';
  private session: string | null = null;
  private link: Link | null = null;
  private storageKey: string | null = null;
  /** Bumped by close(): a start still awaiting the token knows it was cancelled. */
  private generation = 0;
  private starting = false;
  private waiters: Waiter[] = [];

  constructor(private readonly options: HeraldOptions) {
    if (!options || typeof options.token !== 'function') {
      throw new HeraldError('invalid_argument', 'options.token must be a function returning the user token');
    }
    this.endpoints = endpoints(options.url);
    this.tokens = new Tokens(options.token);
    this.storage = options.storage ?? defaultStorage();
    this.cursor = new SeqCursor(this.storage);
    this.backoff = resolveBackoff(options.backoff);
    this.share = options.shareTabs !== false && canShareTabs();
    const f = options.fetch;
    this.fetchFn = f ? (input, init) => f(input, init) : (input, init) => globalThis.fetch(input, init);
    this.WebSocketCtor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    this.inbox = new Inbox(this.endpoints.http, this.tokens, this.fetchFn);
  }

  get state(): ConnectionState {
    return this.current;
  }

  /** The open session's id (the welcome's `session_id`); `null` while not open. */
  get sessionId(): string | null {
    return this.session;
  }

  get isLeader(): boolean {
    return this.link?.isLeader ?? false;
  }

  connect(): Promise<void> {
    if (this.current === 'open') return Promise.resolve();
    const opened = new Promise<void>((resolve, reject) => this.waiters.push({ resolve, reject }));
    if (!this.link && !this.starting) void this.start(this.generation);
    return opened;
  }

  close(): void {
    this.generation += 1;
    this.starting = false;
    this.link?.stop();
    this.link = null;
    this.setState('closed', new HeraldError('closed', 'the client was closed'));
  }

  async markRead(mark: ReadMark): Promise<void> {
    const link = this.link;
    if (link && this.current === 'open') {
      try {
        return await link.markRead(mark);
      } catch (e) {
        if (!(e instanceof HeraldError) || !HTTP_FALLBACK.has(e.code)) throw e;
      }
    }
    return this.inbox.markRead(mark);
  }

  // ------------------------------------------------------------ for links

  emit<K extends keyof HeraldEvents>(name: K, value: HeraldEvents[K]): void {
    this.emitter.emit(name, value);
  }

  /**
   * Sets and announces the state; `open` settles `connect()`, `closed` fails it with `error`.
   * `sessionId` is the open session's (set before the state is announced; any other state clears it).
   */
  setState(state: ConnectionState, error?: HeraldError, sessionId: string | null = null): void {
    this.session = state === 'open' ? sessionId : null;
    if (state === this.current) return;
    this.current = state;
    this.emitter.emit('state', state);
    if (state === 'open' || state === 'closed') {
      const waiters = this.waiters;
      this.waiters = [];
      for (const w of waiters) {
        if (state === 'open') w.resolve();
        else w.reject(error ?? new HeraldError('closed', 'the client was closed'));
      }
    }
  }

  /** The server refused the user for good (4003): report, stop, and say `closed`. */
  stopped(error: HeraldError): void {
    this.generation += 1;
    this.link?.stop();
    this.link = null;
    this.emit('error', error);
    this.setState('closed', error);
  }

  /** This tab is about to hold the connection: it now writes the seq, starting from the newest one known. */
  async takeOver(): Promise<void> {
    this.cursor.persist = true;
    if (this.storageKey) await this.cursor.load(this.storageKey);
  }

  newConnection(sink: Sink, first: 'connecting' | 'reconnecting'): Connection {
    const WebSocketCtor = this.WebSocketCtor;
    if (!WebSocketCtor) throw new HeraldError('invalid_argument', 'no WebSocket here: pass options.WebSocket');
    return new Connection(
      {
        endpoints: this.endpoints,
        transport: this.options.tokenTransport === 'query' ? 'query' : 'subprotocol',
        backoff: this.backoff,
        tokens: this.tokens,
        cursor: this.cursor,
        WebSocket: WebSocketCtor,
        fetch: this.fetchFn,
      },
      sink,
      first,
    );
  }

  // ------------------------------------------------------------ starting

  /** Asks for the token (its `sub` names the stored seq and the tab group), then links up. */
  private async start(generation: number): Promise<void> {
    this.starting = true;
    this.setState('connecting');
    let token: string;
    try {
      token = await this.tokens.prime();
    } catch (e) {
      if (generation !== this.generation) return;
      this.starting = false;
      const error = e instanceof HeraldError ? e : new HeraldError('token_provider_failed', String(e));
      this.emit('error', error);
      this.setState('closed', error);
      return;
    }
    if (generation !== this.generation) return;
    const sub = readClaims(token).sub ?? '';
    this.storageKey = seqKey(this.endpoints.http, sub);
    await this.cursor.load(this.storageKey);
    if (generation !== this.generation) return;
    this.starting = false;
    this.link = this.share ? new SharedLink(this, `${this.endpoints.http}|${sub}`) : new DirectLink(this);
    this.link.start();
  }
}

/** This tab's own connection: `shareTabs: false`, or no Web Locks / BroadcastChannel. */
class DirectLink implements Link {
  private connection: Connection | null = null;
  private stopped = false;

  constructor(private readonly core: Core) {}

  get isLeader(): boolean {
    return true;
  }

  start(): void {
    const core = this.core;
    core
      .takeOver()
      .then(() => {
        if (this.stopped) return;
        this.connection = core.newConnection(
          {
            state: (state, sessionId) => core.setState(state, undefined, sessionId),
            notification: (n) => core.emit('notification', n),
            read: (mark) => core.emit('read', mark),
            truncated: (t) => core.emit('truncated', t),
            error: (e) => core.emit('error', e),
            stopped: (e) => core.stopped(e),
          },
          'connecting',
        );
        this.connection.start();
      })
      .catch((e: unknown) => core.stopped(asHeraldError(e)));
  }

  stop(): void {
    this.stopped = true;
    this.connection?.stop();
    this.connection = null;
  }

  markRead(mark: ReadMark): Promise<void> {
    if (!this.connection) return Promise.reject(new HeraldError('not_connected', 'the connection is not open'));
    return this.connection.markRead(mark);
  }
}

function asHeraldError(e: unknown): HeraldError {
  return e instanceof HeraldError ? e : new HeraldError('error', e instanceof Error ? e.message : String(e));
}
