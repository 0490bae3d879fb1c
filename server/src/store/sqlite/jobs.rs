//! Jobs and digest windows on SQLite.
//!
//! SQLite has one writer at a time, across processes too: a claim is one
//! `UPDATE … RETURNING` statement, which takes the write lock before it reads,
//! so two workers can never claim the same row. Multi-statement steps run in
//! `BEGIN IMMEDIATE` transactions for the same reason (a deferred one that
//! read first could fail to upgrade instead of waiting).

use super::SqliteStore;

crate::store::jobs::impl_job_store!(SqliteStore, begin: "BEGIN IMMEDIATE", lock: "");
