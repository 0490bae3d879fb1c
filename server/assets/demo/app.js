// The Herald demo inbox: a small app on the browser SDK.
//
// The token comes from the URL fragment (#token=…), which the browser never
// sends; the SDK carries it in the WebSocket subprotocol and in the
// Authorization header of inbox calls. The list is the inbox API's pages
// merged with live notifications, keyed by seq; the unread badge is the
// server's count, re-read after every change (changes are applied at once
// locally, so the page never waits for it).
import { Herald } from '/sdk/herald.js';

const PAGE_SIZE = 20;
const CONNECT_WAIT_MS = 5000;
const TOKEN_CODES = new Set(['missing_token', 'invalid_token', 'token_expired']);
const $ = (id) => document.getElementById(id);

const token = new URLSearchParams(location.hash.slice(1)).get('token');
/** seq → { n: notification, li: HTMLLIElement } */
const items = new Map();
let herald = null;
let hasOlder = false;
/** Set once the first page is shown. */
let listed = false;

// ---------------------------------------------------------------- start-up

async function start() {
  $('app').hidden = false;
  showUser(subject(token));
  herald = new Herald({ url: location.origin, token: () => token });
  herald.on('state', onState);
  herald.on('notification', onNotification);
  herald.on('read', (mark) => {
    applyMark(mark);
    syncUnread();
  });
  herald.on('error', fail);
  herald.on('truncated', () =>
    toast('Some notifications expired before this page caught up; they are no longer kept.', 'info'),
  );
  wireControls();
  loadConfig();
  // One cheap authenticated call first: a refused token shows the sign-in
  // card at once, whatever the socket does.
  setBadge((await herald.inbox.unread()).total);
  // Connect, then read the first page: what is committed in between arrives
  // live and the two merge by seq. Should the socket take long, the page is
  // read anyway, and re-read once the socket opens (see onState).
  const connected = herald.connect().catch(fail);
  await Promise.race([connected, new Promise((resolve) => setTimeout(resolve, CONNECT_WAIT_MS))]);
  const page = await herald.inbox.list({ limit: PAGE_SIZE });
  for (const n of page.notifications) insert(n, false);
  hasOlder = page.notifications.length === PAGE_SIZE;
  listed = true;
  $('loading').hidden = true;
  render();
  syncUnread();
}

function wireControls() {
  $('list').addEventListener('click', (event) => {
    const button = event.target.closest('button[data-seq]');
    if (button) markOne(Number(button.dataset.seq));
  });
  $('mark-all').addEventListener('click', markAll);
  $('older').addEventListener('click', loadOlder);
  $('compose').addEventListener('submit', sendTest);
  setInterval(refreshTimes, 30_000);
}

async function loadConfig() {
  try {
    const response = await fetch('/demo/config');
    const config = await response.json();
    if (config.dev_mode) {
      $('compose').hidden = false;
      $('empty-hint').textContent = 'Send yourself one with the form above, or publish with the API key.';
    }
  } catch {
    // No form then; the inbox works all the same.
  }
}

// ------------------------------------------------------------ SDK events

function onState(state) {
  if (signInShown) return;
  const pill = $('state');
  pill.dataset.state = state;
  pill.textContent = state;
  // Open after the list was read (a reconnect, or a slow first connect):
  // notifications resume from the SDK's last seq, but anything before that
  // and read marks made meanwhile are only in the store.
  if (state === 'open' && listed) resync();
}

function onNotification(n) {
  if (items.has(n.seq)) return;
  insert(n, true);
  if (!n.read) bumpBadge(1);
  announce(`New notification, ${n.topic}: ${preview(n.payload)}`);
  render();
  syncUnread();
}

/** Applies a read mark — `{seqs}` or `{up_to_seq}` — to the loaded items. */
function applyMark(mark) {
  if (Array.isArray(mark.seqs)) {
    for (const seq of mark.seqs) setRead(items.get(seq), true);
  } else if (typeof mark.up_to_seq === 'number') {
    for (const [seq, item] of items) if (seq <= mark.up_to_seq) setRead(item, true);
  }
  render();
}

// ---------------------------------------------------------------- actions

async function markOne(seq) {
  const item = items.get(seq);
  if (!item || item.n.read) return;
  setRead(item, true);
  bumpBadge(-1);
  render();
  try {
    await mark({ seqs: [seq] });
  } catch (e) {
    setRead(item, false);
    bumpBadge(1);
    render();
    fail(e);
  }
  syncUnread();
}

async function markAll() {
  const upTo = Math.max(herald.lastSeq ?? 0, ...items.keys());
  if (!upTo) return;
  const changed = [...items.values()].filter((item) => !item.n.read);
  for (const item of changed) setRead(item, true);
  setBadge(0);
  render();
  try {
    await mark({ up_to_seq: upTo });
  } catch (e) {
    for (const item of changed) setRead(item, false);
    render();
    fail(e);
  }
  syncUnread();
}

/** Over the socket when it is open, else over HTTP. */
function mark(m) {
  return herald.state === 'open' ? herald.markRead(m) : herald.inbox.markRead(m);
}

async function loadOlder() {
  const button = $('older');
  button.disabled = true;
  button.textContent = 'Loading…';
  try {
    const oldest = Math.min(...items.keys());
    const page = await herald.inbox.list({ before_seq: oldest, limit: PAGE_SIZE });
    for (const n of page.notifications) insert(n, false);
    hasOlder = page.notifications.length === PAGE_SIZE;
  } catch (e) {
    fail(e);
  } finally {
    button.disabled = false;
    button.textContent = 'Load older';
    render();
  }
}

/** Re-reads the loaded range: read marks made while the socket was down. */
async function resync() {
  try {
    const query = items.size ? { after_seq: Math.min(...items.keys()) - 1, limit: 500 } : { limit: PAGE_SIZE };
    const page = await herald.inbox.list(query);
    for (const n of page.notifications) {
      if (items.has(n.seq)) setRead(items.get(n.seq), n.read);
      else insert(n, false);
    }
    render();
  } catch (e) {
    fail(e);
  }
  syncUnread();
}

async function sendTest(event) {
  event.preventDefault();
  const topic = $('compose-topic').value.trim();
  const message = $('compose-message').value.trim() || 'Hello from the demo';
  const send = $('compose-send');
  send.disabled = true;
  try {
    const response = await fetch('/demo/publish', {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ topic, payload: asPayload(message) }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw Object.assign(new Error(body?.error?.message ?? `HTTP ${response.status}`), {
        code: body?.error?.code,
      });
    }
    $('compose-message').value = '';
    $('compose-message').focus();
  } catch (e) {
    fail(e);
  } finally {
    send.disabled = false;
  }
}

/** A JSON object or array as typed, anything else as `{"text": …}`. */
function asPayload(message) {
  if (/^[[{]/.test(message)) {
    try {
      return JSON.parse(message);
    } catch {
      // Not JSON after all: send it as text.
    }
  }
  return { text: message };
}

// ---------------------------------------------------------------- badge

let badge = 0;
let unreadInFlight = false;
let unreadAgain = false;

function bumpBadge(delta) {
  setBadge(Math.max(0, badge + delta));
}

function setBadge(count) {
  badge = count;
  $('badge').textContent = String(count);
  $('badge-wrap').dataset.count = String(count);
  $('mark-all').disabled = count === 0;
  document.title = count ? `(${count}) Herald inbox` : 'Herald inbox';
}

/** The server's count; one request at a time, the last answer after the last change wins. */
async function syncUnread() {
  if (unreadInFlight) {
    unreadAgain = true;
    return;
  }
  unreadInFlight = true;
  try {
    const counts = await herald.inbox.unread();
    if (!unreadAgain) setBadge(counts.total);
  } catch (e) {
    fail(e);
  } finally {
    unreadInFlight = false;
    if (unreadAgain) {
      unreadAgain = false;
      syncUnread();
    }
  }
}

// ---------------------------------------------------------------- the list

/** Adds a notification in seq order (newest first); ignores one already shown. */
function insert(n, live) {
  if (items.has(n.seq)) return;
  const li = document.createElement('li');
  li.className = 'item';
  li.dataset.seq = String(n.seq);
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'item-button';
  button.dataset.seq = String(n.seq);

  const dot = el('span', 'dot');
  dot.setAttribute('aria-hidden', 'true');
  const status = el('span', 'sr-only status');
  const body = el('span', 'item-body');
  const top = el('span', 'item-top');
  const topic = el('span', `topic hue-${hue(n.topic)}`, n.topic);
  const time = el('time', 'time');
  time.dateTime = n.created_at;
  time.title = new Date(n.created_at).toLocaleString();
  time.textContent = ago(n.created_at);
  top.append(topic, time);
  const text = el('span', 'preview', preview(n.payload));
  text.title = JSON.stringify(n.payload, null, 2);
  body.append(top, text);
  button.append(dot, status, body);
  li.append(button);

  const item = { n: { ...n }, li };
  items.set(n.seq, item);
  setRead(item, n.read);
  const next = [...$('list').children].find((other) => Number(other.dataset.seq) < n.seq);
  $('list').insertBefore(li, next ?? null);
  if (live && !matchMedia('(prefers-reduced-motion: reduce)').matches) {
    li.classList.add('arrive');
    li.addEventListener('animationend', () => li.classList.remove('arrive'), { once: true });
  }
}

function setRead(item, read) {
  if (!item) return;
  item.n.read = read;
  item.li.classList.toggle('unread', !read);
  const button = item.li.querySelector('button');
  button.setAttribute('aria-disabled', String(read));
  button.title = read ? 'Read' : 'Mark as read';
  item.li.querySelector('.status').textContent = read ? 'Read: ' : 'Unread: ';
}

function render() {
  const empty = items.size === 0;
  $('empty').hidden = !empty || !$('loading').hidden;
  $('older').hidden = empty || !hasOlder;
}

function refreshTimes() {
  for (const time of document.querySelectorAll('time[datetime]')) time.textContent = ago(time.dateTime);
}

// ---------------------------------------------------------------- helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A one-line reading of a payload: its text if it has one, else its fields. */
function preview(payload) {
  if (payload === null || payload === undefined) return '';
  if (typeof payload !== 'object') return String(payload);
  if (Array.isArray(payload)) return payload.map(short).join(', ');
  const digest = payload.digest;
  if (digest && typeof digest === 'object' && typeof digest.count === 'number') {
    return `${digest.count} update${digest.count === 1 ? '' : 's'}${digest.key ? ` · ${digest.key}` : ''}`;
  }
  const title = ['title', 'subject'].map((k) => payload[k]).find((v) => typeof v === 'string');
  const text = ['text', 'message', 'body', 'summary'].map((k) => payload[k]).find((v) => typeof v === 'string');
  if (title || text) return [title, text].filter(Boolean).join(' — ');
  const fields = Object.entries(payload);
  if (fields.length === 0) return '{}';
  return fields.map(([k, v]) => `${k}: ${short(v)}`).join(' · ');
}

function short(value) {
  const text = typeof value === 'string' ? value : JSON.stringify(value);
  return text.length > 60 ? `${text.slice(0, 57)}…` : text;
}

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto', style: 'short' });

function ago(iso) {
  const secs = (Date.parse(iso) - Date.now()) / 1000;
  const abs = Math.abs(secs);
  if (abs < 45) return 'just now';
  if (abs < 3600) return relative.format(Math.round(secs / 60), 'minute');
  if (abs < 86400) return relative.format(Math.round(secs / 3600), 'hour');
  if (abs < 7 * 86400) return relative.format(Math.round(secs / 86400), 'day');
  return new Date(iso).toLocaleDateString();
}

/** A stable colour (one of eight) per topic. */
function hue(topic) {
  let h = 0;
  for (const c of topic) h = (h * 31 + c.codePointAt(0)) >>> 0;
  return h % 8;
}

/** The token's `sub`, for display only (the server checks the token). */
function subject(jwt) {
  try {
    const part = jwt.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const bytes = Uint8Array.from(atob(part.padEnd(Math.ceil(part.length / 4) * 4, '=')), (c) => c.charCodeAt(0));
    const sub = JSON.parse(new TextDecoder().decode(bytes)).sub;
    return typeof sub === 'string' ? sub : null;
  } catch {
    return null;
  }
}

function showUser(user) {
  if (!user) return;
  $('who').hidden = false;
  $('user').textContent = user;
  $('avatar').textContent = [...user][0].toUpperCase();
}

function announce(text) {
  $('announcer').textContent = text;
}

/** Errors from the SDK or a request: a toast, or the sign-in card for a refused token. */
function fail(e) {
  const code = e?.code ?? e?.error?.code;
  const message = e?.message ?? e?.error?.message ?? String(e);
  console.error('herald demo:', e);
  if (TOKEN_CODES.has(code)) {
    herald?.close();
    signedOut(code === 'token_expired' ? 'This token has expired.' : `This token was refused: ${message}`);
    return;
  }
  toast(message);
}

let signInShown = false;

function signedOut(reason) {
  $('app').hidden = true;
  $('state').dataset.state = 'signed-out';
  $('state').textContent = 'signed out';
  $('signed-out').hidden = false;
  if (reason) {
    $('signed-out-reason').hidden = false;
    $('signed-out-reason').textContent = reason;
  }
  if (signInShown) return;
  signInShown = true;
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const value = $('token-input').value.trim();
    if (!value) return;
    location.hash = `token=${encodeURIComponent(value)}`;
    location.reload();
  });
  $('token-input').focus();
}

function toast(message, kind = 'error') {
  const box = el('div', `toast ${kind}`);
  box.setAttribute('role', kind === 'error' ? 'alert' : 'status');
  const text = el('span', 'toast-text', message);
  const close = el('button', 'toast-close', '×');
  close.type = 'button';
  close.setAttribute('aria-label', 'Dismiss');
  const remove = () => box.remove();
  close.addEventListener('click', remove);
  box.append(text, close);
  $('toasts').append(box);
  setTimeout(remove, 8000);
}

// ---------------------------------------------------------------- go

if (token) {
  start().catch(fail);
} else {
  signedOut(null);
}
