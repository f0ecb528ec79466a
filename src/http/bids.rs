//! Bid endpoints: placing a bid (`POST /api/auctions/{id}/bids`, handled by
//! the [`BidDesk`](crate::bidding::BidDesk)) and reading one's own bid.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::error::{ApiError, FieldError};
use super::extract::{idempotency_key, parse_id, prefer_wait, JsonObject, PathId};
use super::AppState;
use crate::auth::User;
use crate::db::bids::BidRecord;
use crate::domain::Amount;

/// Routes under `/api/bids`.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/bids/{id}", get(show))
}

/// A bid as its bidder sees it.
#[derive(Debug, Serialize)]
pub struct BidView {
    id: Uuid,
    auction_id: Uuid,
    bidder_id: String,
    amount: i64,
    status: String,
    reason: Option<String>,
    received_at: DateTime<Utc>,
    resolved_at: Option<DateTime<Utc>>,
    /// The auction price right after this bid was resolved.
    auction_price: Option<i64>,
}

impl From<BidRecord> for BidView {
    fn from(b: BidRecord) -> Self {
        BidView {
            id: b.id,
            auction_id: b.auction_id,
            bidder_id: b.bidder_id,
            amount: b.amount,
            status: b.status,
            reason: b.reason,
            received_at: b.received_at,
            resolved_at: b.resolved_at,
            auction_price: b.price_after,
        }
    }
}

/// `POST /api/auctions/{id}/bids`.
pub async fn place(
    State(state): State<AppState>,
    user: User,
    PathId(auction_id): PathId,
    headers: HeaderMap,
    body: Result<JsonObject, ApiError>,
) -> Result<Response, ApiError> {
    let auction_id = parse_id(&auction_id, "auction")?;
    let key = idempotency_key(&headers)?;
    let JsonObject(body) = body?;
    let amount = match body.get("amount") {
        None => Err("is required".to_owned()),
        Some(value) => Amount::from_json(value),
    }
    .map_err(|message| ApiError::Validation(vec![FieldError::new("amount", message)]))?;
    let wait = prefer_wait(&headers);

    let placed = state
        .bids
        .place(
            &user,
            auction_id,
            amount,
            &key,
            wait.map(Duration::from_secs),
        )
        .await?;
    let token = placed.wal_position.as_deref().and_then(consistency_token);
    let status = match (
        placed.resolved_in_wait,
        placed.replayed,
        placed.bid.status.as_str(),
    ) {
        (true, false, _) => StatusCode::CREATED,
        (_, true, status) if status != "pending" => StatusCode::OK,
        _ => StatusCode::ACCEPTED,
    };
    let location = format!("/api/bids/{}", placed.bid.id);
    let mut response = (status, Json(BidView::from(placed.bid))).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("valid path"),
    );
    if let Some(token) = token {
        headers.insert("gavel-consistency-token", token);
    }
    if placed.replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if let (Some(n), true) = (wait, placed.resolved_in_wait) {
        headers.insert(
            "preference-applied",
            HeaderValue::from_str(&format!("wait={n}")).expect("valid header"),
        );
    }
    Ok(response)
}

/// Wraps a WAL position into the opaque `Gavel-Consistency-Token`.
fn consistency_token(wal_position: &str) -> Option<HeaderValue> {
    let token =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("lsn:{wal_position}"));
    HeaderValue::from_str(&token).ok()
}

/// `GET /api/bids/{id}`: the caller's own bid (any bid for admins).
async fn show(
    State(state): State<AppState>,
    user: User,
    PathId(id): PathId,
) -> Result<Json<BidView>, ApiError> {
    let id = parse_id(&id, "bid")?;
    let client = state.pools.api.get().await?;
    let bid = crate::db::bids::get(&client, id)
        .await?
        .filter(|b| user.is_admin() || b.bidder_id == user.id.as_str())
        .ok_or(ApiError::NotFound("bid"))?;
    Ok(Json(bid.into()))
}
