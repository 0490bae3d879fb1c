import type { SeqStorage } from './types.js';
export declare function seqKey(server: string, sub: string): string;
/** `localStorage` when the page can use it, else memory. */
export declare function defaultStorage(): SeqStorage;
export declare function memoryStorage(): SeqStorage;
/**
 * The last seq this client has seen, and the store epoch it belongs to (the
 * welcome's `epoch`, kept under `<key>:epoch`). Only the tab that holds the
 * connection writes them to storage (`persist`), so a follower tab replaying
 * an older relay can never move the stored value back.
 */
export declare class SeqCursor {
    private readonly storage;
    private current;
    private currentEpoch;
    persist: boolean;
    private key;
    constructor(storage: SeqStorage);
    get value(): number | null;
    /** The store epoch the seq belongs to, once a server has said. */
    get epoch(): string | null;
    /** Names the user's entry and takes the stored seq when it is newer than the one in memory. */
    load(key: string): Promise<void>;
    /** Sets the seq (also lower: the server's `last_seq` wins when it is below ours). */
    set(seq: number): void;
    /** Sets the store epoch (from a welcome). */
    setEpoch(epoch: string): void;
    private write;
}
