import type { Core, Link } from './core.js';
import type { ReadMark } from './types.js';
/** Whether this page can share: Web Locks and BroadcastChannel both present. */
export declare function canShareTabs(): boolean;
export declare class SharedLink implements Link {
    private readonly core;
    private readonly id;
    private readonly channel;
    private readonly abort;
    private readonly lockName;
    private connection;
    private release;
    private stopped;
    private readonly calls;
    private readonly onPageHide;
    /** `group` names the server and user: `<http base>|<sub>`. */
    constructor(core: Core, group: string);
    get isLeader(): boolean;
    start(): void;
    stop(): void;
    markRead(mark: ReadMark): Promise<void>;
    /** Runs while this tab holds the lock; the returned promise ends the hold. */
    private lead;
    /** The leader reports to its own page and to every other tab. */
    private leaderSink;
    private onMessage;
    /** What a follower does with the leader's reports. */
    private follow;
    private leaderState;
    private post;
    private settle;
    private failCalls;
}
