export { Herald } from './herald.js';
export type { Inbox } from './inbox.js';
export { HeraldError } from './errors.js';
export { backoffCeiling, backoffDelay, closeAction, type Backoff, type CloseAction } from './backoff.js';
export type { BackoffOptions, ConnectionState, HeraldEvents, HeraldOptions, InboxPage, InboxQuery, Notification, ReadEvent, ReadMark, SeqStorage, Truncation, UnreadCounts, WebSocketConstructor, } from './types.js';
