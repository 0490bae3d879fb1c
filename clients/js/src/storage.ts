// The last seen seq, remembered per server and user so that a reload (or
// another tab taking over) resumes with `since` instead of starting over.

import type { SeqStorage } from './types.js';

export function seqKey(server: string, sub: string): string {
  return `herald:seq:${server}:${sub}`;
}

/** `localStorage` when the page can use it, else memory. */
export function defaultStorage(): SeqStorage {
  try {
    const local = (globalThis as { localStorage?: Storage }).localStorage;
    if (local) {
      const probe = 'herald:probe';
      local.setItem(probe, '1');
      local.removeItem(probe);
      return {
        get: (key) => local.getItem(key),
        set: (key, value) => local.setItem(key, value),
      };
    }
  } catch {
    // Storage disabled (private mode, sandboxed frame): memory then.
  }
  return memoryStorage();
}

export function memoryStorage(): SeqStorage {
  const map = new Map<string, string>();
  return {
    get: (key) => map.get(key) ?? null,
    set: (key, value) => {
      map.set(key, value);
    },
  };
}

/**
 * The last seq this client has seen, and the store epoch it belongs to (the
 * welcome's `epoch`, kept under `<key>:epoch`). Only the tab that holds the
 * connection writes them to storage (`persist`), so a follower tab replaying
 * an older relay can never move the stored value back.
 */
export class SeqCursor {
  private current: number | null = null;
  private currentEpoch: string | null = null;
  persist = false;
  private key: string | null = null;

  constructor(private readonly storage: SeqStorage) {}

  get value(): number | null {
    return this.current;
  }

  /** The store epoch the seq belongs to, once a server has said. */
  get epoch(): string | null {
    return this.currentEpoch;
  }

  /** Names the user's entry and takes the stored seq when it is newer than the one in memory. */
  async load(key: string): Promise<void> {
    this.key = key;
    let raw: string | null | undefined;
    try {
      raw = await this.storage.get(key);
    } catch {
      raw = null;
    }
    const stored = raw == null ? NaN : Number(raw);
    let storedEpoch: string | null | undefined;
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
  set(seq: number): void {
    this.current = seq;
    this.write('', String(seq));
  }

  /** Sets the store epoch (from a welcome). */
  setEpoch(epoch: string): void {
    if (epoch === this.currentEpoch) return;
    this.currentEpoch = epoch;
    this.write(':epoch', epoch);
  }

  private write(suffix: string, value: string): void {
    if (!this.persist || this.key === null) return;
    try {
      const done = this.storage.set(`${this.key}${suffix}`, value);
      if (done && typeof done.catch === 'function') done.catch(() => undefined);
    } catch {
      // A full or disabled storage only costs a longer replay after a reload.
    }
  }
}
