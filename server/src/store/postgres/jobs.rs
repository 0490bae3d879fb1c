//! Jobs and digest windows on PostgreSQL.
//!
//! Claims pick rows with `FOR UPDATE SKIP LOCKED`: workers on every node
//! claim at once without waiting on each other and never take the same row.
//! Digest adds lock windows in (user, key) order, so concurrent batches
//! cannot deadlock.

use super::PostgresStore;

crate::store::jobs::impl_job_store!(PostgresStore, begin: "BEGIN", lock: crate::store::jobs::sql::SKIP_LOCKED);
