//! Liveness and readiness probes.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use crate::db;
use crate::error::ApiError;

/// `/healthz` and `/readyz`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// How long the readiness check may take.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Ready when the primary answers and every embedded migration is applied.
/// Checked over the monitor pool, so a saturated API pool (a load problem,
/// answered with 503s) does not take the process out of rotation.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let check = async {
        let client = state.pools.monitor.get().await.ok()?;
        db::schema_is_current(&client).await.ok()
    };
    let ready = matches!(
        tokio::time::timeout(READY_TIMEOUT, check).await,
        Ok(Some(true))
    );
    if ready {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable"})),
        )
    }
}
