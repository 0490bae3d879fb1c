// The token provider, and the few claims the SDK reads from a token. The SDK
// never verifies a token (the server does); it reads `sub` to name the user's
// stored seq and tab group, and `exp` to know when a cached token is stale.

import { HeraldError } from './errors.js';

export interface Claims {
  sub?: string;
  exp?: number;
}

/** The payload of a JWT, or `{}` when `token` is not one. */
export function readClaims(token: string): Claims {
  const part = token.split('.')[1];
  if (!part) return {};
  try {
    const base64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const binary = atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, '='));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const claims: unknown = JSON.parse(new TextDecoder().decode(bytes));
    if (!claims || typeof claims !== 'object') return {};
    const { sub, exp } = claims as Record<string, unknown>;
    return {
      ...(typeof sub === 'string' ? { sub } : {}),
      ...(typeof exp === 'number' ? { exp } : {}),
    };
  } catch {
    return {};
  }
}

/** A token cached for the HTTP API is used until this close to its `exp`. */
const HTTP_MARGIN_SECS = 30;

/** Calls the application's provider and remembers the last token it gave. */
export class Tokens {
  private latest: string | null = null;
  /** A token fetched by `connect()` that the first connection may use without asking again. */
  private unused: string | null = null;

  constructor(private readonly provider: () => string | Promise<string>) {}

  /** The last token the provider gave, if any. */
  get current(): string | null {
    return this.latest;
  }

  /** Asks the provider. */
  async fresh(): Promise<string> {
    let token: unknown;
    try {
      token = await this.provider();
    } catch (cause) {
      throw new HeraldError('token_provider_failed', `the token provider failed: ${describe(cause)}`, { cause });
    }
    if (typeof token !== 'string' || token === '') {
      throw new HeraldError('token_provider_failed', 'the token provider returned no token');
    }
    this.latest = token;
    return token;
  }

  /** Asks the provider, and lets the next `forConnect()` use the answer. */
  async prime(): Promise<string> {
    const token = await this.fresh();
    this.unused = token;
    return token;
  }

  /** For a new connection: the primed token once, else the provider's answer. */
  async forConnect(): Promise<string> {
    const primed = this.unused;
    this.unused = null;
    return primed ?? this.fresh();
  }

  /** For an HTTP call: the cached token while it is good for a while, else the provider's. */
  async forHttp(): Promise<string> {
    const cached = this.latest;
    if (cached) {
      const { exp } = readClaims(cached);
      if (exp === undefined || exp - HTTP_MARGIN_SECS > Date.now() / 1000) return cached;
    }
    return this.fresh();
  }
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
