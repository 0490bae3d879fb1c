// When to reconnect, decided by how the connection ended (spec §2, "Liveness
// and close codes").
//
// Delays use "full jitter": attempt n waits a uniformly random time in
// [0, min(cap, base · 2^n)], so a crowd of clients dropped at once spreads its
// reconnects instead of arriving together.

import type { BackoffOptions } from './types.js';

export const DEFAULT_BACKOFF = { baseMs: 500, capMs: 30_000 } as const;

export interface Backoff {
  baseMs: number;
  capMs: number;
}

export function resolveBackoff(options: BackoffOptions = {}): Backoff {
  const baseMs = positive(options.baseMs, DEFAULT_BACKOFF.baseMs);
  const capMs = Math.max(baseMs, positive(options.capMs, DEFAULT_BACKOFF.capMs));
  return { baseMs, capMs };
}

function positive(value: number | undefined, fallback: number): number {
  return typeof value === 'number' && Number.isFinite(value) && value >= 0 ? value : fallback;
}

/** The longest wait of attempt `attempt` (0-based): `min(cap, base · 2^attempt)`. */
export function backoffCeiling(attempt: number, backoff: Backoff): number {
  return Math.min(backoff.capMs, backoff.baseMs * 2 ** Math.min(Math.max(attempt, 0), 30));
}

/** A full-jitter wait for attempt `attempt`, in ms: uniform in `[0, backoffCeiling(attempt)]`. */
export function backoffDelay(attempt: number, backoff: Backoff, random: () => number = Math.random): number {
  return Math.floor(random() * (backoffCeiling(attempt, backoff) + 1));
}

/** What to do after a connection ended with `code`. */
export type CloseAction =
  /** Stop for good and report (4003). */
  | { kind: 'stop'; error: string }
  /** Ask the provider for a new token, then reconnect at once (4001). */
  | { kind: 'new-token' }
  /** Reconnect promptly with a small jitter (1001: this node is going away). */
  | { kind: 'prompt' }
  /** Reconnect after the backoff; `error` is reported first when set. */
  | { kind: 'backoff'; error?: string };

export function closeAction(code: number): CloseAction {
  switch (code) {
    case 4003:
      return { kind: 'stop', error: 'forbidden' };
    case 4001:
      return { kind: 'new-token' };
    case 1001:
      return { kind: 'prompt' };
    case 1008:
      return { kind: 'backoff', error: 'policy_violation' };
    case 1009:
      return { kind: 'backoff', error: 'frame_too_large' };
    case 1002:
      return { kind: 'backoff', error: 'protocol_error' };
    case 1007:
      return { kind: 'backoff', error: 'invalid_data' };
    default:
      // 1013 (overloaded, or this session fell behind), 1011, 4029, 1006
      // (dropped or refused at the handshake), anything unknown.
      return { kind: 'backoff' };
  }
}
