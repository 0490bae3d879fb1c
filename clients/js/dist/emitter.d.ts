type Listener<T> = (value: T) => void;
export declare class Emitter<Events extends object> {
    private readonly listeners;
    on<K extends keyof Events>(name: K, fn: Listener<Events[K]>): () => void;
    /** Calls each listener; one that throws is reported as an uncaught error and the rest still run. */
    emit<K extends keyof Events>(name: K, value: Events[K]): void;
}
export {};
