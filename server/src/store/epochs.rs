//! Store epochs: which history of the store a client's seqs belong to.
//!
//! A restore from a backup (`herald restore`, `herald mark-restored`) ends
//! the current epoch, recording each user's counter as their fork: seqs up
//! to it are the same in both histories, later ones of the ended epoch were
//! lost and are handed out again. Welcomes carry the current epoch; a
//! session whose client sends back an earlier one resumes from the fork
//! (`docs/protocol.md`, "Store epochs"). Both stores run the same statements
//! ([`impl_epoch_store`]).

use async_trait::async_trait;
use herald_protocol::Seq;

use super::StoreError;

/// The store's epochs. Every store implements it.
#[async_trait]
pub trait EpochStore: Send + Sync + 'static {
    /// The store's epoch: which history its seqs belong to. It changes only
    /// with [`mark_restored`](Self::mark_restored).
    async fn epoch(&self) -> Result<String, StoreError>;

    /// Where a cursor of `user` kept from the store's epoch `epoch` must go
    /// back to: seqs up to the returned one are the same in both histories,
    /// later ones of that epoch were lost in a restore (0 for an epoch this
    /// store never had). `None` when `epoch` is the current one.
    async fn fork(&self, user: &str, epoch: &str) -> Result<Option<Seq>, StoreError>;

    /// Records that the store was just restored from a backup: every user's
    /// counter becomes the current epoch's fork, and a new epoch begins;
    /// returns it. Run with no node serving the store.
    async fn mark_restored(&self) -> Result<String, StoreError>;
}

/// The statements both stores share.
pub mod sql {
    /// The store's current epoch.
    pub const EPOCH: &str = "SELECT epoch FROM store_epochs ORDER BY ordinal DESC LIMIT 1";

    /// For a client's epoch `$1` and user `$2`: the epoch's ordinal (NULL:
    /// not one of this store's), the current ordinal, and the lowest fork of
    /// the user over the epochs from `$1` to the current one (a user without
    /// a fork row in one of them had nothing stored at that restore: 0).
    pub const FORK: &str = "SELECT (SELECT ordinal FROM store_epochs WHERE epoch = $1) AS known, \
         (SELECT MAX(ordinal) FROM store_epochs) AS current_ordinal, \
         (SELECT MIN(COALESCE(f.seq, 0)) FROM store_epochs e \
          LEFT JOIN store_forks f ON f.epoch = e.epoch AND f.user_id = $2 \
          WHERE e.ordinal >= (SELECT ordinal FROM store_epochs WHERE epoch = $1) \
            AND e.ordinal < (SELECT MAX(ordinal) FROM store_epochs)) AS fork";

    /// A restore, first step: every user's counter as the current epoch's
    /// fork. (`WHERE true`: SQLite's parser needs a `WHERE` before an
    /// upsert's `ON`.)
    pub const FORKS: &str = "INSERT INTO store_forks (epoch, user_id, seq) \
         SELECT (SELECT epoch FROM store_epochs ORDER BY ordinal DESC LIMIT 1), user_id, last_seq FROM users \
         WHERE true ON CONFLICT DO NOTHING";

    /// A restore, second step: the new epoch `$1`, restored at `$2` (unix ms).
    pub const NEW_EPOCH: &str = "INSERT INTO store_epochs (epoch, restored_ms) VALUES ($1, $2)";
}

/// Where a client's cursor from another epoch must go back to, from
/// [`sql::FORK`]'s row: `None` when `epoch` is the current one.
pub fn fork_from(known: Option<i64>, current: i64, fork: Option<i64>) -> Option<Seq> {
    match known {
        None => Some(0),
        Some(known) if known == current => None,
        Some(_) => Some(fork.unwrap_or(0)),
    }
}

/// A new epoch's name.
pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
}

/// The [`EpochStore`] implementation both stores share: the same statements
/// ([`sql`]) through each store's `pool`, errors through its `db_error`
/// (as [`impl_job_store`](crate::store::jobs::impl_job_store)).
macro_rules! impl_epoch_store {
    ($store:ty) => {
        const _: () = {
            use async_trait::async_trait;
            use herald_protocol::Seq;

            use $crate::store::epochs::{fork_from, new_epoch, sql, EpochStore};
            use $crate::store::StoreError;

            #[async_trait]
            impl EpochStore for $store {
                async fn epoch(&self) -> Result<String, StoreError> {
                    sqlx::query_scalar(sql::EPOCH).fetch_one(&self.pool).await.map_err(|e| self.db_error(e))
                }

                async fn fork(&self, user: &str, epoch: &str) -> Result<Option<Seq>, StoreError> {
                    let (known, current, fork) = sqlx::query_as(sql::FORK)
                        .bind(epoch)
                        .bind(user)
                        .fetch_one(&self.pool)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    Ok(fork_from(known, current, fork))
                }

                async fn mark_restored(&self) -> Result<String, StoreError> {
                    let epoch = new_epoch();
                    let (mut conn, _turn) = self.for_writing().await?;
                    let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(|e| self.db_error(e))?;
                    sqlx::query(sql::FORKS).execute(&mut *tx).await.map_err(|e| self.db_error(e))?;
                    sqlx::query(sql::NEW_EPOCH)
                        .bind(&epoch)
                        .bind($crate::store::now_ms())
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.db_error(e))?;
                    tx.commit().await.map_err(|e| self.db_error(e))?;
                    Ok(epoch)
                }
            }
        };
    };
}

pub(crate) use impl_epoch_store;
