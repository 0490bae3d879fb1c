// The user's inbox over the HTTP API (spec §3, "The user's inbox"), with the
// user's token in `Authorization: Bearer`.

import { HeraldError, TOKEN_CODES } from './errors.js';
import type { Tokens } from './token.js';
import type { InboxPage, InboxQuery, ReadMark, UnreadCounts } from './types.js';

export class Inbox {
  /** @internal */
  constructor(
    private readonly base: string,
    private readonly tokens: Tokens,
    private readonly fetchFn: typeof fetch,
  ) {}

  /** `GET /v1/me/notifications`: newest first; page back with `before_seq`. */
  async list(query: InboxQuery = {}): Promise<InboxPage> {
    const params = new URLSearchParams();
    for (const name of ['limit', 'before_seq', 'after_seq', 'unread', 'topic'] as const) {
      const value = query[name];
      if (value !== undefined && value !== null) params.set(name, String(value));
    }
    const search = params.toString();
    return (await this.request('GET', `/v1/me/notifications${search ? `?${search}` : ''}`)) as InboxPage;
  }

  /** `POST /v1/me/notifications/read`: every open session of the user gets a `read` event. */
  async markRead(mark: ReadMark): Promise<void> {
    await this.request('POST', '/v1/me/notifications/read', readBody(mark));
  }

  /** `GET /v1/me/unread`: `{ total, by_topic }`. */
  async unread(): Promise<UnreadCounts> {
    return (await this.request('GET', '/v1/me/unread')) as UnreadCounts;
  }

  /** One call; a refused cached token is replaced from the provider and the call tried once more. */
  private async request(method: string, path: string, body?: unknown): Promise<unknown> {
    let token = await this.tokens.forHttp();
    for (let attempt = 0; ; attempt += 1) {
      const response = await this.send(method, path, token, body);
      if (response.ok) {
        return response.status === 204 ? undefined : readJson(response);
      }
      const error = await errorOf(response);
      if (attempt > 0 || response.status !== 401 || !TOKEN_CODES.has(error.code)) throw error;
      const fresh = await this.tokens.fresh();
      if (fresh === token) throw error;
      token = fresh;
    }
  }

  private async send(method: string, path: string, token: string, body: unknown): Promise<Response> {
    const headers: Record<string, string> = { Authorization: `Bearer ${token}`, Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    try {
      return await this.fetchFn(`${this.base}${path}`, {
        method,
        headers,
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
        credentials: 'omit',
        cache: 'no-store',
      });
    } catch (cause) {
      throw new HeraldError('network', `${method} ${path} failed: ${cause instanceof Error ? cause.message : cause}`, {
        cause,
      });
    }
  }
}

/** The JSON body of a read mark, checked: exactly one of `seqs` (1 to 1000 seqs ≥ 1) and `up_to_seq` (≥ 1). */
export function readBody(mark: ReadMark): ReadMark {
  const m = (mark ?? {}) as { seqs?: unknown; up_to_seq?: unknown; topic?: unknown };
  const isSeq = (v: unknown) => Number.isSafeInteger(v) && (v as number) >= 1;
  if (m.topic !== undefined) {
    // The server's rule for topics: 1 to 128 characters, no control characters.
    const t = m.topic;
    const chars = typeof t === 'string' ? [...t] : [];
    const topicOk = chars.length >= 1 && chars.length <= 128 && !/[\u0000-\u001f\u007f-\u009f]/.test(t as string);
    if (topicOk && m.seqs === undefined && (m.up_to_seq === undefined || isSeq(m.up_to_seq))) {
      return m.up_to_seq === undefined
        ? { topic: t as string }
        : { topic: t as string, up_to_seq: m.up_to_seq as number };
    }
  } else if (m.seqs !== undefined && m.up_to_seq === undefined) {
    if (Array.isArray(m.seqs) && m.seqs.length >= 1 && m.seqs.length <= 1000 && m.seqs.every(isSeq)) {
      return { seqs: [...(m.seqs as number[])] };
    }
  } else if (m.up_to_seq !== undefined && m.seqs === undefined && isSeq(m.up_to_seq)) {
    return { up_to_seq: m.up_to_seq as number };
  }
  throw new HeraldError(
    'invalid_argument',
    'a read mark is {seqs: [1 to 1000 seqs ≥ 1]}, {up_to_seq: a seq ≥ 1} or {topic: 1 to 128 characters, up_to_seq?: a seq ≥ 1}',
  );
}

async function readJson(response: Response): Promise<unknown> {
  try {
    return await response.json();
  } catch (cause) {
    throw new HeraldError('bad_response', `the server answered ${response.status} with a body that is not JSON`, {
      status: response.status,
      cause,
    });
  }
}

/** The spec's error body `{"error":{"code","message"}}` as a HeraldError. */
async function errorOf(response: Response): Promise<HeraldError> {
  let body: unknown = null;
  try {
    body = await response.json();
  } catch {
    // Not ours (a proxy's page): the status tells.
  }
  const error = (body as { error?: { code?: unknown; message?: unknown } } | null)?.error;
  const code = typeof error?.code === 'string' ? error.code : `http_${response.status}`;
  const message = typeof error?.message === 'string' ? error.message : `HTTP ${response.status}`;
  // Seconds; an HTTP date (which Herald never sends) is left out.
  const header = response.headers.get('retry-after');
  const retryAfter = header !== null && /^\d+$/.test(header.trim()) ? Number(header.trim()) : undefined;
  return new HeraldError(code, message, { status: response.status, retryAfter });
}
