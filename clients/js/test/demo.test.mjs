// The /demo inbox in a real headless Chromium against a real herald in dev
// mode: live arrival, the dev-mode test publish, read marks across devices,
// "Mark all read", reload from the inbox API, paging, and the strict CSP
// (a violation would show up as a console error, which fails the test).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';

import { artifactsDir, launchBrowser, mintToken, newContext, publish, startHerald } from './harness.mjs';

const WAIT = 15_000;
let server;
let browser;
let token;

before(async () => {
  server = await startHerald({ devMode: true });
  // The dev banner's ready link carries a token for alice; mint one if the
  // banner ever stops printing it.
  token = server.banner.match(/#token=([\w.-]+)/)?.[1] ?? mintToken(server.jwtSecret, 'alice', 3600);
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

/** A page on /demo as alice, failing the test on any page error, console error or token in a URL. */
async function openDemo(context, { hash = `#token=${token}` } = {}) {
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => m.type() === 'error' && problems.push(`console error: ${m.text()}`));
  page.on('request', (r) => {
    if (new URL(r.url()).search.includes(token)) problems.push(`token in a URL: ${r.url()}`);
  });
  const response = await page.goto(`${server.url}/demo${hash}`);
  assert.equal(response.status(), 200);
  return { page, problems, response };
}

/** Waits until `selector`'s text is `text`; the failure names what was there instead. */
async function expectText(page, selector, text) {
  try {
    await page.waitForFunction(
      ([s, t]) => document.querySelector(s)?.textContent.trim() === t,
      [selector, text],
      { timeout: WAIT },
    );
  } catch {
    const actual = await page.locator(selector).textContent().catch(() => '(missing)');
    assert.fail(`${selector}: expected ${JSON.stringify(text)}, found ${JSON.stringify(actual)}`);
  }
}

async function expectOpen(page) {
  await page.locator('#state[data-state="open"]').waitFor({ timeout: WAIT });
  await expectText(page, '#state', 'open');
}

/** The list as the user sees it: seq, topic, preview and whether it shows unread. */
async function listed(page) {
  return page.$$eval('#list > li', (items) =>
    items.map((li) => ({
      seq: Number(li.dataset.seq),
      topic: li.querySelector('.topic').textContent,
      preview: li.querySelector('.preview').textContent,
      unread: li.classList.contains('unread'),
    })),
  );
}

test('the demo inbox: live, dev publish, read across devices, reload, paging', { timeout: 180_000 }, async () => {
  const contextA = await newContext(browser);
  const { page: a, problems, response } = await openDemo(contextA);
  const csp = response.headers()['content-security-policy'];
  for (const directive of ["default-src 'self'", "script-src 'self'", "style-src 'self'"]) {
    assert.ok(csp.includes(directive), csp);
  }

  await expectOpen(a);
  await expectText(a, '#user', 'alice');
  await expectText(a, '#badge', '0');
  await a.locator('#empty').waitFor({ timeout: WAIT });
  await a.locator('#compose').waitFor({ timeout: WAIT }); // dev mode: the test form shows

  // A publish through the HTTP API arrives live.
  await publish(server, 'alice', 'orders', { title: 'Order #42 shipped', text: 'Arriving Thursday' });
  await a.locator('#list > li.unread[data-seq="1"]').waitFor({ timeout: WAIT });
  await expectText(a, '#badge', '1');
  assert.match(await a.textContent('#announcer'), /orders/);
  assert.equal(await a.locator('#empty').isVisible(), false);

  // The dev-mode form publishes to alice herself.
  await a.fill('#compose-topic', 'demo');
  await a.fill('#compose-message', 'Hello from the demo form');
  await a.click('#compose-send');
  await a.locator('#list > li.unread[data-seq="2"]').waitFor({ timeout: WAIT });
  await expectText(a, '#badge', '2');
  assert.deepEqual(await listed(a), [
    { seq: 2, topic: 'demo', preview: 'Hello from the demo form', unread: true },
    { seq: 1, topic: 'orders', preview: 'Order #42 shipped — Arriving Thursday', unread: true },
  ]);

  // A second device (another browser context) sees the same inbox, and sees
  // reads made on the first one live.
  const contextB = await newContext(browser);
  const { page: b, problems: problemsB } = await openDemo(contextB);
  await expectOpen(b);
  await expectText(b, '#badge', '2');
  await b.locator('#list > li[data-seq="1"]').waitFor({ timeout: WAIT });

  await a.click('#list > li[data-seq="1"] button');
  await expectText(a, '#badge', '1');
  await b.locator('#list > li[data-seq="1"]:not(.unread)').waitFor({ timeout: WAIT });
  await expectText(b, '#badge', '1');
  assert.ok(await b.locator('#list > li.unread[data-seq="2"]').isVisible());

  await a.click('#mark-all');
  await expectText(a, '#badge', '0');
  await expectText(b, '#badge', '0');
  await b.waitForFunction(() => document.querySelectorAll('#list > li.unread').length === 0, null, { timeout: WAIT });
  assert.ok(await a.locator('#mark-all').isDisabled());

  // A reload rebuilds the list from the inbox API, read state included.
  await a.reload();
  await expectOpen(a);
  await a.locator('#loading').waitFor({ state: 'hidden', timeout: WAIT });
  await expectText(a, '#badge', '0');
  assert.deepEqual(
    (await listed(a)).map(({ seq, unread }) => ({ seq, unread })),
    [
      { seq: 2, unread: false },
      { seq: 1, unread: false },
    ],
  );

  // One more, unread, for the screenshot; then the screenshots.
  await publish(server, 'alice', 'billing', { text: 'Your November invoice is ready', amount: '€42.00' });
  await a.locator('#list > li.unread[data-seq="3"]').waitFor({ timeout: WAIT });
  await expectText(a, '#badge', '1');
  await a.waitForTimeout(700); // let the arrival animation finish
  await a.screenshot({ path: path.join(artifactsDir(), 'demo.png'), fullPage: true });
  await a.setViewportSize({ width: 390, height: 844 });
  await a.screenshot({ path: path.join(artifactsDir(), 'demo-phone.png'), fullPage: true });

  // Paging: the first page holds 20; "Load older" fetches the rest.
  for (let i = 1; i <= 22; i += 1) await publish(server, 'alice', 'bulk', { n: i });
  await expectText(a, '#badge', '23');
  await a.reload();
  await expectOpen(a);
  await a.locator('#older').waitFor({ timeout: WAIT });
  assert.equal(await a.locator('#list > li').count(), 20);
  await a.click('#older');
  await a.waitForFunction(() => document.querySelectorAll('#list > li').length === 25, null, { timeout: WAIT });
  await a.locator('#older').waitFor({ state: 'hidden', timeout: WAIT });
  const seqs = (await listed(a)).map((n) => n.seq);
  assert.deepEqual(seqs, Array.from({ length: 25 }, (_, i) => 25 - i));

  assert.deepEqual(problems, []);
  assert.deepEqual(problemsB, []);
  await contextA.close();
  await contextB.close();
});

test('without a token the page explains how to get one', { timeout: 60_000 }, async () => {
  const context = await newContext(browser);
  const { page, problems } = await openDemo(context, { hash: '' });
  await page.locator('#signed-out').waitFor({ timeout: WAIT });
  assert.equal(await page.locator('#app').isVisible(), false);
  assert.match(await page.textContent('#signed-out'), /#token=/);
  assert.deepEqual(problems, []);

  // A refused token gets the same card, with the reason.
  const { page: refused } = await openDemo(context, { hash: '#token=not.a.token' });
  await refused.locator('#signed-out-reason').waitFor({ timeout: WAIT });
  assert.match(await refused.textContent('#signed-out-reason'), /refused/);
  await context.close();
});
