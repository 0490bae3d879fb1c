import type { BackoffOptions } from './types.js';
export declare const DEFAULT_BACKOFF: {
    readonly baseMs: 500;
    readonly capMs: 30000;
};
export interface Backoff {
    baseMs: number;
    capMs: number;
}
export declare function resolveBackoff(options?: BackoffOptions): Backoff;
/** The longest wait of attempt `attempt` (0-based): `min(cap, base · 2^attempt)`. */
export declare function backoffCeiling(attempt: number, backoff: Backoff): number;
/** A full-jitter wait for attempt `attempt`, in ms: uniform in `[0, backoffCeiling(attempt)]`. */
export declare function backoffDelay(attempt: number, backoff: Backoff, random?: () => number): number;
/** What to do after a connection ended with `code`. */
export type CloseAction = 
/** Stop for good and report (4003). */
{
    kind: 'stop';
    error: string;
}
/** Ask the provider for a new token, then reconnect at once (4001). */
 | {
    kind: 'new-token';
}
/** Reconnect promptly with a small jitter (1001: this node is going away). */
 | {
    kind: 'prompt';
}
/** Reconnect after the backoff; `error` is reported first when set. */
 | {
    kind: 'backoff';
    error?: string;
};
export declare function closeAction(code: number): CloseAction;
