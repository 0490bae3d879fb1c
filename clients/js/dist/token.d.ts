export interface Claims {
    sub?: string;
    exp?: number;
}
/** The payload of a JWT, or `{}` when `token` is not one. */
export declare function readClaims(token: string): Claims;
/** Calls the application's provider and remembers the last token it gave. */
export declare class Tokens {
    private readonly provider;
    private latest;
    /** A token fetched by `connect()` that the first connection may use without asking again. */
    private unused;
    constructor(provider: () => string | Promise<string>);
    /** The last token the provider gave, if any. */
    get current(): string | null;
    /** Asks the provider. */
    fresh(): Promise<string>;
    /** Asks the provider, and lets the next `forConnect()` use the answer. */
    prime(): Promise<string>;
    /** For a new connection: the primed token once, else the provider's answer. */
    forConnect(): Promise<string>;
    /** For an HTTP call: the cached token while it is good for a while, else the provider's. */
    forHttp(): Promise<string>;
}
