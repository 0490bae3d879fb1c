// From the one `url` option to the WebSocket endpoint and the HTTP API base.

import { HeraldError } from './errors.js';

export interface Endpoints {
  /** `wss://host/base/v1/ws`. */
  ws: string;
  /** `https://host/base`: prefix of the HTTP API paths. Also names this server in storage keys. */
  http: string;
}

/** `https://host[:port][/base]` (http, https, ws or wss; relative to the page when it has one). */
export function endpoints(url: string): Endpoints {
  let parsed: URL;
  try {
    const page = (globalThis as { location?: { href?: string } }).location?.href;
    parsed = page ? new URL(url, page) : new URL(url);
  } catch {
    throw new HeraldError('invalid_argument', `url is not a URL: ${url}`);
  }
  const secure = parsed.protocol === 'https:' || parsed.protocol === 'wss:';
  if (!secure && parsed.protocol !== 'http:' && parsed.protocol !== 'ws:') {
    throw new HeraldError('invalid_argument', `url must be http(s) or ws(s): ${url}`);
  }
  // A base path is kept (a server behind a path prefix); the WebSocket path
  // itself is accepted too.
  const base = parsed.pathname.replace(/\/+$/, '').replace(/\/v1\/ws$/, '');
  const host = parsed.host;
  return {
    ws: `${secure ? 'wss' : 'ws'}://${host}${base}/v1/ws`,
    http: `${secure ? 'https' : 'http'}://${host}${base}`,
  };
}
