// One connection for all tabs of an origin and user.
//
// Every tab asks for the same Web Lock; the tab holding it is the leader and
// owns the only WebSocket. It relays what arrives — state, notifications,
// read marks, errors — on a BroadcastChannel, and carries out `markRead`
// calls that followers forward to it. When the leader tab closes, the browser
// releases its lock and the next tab in line takes it, connecting with the
// seq the group has seen (relayed to every tab, and stored by the leader), so
// nothing is lost and nothing shown twice.

import { Connection, type Sink } from './connection.js';
import { HeraldError } from './errors.js';
import type { Core, Link } from './core.js';
import type { ConnectionState, Notification, ReadEvent, ReadMark, Truncation } from './types.js';

/** A forwarded `markRead` that gets no answer in this long falls back to HTTP. */
const CALL_TIMEOUT_MS = 5_000;

interface ErrorData {
  code: string;
  message: string;
  status?: number;
  closeCode?: number;
}

type Relayed =
  | { name: 'notification'; data: Notification }
  | { name: 'read'; data: ReadEvent }
  | { name: 'truncated'; data: Truncation }
  | { name: 'error'; data: ErrorData };

type Message =
  | { t: 'hello' }
  | { t: 'state'; state: Exclude<ConnectionState, 'closed'>; lastSeq: number | null; sessionId?: string | null }
  | ({ t: 'event' } & Relayed)
  | { t: 'stopped'; error: ErrorData }
  | { t: 'call'; id: string; from: string; mark: ReadMark }
  | { t: 'reply'; id: string; to: string; error?: ErrorData }
  | { t: 'leaving' };

interface Call {
  resolve: () => void;
  reject: (e: HeraldError) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** Whether this page can share: Web Locks and BroadcastChannel both present. */
export function canShareTabs(): boolean {
  const nav = (globalThis as { navigator?: { locks?: LockManager } }).navigator;
  return typeof nav?.locks?.request === 'function' && typeof globalThis.BroadcastChannel === 'function';
}

export class SharedLink implements Link {
  private readonly id = randomId();
  private readonly channel: BroadcastChannel;
  private readonly abort = new AbortController();
  private readonly lockName: string;
  private connection: Connection | null = null;
  private release: (() => void) | null = null;
  private stopped = false;
  private readonly calls = new Map<string, Call>();
  private readonly onPageHide = (event: Event) => {
    if (this.connection && !(event as PageTransitionEvent).persisted) this.post({ t: 'leaving' });
  };

  /** `group` names the server and user: `<http base>|<sub>`. */
  constructor(
    private readonly core: Core,
    group: string,
  ) {
    this.channel = new BroadcastChannel(`herald:tabs:${group}`);
    this.lockName = `herald:leader:${group}`;
  }

  get isLeader(): boolean {
    return this.connection !== null;
  }

  start(): void {
    this.channel.onmessage = (event: MessageEvent) => this.onMessage(event.data as Message);
    globalThis.addEventListener?.('pagehide', this.onPageHide);
    this.post({ t: 'hello' });
    navigator.locks
      .request(this.lockName, { signal: this.abort.signal }, () => this.lead())
      .catch(() => {
        // Aborted by stop() while waiting in line.
      });
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    this.abort.abort();
    globalThis.removeEventListener?.('pagehide', this.onPageHide);
    if (this.connection) {
      this.connection.stop();
      this.connection = null;
      this.post({ t: 'leaving' });
    }
    this.release?.();
    this.release = null;
    this.failCalls(new HeraldError('closed', 'the client was closed'));
    this.channel.close();
  }

  async markRead(mark: ReadMark): Promise<void> {
    if (this.connection) return this.connection.markRead(mark);
    if (this.core.state !== 'open') throw new HeraldError('not_connected', 'no tab holds an open connection');
    const id = randomId();
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.calls.delete(id);
        reject(new HeraldError('timeout', 'the leader tab did not answer'));
      }, CALL_TIMEOUT_MS);
      this.calls.set(id, { resolve, reject, timer });
      this.post({ t: 'call', id, from: this.id, mark });
    });
  }

  // ------------------------------------------------------------ leading

  /** Runs while this tab holds the lock; the returned promise ends the hold. */
  private lead(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    return new Promise<void>((release) => {
      this.release = release;
      this.core
        .takeOver()
        .then(() => {
          if (this.stopped) return release();
          const first = this.core.state === 'connecting' ? 'connecting' : 'reconnecting';
          this.connection = this.core.newConnection(this.leaderSink(), first);
          this.connection.start();
        })
        .catch((e: unknown) => this.core.stopped(asError(e)));
    });
  }

  /** The leader reports to its own page and to every other tab. */
  private leaderSink(): Sink {
    const core = this.core;
    return {
      state: (state, sessionId) => {
        core.setState(state, undefined, sessionId);
        this.post({ t: 'state', state, lastSeq: core.cursor.value, sessionId: core.sessionId });
      },
      notification: (n) => {
        core.emit('notification', n);
        this.post({ t: 'event', name: 'notification', data: n });
      },
      read: (mark) => {
        core.emit('read', mark);
        this.post({ t: 'event', name: 'read', data: mark });
      },
      truncated: (t) => {
        core.emit('truncated', t);
        this.post({ t: 'event', name: 'truncated', data: t });
      },
      error: (e) => {
        core.emit('error', e);
        this.post({ t: 'event', name: 'error', data: errorData(e) });
      },
      stopped: (e) => {
        this.post({ t: 'stopped', error: errorData(e) });
        core.stopped(e);
      },
    };
  }

  // ------------------------------------------------------------ messages

  private onMessage(m: Message): void {
    if (this.stopped || !m || typeof m !== 'object') return;
    const leader = this.connection;
    switch (m.t) {
      case 'hello':
        if (leader) {
          const sessionId = this.core.sessionId;
          this.post({ t: 'state', state: this.leaderState(), lastSeq: this.core.cursor.value, sessionId });
        }
        break;
      case 'call':
        if (leader) {
          leader.markRead(m.mark).then(
            () => this.post({ t: 'reply', id: m.id, to: m.from }),
            (e: unknown) => this.post({ t: 'reply', id: m.id, to: m.from, error: errorData(e) }),
          );
        }
        break;
      case 'reply':
        if (m.to === this.id) this.settle(m.id, m.error ? fromData(m.error) : null);
        break;
      default:
        if (!leader) this.follow(m);
    }
  }

  /** What a follower does with the leader's reports. */
  private follow(m: Message): void {
    const core = this.core;
    switch (m.t) {
      case 'state':
        if (typeof m.lastSeq === 'number') core.cursor.set(m.lastSeq);
        core.setState(m.state, undefined, typeof m.sessionId === 'string' ? m.sessionId : null);
        break;
      case 'event':
        if (m.name === 'notification') {
          const last = core.cursor.value;
          if (last !== null && m.data.seq <= last) return;
          core.cursor.set(m.data.seq);
          core.emit('notification', m.data);
        } else if (m.name === 'error') {
          core.emit('error', fromData(m.data));
        } else if (m.name === 'read') {
          core.emit('read', m.data);
        } else {
          core.emit('truncated', m.data);
        }
        break;
      case 'stopped':
        core.stopped(fromData(m.error));
        break;
      case 'leaving':
        // The next tab in line takes over; calls in flight go over HTTP.
        if (core.state === 'open') core.setState('reconnecting');
        this.failCalls(new HeraldError('connection_lost', 'the leader tab left'));
        break;
      default:
        break;
    }
  }

  private leaderState(): Exclude<ConnectionState, 'closed'> {
    const state = this.core.state;
    return state === 'closed' ? 'reconnecting' : state;
  }

  private post(message: Message): void {
    try {
      this.channel.postMessage(message);
    } catch {
      // Closed: this tab is stopping.
    }
  }

  private settle(id: string, error: HeraldError | null): void {
    const call = this.calls.get(id);
    if (!call) return;
    this.calls.delete(id);
    clearTimeout(call.timer);
    if (error) call.reject(error);
    else call.resolve();
  }

  private failCalls(error: HeraldError): void {
    for (const id of [...this.calls.keys()]) this.settle(id, error);
  }
}

function errorData(e: unknown): ErrorData {
  if (e instanceof HeraldError) {
    return {
      code: e.code,
      message: e.message,
      ...(e.status !== undefined ? { status: e.status } : {}),
      ...(e.closeCode !== undefined ? { closeCode: e.closeCode } : {}),
    };
  }
  return { code: 'error', message: e instanceof Error ? e.message : String(e) };
}

function fromData(d: ErrorData): HeraldError {
  return new HeraldError(d.code, d.message, { status: d.status, closeCode: d.closeCode });
}

function asError(e: unknown): HeraldError {
  return e instanceof HeraldError ? e : new HeraldError('error', e instanceof Error ? e.message : String(e));
}

function randomId(): string {
  const c = (globalThis as { crypto?: Crypto }).crypto;
  if (c?.randomUUID) return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}
