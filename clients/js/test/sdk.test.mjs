// The SDK in headless Chromium against a real herald over wss: resume across a
// server restart and across a restore from a backup, in-band token refresh,
// read marks across devices, one connection shared by the tabs of an origin,
// and what each close code does.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';

import { launchBrowser, newContext, publish, startHerald } from './harness.mjs';

const WAIT = 15_000;
/** Small reconnect delays, so the tests do not wait on the defaults. */
const FAST = { backoff: { baseMs: 100, capMs: 400 } };
let server;
let browser;

before(async () => {
  server = await startHerald();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.dispose();
});

/**
 * A page on the server's origin (or on `origin`, an app's) running the SDK
 * from /sdk/herald.js as `window.herald`, with everything it reports in
 * `window.log`. `token` is the provider, run in the test (so tests can count
 * calls and change tokens).
 */
async function openClient(context, { token, options = {}, connect = true, srv = server, origin = srv.url }) {
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(e.message));
  page.problems = problems;
  await page.exposeFunction('testToken', token);
  await page.goto(`${origin}/healthz`);
  await page.evaluate(
    async ({ options, connect, url }) => {
      const { Herald } = await import('/sdk/herald.js');
      const log = { states: [], seqs: [], notifications: [], reads: [], errors: [], truncated: [] };
      window.log = log;
      const herald = new Herald({ url, token: () => window.testToken(), ...options });
      window.herald = herald;
      herald.on('state', (s) => log.states.push(s));
      herald.on('notification', (n) => {
        log.seqs.push(n.seq);
        log.notifications.push(n);
      });
      herald.on('read', (m) => log.reads.push(m));
      herald.on('error', (e) => log.errors.push({ code: e.code, closeCode: e.closeCode ?? null, message: e.message }));
      herald.on('truncated', (t) => log.truncated.push(t));
      if (connect) herald.connect().catch((e) => (log.connectError = e.code));
    },
    { options, connect, url: srv.url },
  );
  return page;
}

const log = (page) => page.evaluate(() => window.log);

async function waitOpen(page) {
  await page.waitForFunction(() => window.herald.state === 'open', null, { timeout: WAIT });
}

/** Waits until the page has seen `expected.length` notifications, then checks they are exactly `expected`. */
async function expectSeqs(page, expected) {
  try {
    await page.waitForFunction((n) => window.log.seqs.length >= n, expected.length, { timeout: WAIT });
  } catch {
    assert.fail(`expected seqs ${JSON.stringify(expected)}, got ${JSON.stringify((await log(page)).seqs)}`);
  }
  assert.deepEqual((await log(page)).seqs, expected);
}

async function eventually(check, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last === true) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`${what}: still ${JSON.stringify(last)} after ${timeout} ms`);
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
const opens = (l) => l.states.filter((s) => s === 'open').length;

test('resumes after a server restart: every seq once, in order; a reload resumes from storage', { timeout: 60_000 }, async () => {
  const user = 'rita';
  const context = await newContext(browser);
  const page = await openClient(context, { token: () => server.token(user), options: FAST });
  await waitOpen(page);
  for (const n of range(1, 3)) await publish(server, user, 't', { n });
  await expectSeqs(page, range(1, 3));

  // One publish races the shutdown; the node finishes what it accepted.
  const racing = publish(server, user, 't', { n: 4 });
  await racing;
  await server.stop();
  await page.waitForFunction(() => window.herald.state === 'reconnecting', null, { timeout: WAIT });
  await server.start();
  // Committed before the SDK is back: replayed after `since`.
  for (const n of range(5, 6)) await publish(server, user, 't', { n });
  await waitOpen(page);
  for (const n of range(7, 8)) await publish(server, user, 't', { n });
  await expectSeqs(page, range(1, 8));
  await page.waitForTimeout(300);
  const l = await log(page);
  assert.deepEqual(l.seqs, range(1, 8), 'nothing twice, nothing late');
  assert.equal(opens(l), 2, `states: ${l.states}`);
  assert.deepEqual(l.errors, []);

  // The seq is kept in localStorage: a new page of the same origin resumes
  // after it, with what was committed while no page was open.
  await page.close();
  for (const n of range(9, 10)) await publish(server, user, 't', { n });
  const again = await openClient(context, { token: () => server.token(user), options: FAST });
  await waitOpen(again);
  await expectSeqs(again, [9, 10]);
  assert.equal(await again.evaluate(() => window.herald.lastSeq), 10);
  assert.deepEqual(again.problems, []);
  await context.close();
});

test('after a restore from a backup, a reload resumes from the fork: the notifications stored under seqs it saw are new', { timeout: 60_000 }, async () => {
  const srv = await startHerald();
  const user = 'una';
  const context = await newContext(browser);
  const opts = { token: () => srv.token(user), options: FAST, srv };
  try {
    const page = await openClient(context, opts);
    await waitOpen(page);
    for (const n of range(1, 3)) await publish(srv, user, 't', { n });
    await expectSeqs(page, range(1, 3));
    const backup = path.join(srv.dir, 'backup.db');
    assert.match(srv.cli('backup', '--to', backup), /3 notifications of 1 users/);
    // Seen by the page, then lost in the restore.
    for (const n of range(4, 5)) await publish(srv, user, 't', { n: `lost-${n}` });
    await expectSeqs(page, range(1, 5));
    const stored = () => page.evaluate(() => Object.fromEntries(Object.entries(localStorage)));
    const before = await stored();
    const key = Object.keys(before).find((k) => k.startsWith('herald:seq:') && !k.endsWith(':epoch'));
    assert.equal(before[key], '5');
    assert.ok(before[`${key}:epoch`], `the epoch is kept with the seq: ${JSON.stringify(before)}`);
    await page.close();

    await srv.stop();
    assert.match(srv.cli('restore', '--from', backup), /store epoch now/);
    await srv.start();
    for (const n of range(4, 6)) await publish(srv, user, 't', { n: `new-${n}` });
    const again = await openClient(context, opts);
    await waitOpen(again);
    await expectSeqs(again, range(4, 6));
    const l = await log(again);
    assert.deepEqual(l.notifications.map((n) => n.payload.n), ['new-4', 'new-5', 'new-6']);
    const after = await again.evaluate(() => Object.fromEntries(Object.entries(localStorage)));
    assert.equal(after[key], '6');
    assert.notEqual(after[`${key}:epoch`], before[`${key}:epoch`], 'the new epoch is kept');
    assert.deepEqual(l.errors, []);
  } finally {
    await context.close();
    await srv.dispose();
  }
});

test('a token about to expire is refreshed in-band: same socket, still delivering after the old exp', { timeout: 60_000 }, async () => {
  const user = 'tom';
  const firstExp = Math.floor(Date.now() / 1000) + 5;
  let calls = 0;
  const token = () => {
    calls += 1;
    // The first token has 5 s left, so the server warns at once (it warns 60 s ahead).
    return calls === 1 ? server.token(user, firstExp - Math.floor(Date.now() / 1000)) : server.token(user, 3600);
  };
  const context = await newContext(browser);
  const sockets = [];
  context.on('page', (p) => p.on('websocket', (ws) => sockets.push(ws.url())));
  const page = await openClient(context, { token, options: FAST });
  page.on('websocket', (ws) => sockets.push(ws.url()));
  await waitOpen(page);
  await publish(server, user, 't', { n: 1 });
  await expectSeqs(page, [1]);
  await eventually(() => calls === 2 || calls, 'token provider calls (connect + refresh)');

  // Past the first token's exp: without the refresh the server would have closed with 4001.
  while (Date.now() < (firstExp + 1.5) * 1000) await page.waitForTimeout(250);
  await publish(server, user, 't', { n: 2 });
  await expectSeqs(page, [1, 2]);
  const l = await log(page);
  assert.equal(opens(l), 1, `one open, no reconnect: ${l.states}`);
  assert.ok(!l.states.includes('reconnecting'), `${l.states}`);
  assert.equal(new Set(sockets).size, 1, 'one WebSocket');
  assert.equal(calls, 2);
  assert.equal(await server.presence(user), 1);
  assert.deepEqual(l.errors, []);
  await context.close();
});

test('a refused refresh (4001) gets a new token from the provider and reconnects, resuming', { timeout: 60_000 }, async () => {
  const user = 'uma';
  let calls = 0;
  const token = () => {
    calls += 1;
    if (calls === 1) return server.token(user, 5); // warned at once
    if (calls === 2) return server.token('mallory', 3600); // another sub: the server closes with 4001
    return server.token(user, 3600);
  };
  const context = await newContext(browser);
  const page = await openClient(context, { token, options: FAST });
  await page.waitForFunction(() => window.log.states.filter((s) => s === 'open').length === 2, null, {
    timeout: WAIT,
  });
  assert.equal(calls, 3);
  await publish(server, user, 't', { n: 1 });
  await expectSeqs(page, [1]);
  const l = await log(page);
  assert.deepEqual(l.states, ['connecting', 'open', 'reconnecting', 'open']);
  assert.deepEqual(l.errors, []);
  await context.close();
});

test('revoked tokens (sign-out everywhere): 4001, a new token from the provider resumes; without one the refusal is reported', { timeout: 60_000 }, async () => {
  const user = 'vic';
  const early = Math.floor(Date.now() / 1000) - 100;
  let revokedBefore = null;
  // Until the revocation, a token issued 100 s ago; then one issued at the revocation's time.
  const token = () => server.token(user, 3600, { iat: revokedBefore ?? early });
  const context = await newContext(browser);
  const page = await openClient(context, { token, options: FAST });
  await waitOpen(page);
  await publish(server, user, 't', { n: 1 });
  await expectSeqs(page, [1]);

  // A second device whose app keeps handing out the old token (the user is signed out there).
  const stale = server.token(user, 3600, { iat: early });
  const other = await newContext(browser);
  const signedOut = await openClient(other, { token: () => stale, options: FAST });
  await waitOpen(signedOut);

  const { status, body } = await server.request('POST', `/v1/users/${user}/tokens/revoke`, { body: {} });
  assert.equal(status, 200, JSON.stringify(body));
  revokedBefore = body.issued_before;
  await page.waitForFunction(() => window.log.states.filter((s) => s === 'open').length === 2, null, {
    timeout: WAIT,
  });
  await publish(server, user, 't', { n: 2 });
  await expectSeqs(page, [1, 2]);
  const l = await log(page);
  assert.deepEqual(l.states, ['connecting', 'open', 'reconnecting', 'open']);
  assert.deepEqual(l.errors, []);

  await eventually(
    async () => (await log(signedOut)).errors.some((e) => e.code === 'token_revoked') || (await log(signedOut)).errors,
    'the signed-out device reports token_revoked',
  );
  assert.notEqual(await signedOut.evaluate(() => window.herald.state), 'open');
  await context.close();
  await other.close();
});

test('a backend lists the browser sessions with their User-Agent and closes one alone: 4003 stops it, the other carries on', { timeout: 60_000 }, async () => {
  const user = 'lis';
  const phone = await newContext(browser);
  const first = await openClient(phone, { token: () => server.token(user, 3600, { jti: 'phone-1' }), options: FAST });
  await waitOpen(first);
  const laptop = await newContext(browser);
  const second = await openClient(laptop, { token: () => server.token(user, 3600, { jti: 'laptop-1' }), options: FAST });
  await waitOpen(second);

  const listing = async () => {
    const { status, body } = await server.request('GET', `/v1/users/${user}/sessions`);
    assert.equal(status, 200, JSON.stringify(body));
    return body;
  };
  const listed = await listing();
  assert.equal(listed.count, 2, JSON.stringify(listed));
  // Each page knows its own session's id, so a "your devices" page can mark it.
  assert.equal(await first.evaluate(() => window.herald.sessionId), listed.sessions[0].session_id);
  assert.equal(await second.evaluate(() => window.herald.sessionId), listed.sessions[1].session_id);
  const agent = await first.evaluate(() => navigator.userAgent);
  for (const session of listed.sessions) {
    assert.equal(session.user_agent, agent, 'the browser\'s own User-Agent');
    assert.equal(session.ip, '127.0.0.1');
  }
  // Oldest first: the first device's session is the first listed.
  assert.deepEqual(listed.sessions.map((s) => s.jti), ['phone-1', 'laptop-1']);
  const { status } = await server.request('DELETE', `/v1/users/${user}/sessions/${listed.sessions[0].session_id}`);
  assert.equal(status, 204);
  await first.waitForFunction(() => window.herald.state === 'closed', null, { timeout: WAIT });
  assert.deepEqual((await log(first)).errors.map((e) => e.closeCode), [4003]);
  assert.equal(await first.evaluate(() => window.herald.sessionId), null, 'no session once closed');
  await publish(server, user, 't', { n: 1 });
  await expectSeqs(second, [1]);
  assert.equal(await second.evaluate(() => window.herald.state), 'open');
  assert.deepEqual((await log(second)).errors, []);
  await eventually(async () => (await listing()).count === 1, 'the closed session leaves the listing');
  assert.equal((await listing()).sessions[0].session_id, listed.sessions[1].session_id);
  await phone.close();
  await laptop.close();
});

test('marking read on one device updates the other live; HTTP and socket marks both travel', { timeout: 60_000 }, async () => {
  const user = 'rob';
  const phone = await newContext(browser);
  const laptop = await newContext(browser);
  const a = await openClient(phone, { token: () => server.token(user) });
  const b = await openClient(laptop, { token: () => server.token(user) });
  await waitOpen(a);
  await waitOpen(b);
  for (const n of range(1, 3)) await publish(server, user, 't', { n });
  await expectSeqs(a, range(1, 3));
  await expectSeqs(b, range(1, 3));

  // Over a's socket: b hears it.
  await a.evaluate(() => window.herald.markRead({ seqs: [2] }));
  await b.waitForFunction(() => window.log.reads.length >= 1, null, { timeout: WAIT });
  assert.deepEqual((await log(b)).reads, [{ seqs: [2] }]);
  assert.equal(await b.evaluate(async () => (await window.herald.inbox.unread()).total), 2);

  // Over HTTP from b: a hears it.
  await b.evaluate(() => window.herald.inbox.markRead({ up_to_seq: 3 }));
  await a.waitForFunction(() => window.log.reads.some((m) => m.up_to_seq === 3), null, { timeout: WAIT });
  const page = await a.evaluate(() => window.herald.inbox.list({ limit: 10 }));
  assert.deepEqual(
    page.notifications.map((n) => [n.seq, n.read]),
    [
      [3, true],
      [2, true],
      [1, true],
    ],
  );
  assert.equal(page.last_seq, 3);
  const older = await a.evaluate(() => window.herald.inbox.list({ before_seq: 3, limit: 1 }));
  assert.deepEqual(older.notifications.map((n) => n.seq), [2]);
  assert.equal(await a.evaluate(async () => (await window.herald.inbox.unread()).total), 0);
  assert.equal(await server.presence(user), 2, 'two devices, two sessions');
  await phone.close();
  await laptop.close();
});

test('an app on another origin uses the socket and the inbox API (CORS)', { timeout: 30_000 }, async () => {
  const user = 'cora';
  const context = await newContext(browser);
  // The same server under another name: another origin for the browser.
  const app = `https://localhost:${server.port}`;
  const page = await openClient(context, { token: () => server.token(user), origin: app });
  assert.equal(await page.evaluate(() => location.origin), app);
  assert.notEqual(app, server.url);
  await waitOpen(page);
  for (const n of range(1, 2)) await publish(server, user, 't', { n });
  await expectSeqs(page, range(1, 2));
  assert.equal(await page.evaluate(async () => (await window.herald.inbox.unread()).total), 2);
  await page.evaluate(() => window.herald.inbox.markRead({ up_to_seq: 1 }));
  const list = await page.evaluate(() => window.herald.inbox.list({ limit: 10 }));
  assert.deepEqual(
    list.notifications.map((n) => [n.seq, n.read]),
    [
      [2, false],
      [1, true],
    ],
  );
  assert.deepEqual(page.problems, []);
  await context.close();
});

test('five tabs share one session; when the leader tab closes another takes over and nothing is lost', { timeout: 60_000 }, async () => {
  const user = 'tess';
  const context = await newContext(browser);
  const sockets = [];
  const tabs = [];
  for (let i = 0; i < 5; i += 1) {
    const tab = await openClient(context, { token: () => server.token(user), options: FAST });
    tab.on('websocket', (ws) => sockets.push(ws.url()));
    tabs.push(tab);
  }
  for (const tab of tabs) await waitOpen(tab);
  await eventually(async () => (await server.presence(user)) === 1 || server.presence(user), 'sessions');
  const leaders = async (pages) => {
    const flags = await Promise.all(pages.map((p) => p.evaluate(() => window.herald.isLeader)));
    return pages.filter((_, i) => flags[i]);
  };
  const [leader, ...others] = await leaders(tabs);
  assert.equal(others.length, 0, 'one leader');

  for (const n of range(1, 2)) await publish(server, user, 't', { n });
  for (const tab of tabs) await expectSeqs(tab, [1, 2]);

  // A follower's markRead goes through the leader's socket; every tab hears the read.
  const follower = tabs.find((t) => t !== leader);
  await follower.evaluate(() => window.herald.markRead({ seqs: [1] }));
  for (const tab of tabs) {
    await tab.waitForFunction(() => window.log.reads.length === 1, null, { timeout: WAIT });
    assert.deepEqual((await log(tab)).reads, [{ seqs: [1] }]);
  }
  assert.equal(await follower.evaluate(async () => (await window.herald.inbox.unread()).total), 1);
  assert.equal(sockets.length, 1, `one WebSocket for five tabs: ${sockets}`);
  assert.equal(await server.presence(user), 1);
  // Every tab knows the one session's id, as the server lists it.
  const { body: listed } = await server.request('GET', `/v1/users/${user}/sessions`);
  const ids = await Promise.all(tabs.map((t) => t.evaluate(() => window.herald.sessionId)));
  assert.deepEqual(ids, tabs.map(() => listed.sessions[0].session_id));

  // The leader tab goes away; one published at once, one after the take-over.
  await leader.close();
  const rest = tabs.filter((t) => t !== leader);
  await publish(server, user, 't', { n: 3 });
  await eventually(async () => (await leaders(rest)).length === 1, 'a new leader');
  for (const tab of rest) await waitOpen(tab);
  await publish(server, user, 't', { n: 4 });
  for (const tab of rest) await expectSeqs(tab, range(1, 4));
  await eventually(async () => (await server.presence(user)) === 1 || server.presence(user), 'sessions after take-over');
  // The new leader's session is a new one, and every tab follows it.
  const after = await Promise.all(rest.map((t) => t.evaluate(() => window.herald.sessionId)));
  assert.equal(new Set(after).size, 1, `one id: ${after}`);
  assert.ok(after[0] && after[0] !== listed.sessions[0].session_id, 'a new session');
  assert.equal(sockets.length, 2, 'the new leader opened the only other socket');
  await rest[0].waitForTimeout(300);
  for (const tab of rest) {
    assert.deepEqual((await log(tab)).seqs, range(1, 4), 'nothing twice');
    assert.deepEqual(tab.problems, []);
  }
  await context.close();
});

test('the token goes in the subprotocol by default, in the query only when asked', { timeout: 30_000 }, async () => {
  const user = 'quinn';
  const context = await newContext(browser);
  const urls = [];
  context.on('page', (p) => p.on('websocket', (ws) => urls.push(ws.url())));
  const a = await openClient(context, { token: () => server.token(user), options: { shareTabs: false } });
  await waitOpen(a);
  const b = await openClient(context, {
    token: () => server.token(user),
    options: { shareTabs: false, tokenTransport: 'query' },
  });
  await waitOpen(b);
  assert.equal(urls.length, 2, `${urls}`);
  assert.ok(!urls[0].includes('access_token'), urls[0]);
  assert.match(urls[0], /^wss:\/\/127\.0\.0\.1:\d+\/v1\/ws$/);
  assert.match(urls[1], /[?&]access_token=ey/);
  await publish(server, user, 't', {});
  await expectSeqs(a, [1]);
  await expectSeqs(b, [1]);
  await context.close();
});

test('close codes against a scripted server: 1013 resumes with since, duplicates dropped, truncation reported, 4003 stops', { timeout: 30_000 }, async () => {
  const context = await newContext(browser);
  const connections = [];
  const frame = (seq) => JSON.stringify({
    type: 'notification', seq, id: `id-${seq}`, topic: 't', payload: { seq }, created_at: new Date().toISOString(), read: false,
  });
  const welcome = (extra) => JSON.stringify({
    type: 'welcome', session_id: `s${connections.length}`, user_id: 'sam', node_id: 'n', heartbeat_secs: 25,
    token_expires_at: Math.floor(Date.now() / 1000) + 3600, ...extra,
  });
  await context.routeWebSocket(/\/v1\/ws/, (ws) => {
    connections.push(ws.url());
    if (connections.length === 1) {
      ws.send(welcome({ last_seq: 0 }));
      for (const seq of [1, 2, 2, 1, 3]) ws.send(frame(seq));
      setTimeout(() => ws.close({ code: 1013, reason: 'session could not keep up; reconnect with since' }), 200);
    } else if (connections.length === 2) {
      ws.send(welcome({ last_seq: 9, truncated: true, oldest_seq: 6 }));
      for (const seq of [3, 6, 7, 6]) ws.send(frame(seq));
      setTimeout(() => ws.close({ code: 4003, reason: 'forbidden' }), 200);
    } else {
      ws.close({ code: 1011, reason: 'a third connection: the SDK retried after 4003' });
    }
  });
  const page = await openClient(context, { token: () => server.token('sam'), options: FAST });
  await page.waitForFunction(() => window.herald.state === 'closed', null, { timeout: WAIT });
  await page.waitForTimeout(1500); // several backoff periods: no retry may come
  const l = await log(page);
  assert.equal(connections.length, 2, `${connections}`);
  assert.ok(!new URL(connections[0]).searchParams.has('since'), connections[0]);
  assert.equal(new URL(connections[1]).searchParams.get('since'), '3');
  assert.deepEqual(l.seqs, [1, 2, 3, 6, 7]);
  assert.deepEqual(l.truncated, [{ since: 3, oldest_seq: 6 }]);
  assert.deepEqual(l.states, ['connecting', 'open', 'reconnecting', 'open', 'closed']);
  assert.deepEqual(l.errors.map((e) => [e.code, e.closeCode]), [['forbidden', 4003]]);
  await context.close();
});
