import type { SeqStorage } from './types.js';
export declare function seqKey(server: string, sub: string): string;
/** `localStorage` when the page can use it, else memory. */
export declare function defaultStorage(): SeqStorage;
export declare function memoryStorage(): SeqStorage;
/**
 * The last seq this client has seen. Only the tab that holds the connection
 * writes it to storage (`persist`), so a follower tab replaying an older relay
 * can never move the stored value back.
 */
export declare class SeqCursor {
    private readonly storage;
    private current;
    persist: boolean;
    private key;
    constructor(storage: SeqStorage);
    get value(): number | null;
    /** Names the user's entry and takes the stored seq when it is newer than the one in memory. */
    load(key: string): Promise<void>;
    /** Sets the seq (also lower: the server's `last_seq` wins when it is below ours). */
    set(seq: number): void;
}
