/** Every error the SDK reports or throws. `code` is stable; `message` is for people. */
export declare class HeraldError extends Error {
    /**
     * The server's error code (`invalid_token`, `token_expired`, `rate_limited`, …;
     * see docs/protocol.md) or one of the SDK's own: `forbidden` (close 4003),
     * `network`, `bad_response`, `token_provider_failed`, `connection_lost`,
     * `not_connected`, `closed`, `invalid_argument`, `policy_violation` (1008),
     * `frame_too_large` (1009), `protocol_error` (1002), `invalid_data` (1007:
     * text that is not UTF-8).
     */
    readonly code: string;
    /** The HTTP status, for errors from the HTTP API. */
    readonly status?: number;
    /** The WebSocket close code, for errors that ended a connection. */
    readonly closeCode?: number;
    /**
     * Seconds the server asked to be left alone before a retry (its
     * `Retry-After`, sent with 429 and 503), for errors from the HTTP API.
     */
    readonly retryAfter?: number;
    constructor(code: string, message: string, details?: {
        status?: number;
        closeCode?: number;
        retryAfter?: number;
        cause?: unknown;
    });
}
/** The codes of a refused user token, on the HTTP API and at the handshake. */
export declare const TOKEN_CODES: ReadonlySet<string>;
