// The SDK in Node, without a browser: backoff bounds, the close-code policy,
// and a Herald driven through a scripted WebSocket — duplicates dropped, resume
// with `since`, the seq kept per server and user, in-band refresh, 4003.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { backoffCeiling, backoffDelay, closeAction, Herald } from '../dist/herald.js';

test('backoff ceilings double from base up to cap', () => {
  const b = { baseMs: 100, capMs: 1000 };
  assert.deepEqual([0, 1, 2, 3, 4, 5, 60].map((n) => backoffCeiling(n, b)), [100, 200, 400, 800, 1000, 1000, 1000]);
});

test('full jitter: every delay within [0, ceiling], and the whole range used', () => {
  const b = { baseMs: 100, capMs: 30_000 };
  assert.equal(backoffDelay(3, b, () => 0), 0);
  assert.equal(backoffDelay(3, b, () => 0.999999), 800);
  assert.equal(backoffDelay(20, b, () => 0.999999), 30_000);
  const delays = Array.from({ length: 500 }, () => backoffDelay(3, b));
  assert.ok(delays.every((d) => Number.isInteger(d) && d >= 0 && d <= 800), 'bounds');
  assert.ok(delays.some((d) => d < 400) && delays.some((d) => d >= 400), 'both halves');
});

test('close codes: 4003 stops, 4001 new token, 1001 prompt, the rest back off', () => {
  assert.deepEqual(closeAction(4003), { kind: 'stop', error: 'forbidden' });
  assert.deepEqual(closeAction(4001), { kind: 'new-token' });
  assert.deepEqual(closeAction(1001), { kind: 'prompt' });
  for (const code of [1006, 1011, 1013, 4029, 1000, 4999]) assert.equal(closeAction(code).kind, 'backoff', `${code}`);
  assert.deepEqual(closeAction(1008), { kind: 'backoff', error: 'policy_violation' });
  assert.deepEqual(closeAction(1002), { kind: 'backoff', error: 'protocol_error' });
  assert.deepEqual(closeAction(1007), { kind: 'backoff', error: 'invalid_data' });
});

// ------------------------------------------------------------------ a scripted WebSocket

/** Each `new FakeSocket` lands in `sockets`; the test plays the server. */
function fakeSockets() {
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.sent = [];
      this.closed = null;
      sockets.push(this);
    }
    send(data) {
      this.sent.push(JSON.parse(data));
    }
    close(code, reason) {
      this.closed = { code, reason };
    }
    // The server's side.
    frame(f) {
      this.onmessage?.({ data: JSON.stringify(f) });
    }
    welcome(lastSeq, extra = {}) {
      this.frame({ type: 'welcome', session_id: 's', user_id: 'alice', node_id: 'n', last_seq: lastSeq,
        heartbeat_secs: 25, token_expires_at: 0, ...extra });
    }
    notify(seq) {
      this.frame({ type: 'notification', seq, id: `n${seq}`, topic: 't', payload: {}, created_at: '', read: false });
    }
    end(code, reason = '') {
      this.onclose?.({ code, reason });
    }
  }
  return { sockets, FakeSocket };
}

/** An unsigned token with `sub` and `exp` (the SDK reads claims, it never verifies). */
function jwt(sub, ttl = 3600) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${part({ alg: 'HS256' })}.${part({ sub, exp: Math.floor(Date.now() / 1000) + ttl })}.sig`;
}

function memory() {
  const map = new Map();
  return { map, get: (k) => map.get(k) ?? null, set: (k, v) => void map.set(k, v) };
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

async function until(check, what) {
  for (let i = 0; i < 200; i += 1) {
    if (check()) return;
    await tick(5);
  }
  assert.fail(what);
}

function client({ storage = memory(), token = () => jwt('alice'), ...rest } = {}) {
  const { sockets, FakeSocket } = fakeSockets();
  const herald = new Herald({
    url: 'https://herald.example/base/',
    token,
    storage,
    WebSocket: FakeSocket,
    fetch: async () => new Response('{}', { status: 200 }),
    backoff: { baseMs: 1, capMs: 5 },
    shareTabs: false,
    ...rest,
  });
  const events = { seqs: [], states: [], errors: [], truncated: [] };
  herald.on('notification', (n) => events.seqs.push(n.seq));
  herald.on('state', (s) => events.states.push(s));
  herald.on('error', (e) => events.errors.push(e.code));
  herald.on('truncated', (t) => events.truncated.push(t));
  return { herald, sockets, events, storage };
}

test('drops duplicates, resumes with since after a drop, and keeps the seq per server and user', async () => {
  let calls = 0;
  const { herald, sockets, events, storage } = client({
    token: () => {
      calls += 1;
      return jwt('alice');
    },
  });
  const opened = herald.connect();
  await until(() => sockets.length === 1, 'a socket');
  const [first] = sockets;
  assert.equal(first.url, 'wss://herald.example/base/v1/ws', 'no since on a first connect');
  assert.equal(first.protocols[0], 'herald.v1');
  assert.match(first.protocols[1], /^herald\.bearer\.ey/);
  first.welcome(0);
  await opened;
  for (const seq of [1, 2, 2, 1, 3, 3]) first.notify(seq);
  assert.deepEqual(events.seqs, [1, 2, 3]);
  assert.equal(herald.lastSeq, 3);
  assert.equal(storage.map.get('herald:seq:https://herald.example/base:alice'), '3');

  first.end(1013, 'overloaded');
  assert.equal(herald.state, 'reconnecting');
  await until(() => sockets.length === 2, 'a reconnect');
  assert.equal(new URL(sockets[1].url).searchParams.get('since'), '3');
  assert.equal(calls, 2, 'the provider is asked on every connect');
  sockets[1].welcome(5);
  for (const seq of [3, 4, 5, 4]) sockets[1].notify(seq);
  assert.deepEqual(events.seqs, [1, 2, 3, 4, 5]);
  assert.deepEqual(events.states, ['connecting', 'open', 'reconnecting', 'open']);
  herald.close();
  assert.equal(herald.state, 'closed');
  assert.deepEqual(sockets[1].closed, { code: 1000, reason: 'client closed' });
});

test('a stored seq is resumed; a welcome below it (another database) moves the seq back', async () => {
  const storage = memory();
  storage.set('herald:seq:https://herald.example/base:alice', '40');
  const { herald, sockets, events } = client({ storage });
  herald.connect();
  await until(() => sockets.length === 1, 'a socket');
  assert.equal(new URL(sockets[0].url).searchParams.get('since'), '40');
  sockets[0].welcome(2);
  assert.equal(herald.lastSeq, 2);
  sockets[0].notify(3);
  assert.deepEqual(events.seqs, [3], 'seq 3 is new on this server');
  herald.close();
});

test('the store epoch is kept with the seq and sent back; a welcome resuming below our seq moves it back', async () => {
  const storage = memory();
  const key = 'herald:seq:https://herald.example/base:alice';
  storage.set(key, '8');
  storage.set(`${key}:epoch`, 'e0');
  const { herald, sockets, events } = client({ storage });
  herald.connect();
  await until(() => sockets.length === 1, 'a socket');
  const asked = new URL(sockets[0].url).searchParams;
  assert.deepEqual([asked.get('since'), asked.get('epoch')], ['8', 'e0']);
  // The store was restored from a backup taken at seq 5: the server resumes
  // after 5, and seqs 6.. are new notifications, though we saw seqs 6..8 before.
  sockets[0].welcome(7, { epoch: 'e1', since: 5 });
  assert.equal(herald.lastSeq, 5);
  for (const seq of [6, 7]) sockets[0].notify(seq);
  assert.deepEqual(events.seqs, [6, 7]);
  assert.deepEqual([storage.map.get(key), storage.map.get(`${key}:epoch`)], ['7', 'e1']);
  sockets[0].end(1013, 'overloaded');
  await until(() => sockets.length === 2, 'a reconnect');
  const again = new URL(sockets[1].url).searchParams;
  assert.deepEqual([again.get('since'), again.get('epoch')], ['7', 'e1']);
  sockets[1].welcome(7, { epoch: 'e1', since: 7 });
  assert.equal(herald.lastSeq, 7, 'a welcome at our seq changes nothing');
  herald.close();
});

test('truncation is reported; the token can travel in the query', async () => {
  const storage = memory();
  storage.set('herald:seq:https://herald.example/base:alice', '4');
  const { herald, sockets, events } = client({ storage, tokenTransport: 'query' });
  herald.connect();
  await until(() => sockets.length === 1, 'a socket');
  assert.deepEqual(sockets[0].protocols, ['herald.v1']);
  assert.match(new URL(sockets[0].url).searchParams.get('access_token'), /^ey/);
  sockets[0].welcome(20, { truncated: true, oldest_seq: 9 });
  sockets[0].notify(9);
  assert.deepEqual(events.truncated, [{ since: 4, oldest_seq: 9 }]);
  assert.deepEqual(events.seqs, [9]);
  herald.close();
});

test('token_expiring is answered with a refresh frame on the same socket', async () => {
  let calls = 0;
  const { herald, sockets, events } = client({
    token: () => {
      calls += 1;
      return jwt('alice', calls === 1 ? 30 : 3600);
    },
  });
  herald.connect();
  await until(() => sockets.length === 1, 'a socket');
  sockets[0].welcome(0);
  sockets[0].frame({ type: 'token_expiring', expires_at: 0 });
  await until(() => sockets[0].sent.some((f) => f.type === 'refresh'), 'a refresh frame');
  const refresh = sockets[0].sent.find((f) => f.type === 'refresh');
  assert.equal(calls, 2);
  assert.equal(typeof refresh.ref, 'number');
  sockets[0].frame({ type: 'ok', ref: refresh.ref });
  await tick(20);
  assert.equal(sockets.length, 1, 'no reconnect');
  assert.deepEqual(events.states, ['connecting', 'open']);
  herald.close();
});

test('4003 stops for good with an error; 4001 reconnects at once with a new token', async () => {
  let calls = 0;
  const { herald, sockets, events } = client({
    token: () => {
      calls += 1;
      return jwt('alice');
    },
  });
  herald.connect();
  await until(() => sockets.length === 1, 'a socket');
  sockets[0].welcome(0);
  sockets[0].end(4001, 'token expired');
  await until(() => sockets.length === 2, 'a reconnect after 4001');
  assert.equal(calls, 2);
  sockets[1].welcome(0);
  sockets[1].end(4003, 'forbidden');
  await tick(50);
  assert.equal(sockets.length, 2, 'no retry after 4003');
  assert.equal(herald.state, 'closed');
  assert.deepEqual(events.errors, ['forbidden']);
  assert.deepEqual(events.states, ['connecting', 'open', 'reconnecting', 'open', 'closed']);
});

test('markRead goes over the socket when open, else over HTTP with the bearer token', async () => {
  const requests = [];
  const { herald, sockets } = client({
    fetch: async (url, init) => {
      requests.push({ url, init });
      return new Response(null, { status: 204 });
    },
  });
  await herald.markRead({ up_to_seq: 3 }); // not connected: HTTP
  assert.equal(requests.length, 1);
  assert.equal(requests[0].url, 'https://herald.example/base/v1/me/notifications/read');
  assert.match(requests[0].init.headers.Authorization, /^Bearer ey/);
  assert.equal(requests[0].init.body, '{"up_to_seq":3}');

  herald.connect();
  await until(() => sockets.length === 1, 'a socket');
  sockets[0].welcome(0);
  const marking = herald.markRead({ seqs: [1, 2] });
  const frame = sockets[0].sent.find((f) => f.type === 'read');
  assert.deepEqual(frame, { type: 'read', seqs: [1, 2], ref: frame.ref });
  sockets[0].frame({ type: 'ok', ref: frame.ref });
  await marking;
  assert.equal(requests.length, 1, 'no HTTP while the socket is open');
  await assert.rejects(herald.markRead({ seqs: [] }), { code: 'invalid_argument' });

  // By topic, with and without a bound; bad topics never leave the client.
  const byTopic = herald.markRead({ topic: 'orders' });
  const topicFrame = sockets[0].sent.filter((f) => f.type === 'read').at(-1);
  assert.deepEqual(topicFrame, { type: 'read', topic: 'orders', ref: topicFrame.ref });
  sockets[0].frame({ type: 'ok', ref: topicFrame.ref });
  await byTopic;
  const bounded = herald.markRead({ topic: 'orders', up_to_seq: 7 });
  const boundedFrame = sockets[0].sent.filter((f) => f.type === 'read').at(-1);
  assert.deepEqual(boundedFrame, { type: 'read', topic: 'orders', up_to_seq: 7, ref: boundedFrame.ref });
  sockets[0].frame({ type: 'ok', ref: boundedFrame.ref });
  await bounded;
  for (const bad of [{ topic: '' }, { topic: 'x'.repeat(129) }, { topic: 'a\u0007b' }, { topic: 5 },
    { topic: 'orders', seqs: [1] }, { topic: 'orders', up_to_seq: 0 }]) {
    await assert.rejects(herald.markRead(bad), { code: 'invalid_argument' }, JSON.stringify(bad));
  }
  assert.equal(requests.length, 1, 'no HTTP while the socket is open');
  herald.close();
});

test('inbox errors carry the server code and status', async () => {
  const { herald } = client({
    fetch: async () =>
      new Response('{"error":{"code":"invalid_token","message":"bad signature"}}', { status: 401 }),
  });
  await assert.rejects(herald.inbox.unread(), (e) => e.code === 'invalid_token' && e.status === 401);
});

test("inbox errors carry the server's Retry-After, in seconds", async () => {
  const { herald } = client({
    fetch: async () =>
      new Response('{"error":{"code":"store_unavailable","message":"retry"}}', {
        status: 503,
        headers: { 'retry-after': '1' },
      }),
  });
  await assert.rejects(herald.inbox.unread(), (e) => e.code === 'store_unavailable' && e.retryAfter === 1);
  const { herald: other } = client({
    fetch: async () => new Response('{"error":{"code":"invalid_token","message":"no"}}', { status: 401 }),
  });
  await assert.rejects(other.inbox.unread(), (e) => e.status === 401 && e.retryAfter === undefined);
});

test('an inbox call refused as token_revoked asks the provider for a new token once', async () => {
  const tokens = [jwt('alice'), jwt('alice', 7200)];
  let asked = 0;
  const sent = [];
  const { herald } = client({
    token: () => tokens[Math.min(asked++, 1)],
    fetch: async (_url, init) => {
      sent.push(init.headers.Authorization);
      return sent.length === 1
        ? new Response('{"error":{"code":"token_revoked","message":"the token was revoked"}}', { status: 401 })
        : new Response('{"total":0,"by_topic":{}}', { status: 200 });
    },
  });
  assert.deepEqual(await herald.inbox.unread(), { total: 0, by_topic: {} });
  assert.equal(sent.length, 2, 'one retry');
  assert.equal(asked, 2, 'with a token asked for again');
});
