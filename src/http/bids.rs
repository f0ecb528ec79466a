//! Bid endpoints: placing a bid (`POST /api/auctions/{id}/bids`, handled by
//! the [`BidDesk`](crate::bidding::BidDesk)) and reading one's own bid.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::consistency::{self, ReadToken};
use super::extract::{parse_id, BidHeaders, JsonBody, PathId};
use super::{AppState, QueueWait};
use crate::auth::User;
use crate::db::bids::BidRecord;
use crate::domain::Amount;
use crate::error::{ApiError, FieldError};

/// Time left between the end of a `Prefer: wait` and the request deadline.
const WAIT_MARGIN: Duration = Duration::from_secs(1);

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
    status: crate::domain::BidStatus,
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

/// The body of `POST /api/auctions/{id}/bids`: the amount as sent (a
/// `null` included), judged by [`Amount::from_json`] for the contract's
/// messages.
#[derive(Deserialize)]
pub struct PlaceBid {
    #[serde(default, deserialize_with = "present")]
    amount: Option<Value>,
}

impl PlaceBid {
    fn amount(&self) -> Result<Amount, ApiError> {
        match &self.amount {
            None => Err("is required".to_owned()),
            Some(value) => Amount::from_json(value),
        }
        .map_err(|message| ApiError::Validation(vec![FieldError::new("amount", message)]))
    }
}

/// A field that was sent, `null` included (absent is the `default`).
fn present<'de, D: serde::Deserializer<'de>>(value: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(value).map(Some)
}

/// `POST /api/auctions/{id}/bids`.
pub async fn place(
    State(state): State<AppState>,
    user: User,
    PathId(auction_id): PathId,
    headers: BidHeaders,
    admitted: Option<Extension<QueueWait>>,
    body: Result<JsonBody<PlaceBid>, ApiError>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let queue_wait = admitted.map_or(state.bids.pool_wait(), |Extension(QueueWait(w))| w);
    let auction_id = parse_id(&auction_id, "auction")?;
    let key = headers.key?;
    let JsonBody(body) = body?;
    let amount = body.amount()?;
    let wait = headers.wait;

    let placed = state
        .bids
        .place(
            &user,
            auction_id,
            amount,
            &key,
            // The wait ends before the request's deadline does.
            wait.map(|n| {
                started
                    + Duration::from_secs(n).min(state.request_timeout.saturating_sub(WAIT_MARGIN))
            }),
            queue_wait,
        )
        .await?;
    let status = match (placed.resolved_in_wait, placed.replayed, placed.bid.status) {
        (true, false, _) => StatusCode::CREATED,
        (_, true, status) if status != crate::domain::BidStatus::Pending => StatusCode::OK,
        _ => StatusCode::ACCEPTED,
    };
    let location = format!("/api/bids/{}", placed.bid.id);
    let mut response = (status, Json(BidView::from(placed.bid))).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("valid path"),
    );
    if let Some(position) = placed.wal_position {
        consistency::insert_token(headers, position);
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

/// `GET /api/bids/{id}`: the caller's own bid (any bid for admins).
async fn show(
    State(state): State<AppState>,
    user: User,
    PathId(id): PathId,
    ReadToken(token): ReadToken,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "bid")?;
    let (bid, source) = state
        .reads
        .run(token, |client| Box::pin(crate::db::bids::get(client, id)))
        .await?;
    let mut response = match bid.filter(|b| user.is_admin() || b.bidder_id == user.id.as_str()) {
        Some(bid) => Json(BidView::from(bid)).into_response(),
        None => ApiError::NotFound("bid").into_response(),
    };
    consistency::mark_read(&mut response, &source, token, true);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount_problem(body: &str) -> String {
        let body: PlaceBid = serde_json::from_str(body).unwrap();
        match body.amount() {
            Err(ApiError::Validation(errors)) => errors[0].message.clone(),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn an_absent_amount_is_required_and_a_null_one_is_not_a_number() {
        assert_eq!(amount_problem("{}"), "is required");
        assert_eq!(
            amount_problem(r#"{"amount": null}"#),
            "must be an integer number of minor units"
        );
        let body: PlaceBid = serde_json::from_str(r#"{"amount": 1500, "note": 1}"#).unwrap();
        assert_eq!(body.amount().unwrap().get(), 1_500);
    }
}
