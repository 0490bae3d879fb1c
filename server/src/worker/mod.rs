//! Heavy work off the connection path: a bounded pool of worker threads
//! ([`pool`]) and the loops that take durable jobs and digest windows from
//! the store and run their heavy steps on it ([`jobs`]).

pub mod jobs;
pub mod pool;
