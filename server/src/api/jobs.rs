//! `GET /v1/jobs/{id}` (an API key with the `publish` or `read` scope): a large-audience publish's state and progress.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use herald_protocol::http::{JobProgress, JobStatus};

use super::error::ApiError;
use super::extract::JobKey;
use crate::store::rfc3339_ms;
use crate::AppState;

pub async fn status(
    State(state): State<AppState>,
    _: JobKey,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<JobStatus>, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "job_not_found", "no job with this id");
    // An id that does not decode (`%FF`) names no job either.
    let Ok(Path(id)) = id else { return Err(not_found()) };
    if !super::publish::is_plain_name(&id, 64) {
        return Err(not_found());
    }
    let job = state.store.job(&id).await?.ok_or_else(not_found)?;
    Ok(Json(JobStatus {
        job_id: job.id,
        state: job.state.as_str().into(),
        progress: JobProgress { done: job.done, total: job.total },
        attempts: job.attempts,
        error: job.error,
        created_at: rfc3339_ms(job.created_at_ms),
        updated_at: rfc3339_ms(job.updated_at_ms),
    }))
}
