export interface Endpoints {
    /** `wss://host/base/v1/ws`. */
    ws: string;
    /** `https://host/base`: prefix of the HTTP API paths. Also names this server in storage keys. */
    http: string;
}
/** `https://host[:port][/base]` (http, https, ws or wss; relative to the page when it has one). */
export declare function endpoints(url: string): Endpoints;
