// Compiled (not run) by test/dist.test.mjs: the shipped .d.ts files type an application using the SDK
// the way the README shows, and reject an unknown event name.
import { Herald, HeraldError, type Notification } from '../../dist/index.js';
const h = new Herald({ url: 'https://x', token: () => 't', backoff: { baseMs: 1 } });
const off: () => void = h.on('notification', (n: Notification) => console.log(n.seq, n.topic));
h.on('state', (s) => { const x: 'connecting' | 'open' | 'reconnecting' | 'closed' = s; void x; });
h.on('error', (e) => { const c: string = e.code; void c; void (e instanceof HeraldError); });
h.on('read', (m) => { if ('seqs' in m) m.seqs.map(Number); else m.up_to_seq.toFixed(); });
async function f() { await h.connect(); const p = await h.inbox.list({ limit: 2, before_seq: 3 }); p.notifications[0]?.seq; (await h.inbox.unread()).total; await h.markRead({ seqs: [1] }); await h.inbox.markRead({ up_to_seq: 1 }); await h.markRead({ topic: 'orders' }); await h.inbox.list({ topic: 'orders', unread: true }); }
void f; off();
// @ts-expect-error unknown event
h.on('nope', () => {});
