// Test helpers: a real `herald` process over https/wss with a fresh SQLite
// database and a self-signed certificate, headless Chromium through
// playwright-core, HS256 user tokens, and the HTTP API with the API key.
//
// Environment:
//   HERALD_BIN                 the server binary (default ../../target/debug/herald)
//   HERALD_CHROMIUM            the browser (default /usr/bin/chromium)
//   HERALD_TEST_TLS_CERT/_KEY  a certificate to use instead of a generated one
//   HERALD_ARTIFACTS_DIR       screenshots (default ../../target/browser-artifacts)

import { execFileSync, spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

export const jsRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const repoRoot = path.resolve(jsRoot, '../..');
const START_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 15_000;

/** Where screenshots go; created on first use. */
export function artifactsDir() {
  const dir = process.env.HERALD_ARTIFACTS_DIR ?? path.join(repoRoot, 'target/browser-artifacts');
  mkdirSync(dir, { recursive: true });
  return dir;
}

// ------------------------------------------------------------------ tokens

const b64url = (data) => Buffer.from(data).toString('base64url');

/** An HS256 user token for `sub`, valid `ttlSecs` from now; `claims` adds or overrides. */
export function mintToken(secret, sub, ttlSecs = 3600, claims = {}) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const payload = b64url(JSON.stringify({ sub, iat: now, exp: now + ttlSecs, ...claims }));
  const signature = createHmac('sha256', secret).update(`${header}.${payload}`).digest('base64url');
  return `${header}.${payload}.${signature}`;
}

// ------------------------------------------------------------------ TLS

let generated = null;

/** The certificate and key the servers use: from the environment, or made once per test file. */
function tlsPair() {
  const cert = process.env.HERALD_TEST_TLS_CERT;
  const key = process.env.HERALD_TEST_TLS_KEY;
  if (cert && key) return { cert, key };
  if (generated) return generated;
  const dir = mkdtempSync(path.join(os.tmpdir(), 'herald-tls-'));
  const pair = { cert: path.join(dir, 'cert.pem'), key: path.join(dir, 'key.pem'), dir };
  execFileSync(
    'openssl',
    [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-days', '2',
      '-keyout', pair.key, '-out', pair.cert,
    ],
    { stdio: 'pipe' },
  );
  generated = pair;
  process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
  return pair;
}

// ------------------------------------------------------------------ the server

const running = new Set();
const tempDirs = new Set();
process.once('exit', () => {
  for (const child of running) child.kill('SIGKILL');
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

/**
 * A herald process. `start()` spawns it and waits for its "listening" line;
 * `stop()` sends SIGTERM and waits for the exit; `restart()` does both on the
 * same port and database.
 */
class HeraldServer {
  constructor({ devMode = false, env = {} } = {}) {
    this.devMode = devMode;
    this.extraEnv = env;
    this.dir = mkdtempSync(path.join(os.tmpdir(), 'herald-browser-'));
    tempDirs.add(this.dir);
    this.dbPath = path.join(this.dir, 'herald.db');
    this.tls = tlsPair();
    this.cert = readFileSync(this.tls.cert);
    this.port = 0;
    this.child = null;
    this.logs = '';
    this.banner = '';
    if (!devMode) {
      this.jwtSecret = randomBytes(24).toString('hex');
      this.apiKey = `test-${randomBytes(12).toString('hex')}`;
    }
  }

  get url() {
    return `https://127.0.0.1:${this.port}`;
  }

  /** The binary and the environment it runs with (settings from this server's). */
  command() {
    const bin = process.env.HERALD_BIN ?? path.join(repoRoot, 'target/debug/herald');
    if (!existsSync(bin)) throw new Error(`no herald binary at ${bin}: build it (cargo build) or set HERALD_BIN`);
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('HERALD_')));
    Object.assign(env, {
      HERALD_LISTEN: `127.0.0.1:${this.port}`,
      HERALD_DATABASE_URL: `sqlite://${this.dbPath}`,
      HERALD_TLS_CERT: this.tls.cert,
      HERALD_TLS_KEY: this.tls.key,
      HERALD_LOG: 'info',
      HERALD_LOG_FORMAT: 'json',
      HERALD_DRAIN_GRACE: '200ms',
      ...(this.devMode ? {} : { HERALD_JWT_SECRET: this.jwtSecret, HERALD_API_KEYS: this.apiKey }),
      ...this.extraEnv,
    });
    return { bin, env };
  }

  /** Runs `herald <args>` with this server's settings (e.g. `backup`); its stdout. */
  cli(...args) {
    const { bin, env } = this.command();
    return execFileSync(bin, args, { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  }

  async start() {
    if (this.child) throw new Error('herald is already running');
    const { bin, env } = this.command();
    const child = spawn(bin, ['serve'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    running.add(child);
    this.exited = new Promise((resolve) =>
      child.once('exit', (code, signal) => {
        running.delete(child);
        resolve({ code, signal });
      }),
    );
    let stdout = '';
    let listening = null;
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => fail(new Error(`herald did not start in ${START_TIMEOUT_MS} ms`)), START_TIMEOUT_MS);
      const fail = (e) => {
        clearTimeout(timer);
        reject(new Error(`${e.message}\n--- herald output ---\n${this.logs}${stdout}`));
      };
      const ready = () => {
        // In dev mode the banner (keys, token) follows the listening line.
        if (!listening || (this.devMode && !stdout.includes('leave dev mode'))) return;
        clearTimeout(timer);
        resolve();
      };
      child.stdout.setEncoding('utf8').on('data', (chunk) => {
        stdout += chunk;
        ready();
      });
      child.stderr.setEncoding('utf8').on('data', (chunk) => {
        this.logs += chunk;
        for (const line of chunk.split('\n')) {
          if (!line.includes('"listening"')) continue;
          try {
            const entry = JSON.parse(line);
            if (entry.message === 'listening') listening = entry.addr;
          } catch {
            // A partial line: the next chunk completes it.
          }
        }
        ready();
      });
      child.once('exit', (code, signal) => fail(new Error(`herald exited (${code ?? signal}) while starting`)));
    });
    this.port = Number(listening.split(':').pop());
    if (this.devMode) {
      this.banner = stdout;
      this.jwtSecret = stdout.match(/JWT secret:\s+(\S+)/)[1];
      this.apiKey = stdout.match(/API key:\s+(\S+)/)[1];
    }
    return this;
  }

  /** SIGTERM, then waits for the exit (the node drains: sessions get 1001). */
  async stop() {
    const child = this.child;
    if (!child) return;
    this.child = null;
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    const { code } = await this.exited;
    clearTimeout(timer);
    if (code !== 0 && code !== null) throw new Error(`herald exited with ${code}\n${this.logs}`);
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  /** Stops and removes the database. */
  async dispose() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** An HS256 token for `sub` signed with this server's secret. */
  token(sub, ttlSecs = 3600, claims = {}) {
    return mintToken(this.jwtSecret, sub, ttlSecs, claims);
  }

  /** A call to the HTTP API, trusting this server's certificate: `{status, body}`. */
  request(method, pathname, { body, token = this.apiKey } = {}) {
    return new Promise((resolve, reject) => {
      const data = body === undefined ? null : Buffer.from(JSON.stringify(body));
      const req = https.request(
        `${this.url}${pathname}`,
        {
          method,
          ca: this.cert,
          headers: {
            Authorization: `Bearer ${token}`,
            ...(data ? { 'Content-Type': 'application/json', 'Content-Length': data.length } : {}),
          },
        },
        (res) => {
          let text = '';
          res.setEncoding('utf8').on('data', (c) => (text += c));
          res.on('end', () => {
            let parsed = text;
            try {
              parsed = text ? JSON.parse(text) : null;
            } catch {
              // Not JSON: kept as text.
            }
            resolve({ status: res.statusCode, body: parsed });
          });
        },
      );
      req.on('error', reject);
      req.end(data);
    });
  }

  /** How many sessions `user` has open (`GET /v1/users/{id}/presence`). */
  async presence(user) {
    const { status, body } = await this.request('GET', `/v1/users/${encodeURIComponent(user)}/presence`);
    if (status !== 200) throw new Error(`presence: ${status} ${JSON.stringify(body)}`);
    return body.sessions;
  }
}

/** Starts a herald on 127.0.0.1 (a free port) over TLS; `devMode` leaves the keys to the server. */
export async function startHerald(options = {}) {
  return new HeraldServer(options).start();
}

/** Publishes one notification through the HTTP API; returns `{seq, id}`. */
export async function publish(server, user, topic, payload, extra = {}) {
  const { status, body } = await server.request('POST', '/v1/notifications', {
    body: { user_id: user, topic, payload, ...extra },
  });
  if (status !== 200 && status !== 201) throw new Error(`publish: ${status} ${JSON.stringify(body)}`);
  return body.notifications[0];
}

// ------------------------------------------------------------------ the browser

export const chromiumPath = process.env.HERALD_CHROMIUM ?? '/usr/bin/chromium';

export async function launchBrowser() {
  return chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
  });
}

/** A browser context (a "device": its own storage, locks and tabs) that accepts the test certificate. */
export async function newContext(browser) {
  return browser.newContext({ ignoreHTTPSErrors: true });
}
