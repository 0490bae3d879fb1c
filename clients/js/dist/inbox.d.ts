import type { InboxPage, InboxQuery, ReadMark, UnreadCounts } from './types.js';
export declare class Inbox {
    private readonly base;
    private readonly tokens;
    private readonly fetchFn;
    /** `GET /v1/me/notifications`: newest first; page back with `before_seq`. */
    list(query?: InboxQuery): Promise<InboxPage>;
    /** `POST /v1/me/notifications/read`: every open session of the user gets a `read` event. */
    markRead(mark: ReadMark): Promise<void>;
    /** `GET /v1/me/unread`: `{ total, by_topic }`. */
    unread(): Promise<UnreadCounts>;
    /** One call; a refused cached token is replaced from the provider and the call tried once more. */
    private request;
    private send;
}
/** The JSON body of a read mark, checked: exactly one of `seqs` (1 to 1000 seqs ≥ 1) and `up_to_seq` (≥ 1). */
export declare function readBody(mark: ReadMark): ReadMark;
