//! Auction endpoints: create, read (with `ETag`/`If-None-Match`), and the
//! public bid history.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::consistency::{self, ReadToken};
use super::error::{ApiError, FieldError};
use super::extract::{parse_id, JsonObject, PathId};
use super::AppState;
use crate::auth::{Role, User};
use crate::db::auctions::{self, AuctionRecord, NewAuction};
use crate::db::{bids, reads};
use crate::domain::{mask_user, Amount, MAX_AMOUNT};
use crate::rules::{self, AuctionTerms, IncrementTier, Increments};

/// Longest auction, from start to scheduled end.
const MAX_DURATION_DAYS: i64 = 30;
/// Longest soft-close window.
const MAX_SOFT_CLOSE_S: i64 = 86_400;

/// Routes under `/api/auctions`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/auctions", post(create))
        .route("/api/auctions/{id}", get(show))
        .route(
            "/api/auctions/{id}/bids",
            get(history).post(super::bids::place),
        )
}

/// The public view of an auction.
#[derive(Debug, Serialize)]
pub struct AuctionView {
    id: Uuid,
    title: String,
    seller_id: String,
    currency: String,
    starting_price: i64,
    reserve_price_met: Option<bool>,
    increments: Vec<IncrementTier>,
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    soft_close_s: i32,
    max_end_at: DateTime<Utc>,
    status: &'static str,
    current_price: Option<i64>,
    leading_bidder: Option<String>,
    bid_count: i64,
    next_min_bid: i64,
    winner_id: Option<String>,
    version: i64,
}

impl AuctionView {
    /// The view of `auction` as `viewer` may see it, at server time `now`.
    pub fn new(auction: &AuctionRecord, viewer: &User, now: DateTime<Utc>) -> Self {
        let terms = &auction.terms;
        let state = &auction.state;
        let privileged = viewer.is_admin() || viewer.id.as_str() == terms.seller_id;
        let status = if state.closed {
            "closed"
        } else if now < terms.starts_at {
            "scheduled"
        } else {
            "open"
        };
        let winner_id = auction.winner_id.as_ref().map(|winner| {
            if privileged || viewer.id.as_str() == winner {
                winner.clone()
            } else {
                mask_user(winner)
            }
        });
        AuctionView {
            id: auction.id,
            title: auction.title.clone(),
            seller_id: terms.seller_id.clone(),
            currency: auction.currency.clone(),
            starting_price: terms.starting_price,
            reserve_price_met: rules::reserve_met(terms, state),
            increments: terms.increments.tiers().to_vec(),
            starts_at: terms.starts_at,
            ends_at: state.ends_at,
            soft_close_s: auction.soft_close_s,
            max_end_at: terms.max_end_at,
            status,
            current_price: state.price,
            leading_bidder: state.leader.as_ref().map(|l| {
                if privileged {
                    l.bidder_id.clone()
                } else {
                    mask_user(&l.bidder_id)
                }
            }),
            bid_count: state.bid_count,
            next_min_bid: rules::next_min_bid(terms, state),
            winner_id,
            version: auction.version,
        }
    }
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("a number is a valid header value")
}

fn auction_response(status: StatusCode, auction: &AuctionRecord, viewer: &User) -> Response {
    let view = AuctionView::new(auction, viewer, Utc::now());
    let mut response = (status, Json(view)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag(auction.version));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn create(
    State(state): State<AppState>,
    user: User,
    body: Result<JsonObject, ApiError>,
) -> Result<Response, ApiError> {
    if !(user.has(Role::Seller) || user.is_admin()) {
        return Err(ApiError::Forbidden(
            "creating an auction needs the seller or admin role",
        ));
    }
    let JsonObject(body) = body?;
    let new = validate_new_auction(&body, user.id.as_str(), Utc::now())?;
    let client = state.pools.api.get().await?;
    let auction = auctions::insert(&client, &new).await?;
    // The seller's next read must find the auction, even on a replica.
    let position = reads::wal_position(&client).await.ok();
    drop(client);
    let mut response = auction_response(StatusCode::CREATED, &auction, &user);
    let location = HeaderValue::from_str(&format!("/api/auctions/{}", auction.id))
        .expect("a path is a valid header value");
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, location);
    if let Some(position) = position {
        consistency::insert_token(headers, position);
    }
    Ok(response)
}

async fn show(
    State(state): State<AppState>,
    user: User,
    PathId(id): PathId,
    ReadToken(token): ReadToken,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "auction")?;
    let (auction, source) = state.auction_views.get(id, token).await?;
    let mut response = match auction {
        None => ApiError::NotFound("auction").into_response(),
        Some(auction) if if_none_match(&headers, auction.version) => {
            let mut response = StatusCode::NOT_MODIFIED.into_response();
            let headers = response.headers_mut();
            headers.insert(header::ETAG, etag(auction.version));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
        Some(auction) => auction_response(StatusCode::OK, &auction, &user),
    };
    consistency::mark_read(&mut response, &source, token, false);
    Ok(response)
}

/// Whether `If-None-Match` names the current version (weak comparison, as
/// RFC 9110 asks for this header).
fn if_none_match(headers: &HeaderMap, version: i64) -> bool {
    let current = format!("\"{version}\"");
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == current)
}

#[derive(Deserialize)]
struct HistoryParams {
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Serialize)]
struct HistoryItem {
    id: Uuid,
    amount_shown: Option<i64>,
    bidder: String,
    received_at: DateTime<Utc>,
    status: String,
}

#[derive(Serialize)]
struct HistoryPage {
    items: Vec<HistoryItem>,
    next_cursor: Option<String>,
}

async fn history(
    State(state): State<AppState>,
    _user: User,
    PathId(id): PathId,
    ReadToken(token): ReadToken,
    params: Result<Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "auction")?;
    let Query(params) = params.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = match params.limit.as_deref() {
        None => 50,
        Some(raw) => match raw.parse::<i64>() {
            Ok(n) if (1..=200).contains(&n) => n,
            _ => {
                return Err(ApiError::InvalidRequest(
                    "limit must be an integer from 1 to 200".into(),
                ))
            }
        },
    };
    let before = params.cursor.as_deref().map(decode_cursor).transpose()?;
    let (rows, source) = state
        .reads
        .run(token, |client| {
            Box::pin(async move {
                match auctions::get(client, id).await? {
                    None => Ok(None),
                    Some(_) => bids::history(client, id, before, limit).await.map(Some),
                }
            })
        })
        .await?;
    let mut response = match rows {
        None => ApiError::NotFound("auction").into_response(),
        Some(rows) => Json(history_page(rows, limit)).into_response(),
    };
    consistency::mark_read(&mut response, &source, token, false);
    Ok(response)
}

/// A page of the public history; a full page links to the next one.
fn history_page(rows: Vec<bids::BidRecord>, limit: i64) -> HistoryPage {
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|b| encode_cursor(b.seq)))
        .flatten();
    let items = rows
        .into_iter()
        .map(|b| HistoryItem {
            id: b.id,
            amount_shown: b.price_after,
            bidder: mask_user(&b.bidder_id),
            received_at: b.received_at,
            status: b.status,
        })
        .collect();
    HistoryPage { items, next_cursor }
}

fn encode_cursor(seq: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("seq:{seq}"))
}

fn decode_cursor(cursor: &str) -> Result<i64, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|s| s.strip_prefix("seq:").and_then(|n| n.parse().ok()))
        .ok_or_else(|| ApiError::InvalidRequest("cursor is not valid".into()))
}

/// Checks every field of a create-auction body, reporting all problems at once.
fn validate_new_auction(
    body: &Map<String, Value>,
    seller_id: &str,
    now: DateTime<Utc>,
) -> Result<NewAuction, ApiError> {
    let mut errors = Vec::new();

    let title = check(&mut errors, "title", title(body.get("title")));
    let currency = check(&mut errors, "currency", currency(body.get("currency")));
    let starting_price = check(
        &mut errors,
        "starting_price",
        required(body.get("starting_price")).and_then(Amount::from_json),
    );
    let reserve_price = check(
        &mut errors,
        "reserve_price",
        optional(body.get("reserve_price"))
            .map(Amount::from_json)
            .transpose(),
    )
    .flatten();
    let increments = check(
        &mut errors,
        "increments",
        increments(body.get("increments")),
    );
    let starts_at = check(
        &mut errors,
        "starts_at",
        optional(body.get("starts_at")).map(time).transpose(),
    )
    .flatten();
    let ends_at = check(
        &mut errors,
        "ends_at",
        required(body.get("ends_at")).and_then(time),
    );
    let max_end_at = check(
        &mut errors,
        "max_end_at",
        optional(body.get("max_end_at")).map(time).transpose(),
    )
    .flatten();
    let soft_close_s = check(
        &mut errors,
        "soft_close_s",
        soft_close(body.get("soft_close_s")),
    );

    let starts_at = starts_at.unwrap_or(now);
    if let (Some(start), Some(reserve)) = (starting_price, reserve_price) {
        if reserve.get() < start.get() {
            check(
                &mut errors,
                "reserve_price",
                Err::<(), _>("must be at least starting_price".into()),
            );
        }
    }
    if let Some(ends_at) = ends_at {
        let problem = if ends_at <= starts_at {
            Some("must be after starts_at".to_owned())
        } else if ends_at > starts_at + Duration::days(MAX_DURATION_DAYS) {
            Some(format!(
                "must be at most {MAX_DURATION_DAYS} days after starts_at"
            ))
        } else if ends_at <= now {
            Some("must be in the future".to_owned())
        } else {
            None
        };
        if let Some(problem) = problem {
            check(&mut errors, "ends_at", Err::<(), _>(problem));
        }
    }
    let max_end_at = match (ends_at, max_end_at) {
        (Some(ends_at), Some(max)) if max < ends_at => {
            check(
                &mut errors,
                "max_end_at",
                Err::<(), _>("must not be before ends_at".into()),
            );
            None
        }
        (Some(_), Some(max)) => Some(max),
        (Some(ends_at), None) if soft_close_s.is_some_and(|s| s > 0) => {
            Some(ends_at + Duration::hours(1))
        }
        (Some(ends_at), None) => Some(ends_at),
        (None, _) => None,
    };

    match (
        title,
        currency,
        starting_price,
        increments,
        ends_at,
        soft_close_s,
        max_end_at,
    ) {
        (
            Some(title),
            Some(currency),
            Some(starting_price),
            Some(increments),
            Some(ends_at),
            Some(soft_close_s),
            Some(max_end_at),
        ) if errors.is_empty() => Ok(NewAuction {
            id: Uuid::now_v7(),
            title,
            currency,
            terms: AuctionTerms {
                seller_id: seller_id.to_owned(),
                starting_price: starting_price.get(),
                reserve_price: reserve_price.map(Amount::get),
                increments,
                starts_at,
                soft_close: Duration::seconds(i64::from(soft_close_s)),
                max_end_at,
            },
            ends_at,
            soft_close_s,
        }),
        _ => Err(ApiError::Validation(errors)),
    }
}

/// Keeps a field's value, or records why it is invalid.
fn check<T>(errors: &mut Vec<FieldError>, field: &str, result: Result<T, String>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(message) => {
            errors.push(FieldError::new(field, message));
            None
        }
    }
}

fn required(value: Option<&Value>) -> Result<&Value, String> {
    optional(value).ok_or_else(|| "is required".to_owned())
}

fn optional(value: Option<&Value>) -> Option<&Value> {
    value.filter(|v| !v.is_null())
}

fn title(value: Option<&Value>) -> Result<String, String> {
    match required(value)? {
        Value::String(t) if t.chars().any(char::is_control) => {
            Err("must not contain control characters".into())
        }
        Value::String(t) if (1..=200).contains(&t.chars().count()) => Ok(t.clone()),
        _ => Err("must be a string of 1 to 200 characters".into()),
    }
}

fn currency(value: Option<&Value>) -> Result<String, String> {
    match required(value)? {
        Value::String(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) => {
            Ok(c.clone())
        }
        _ => Err("must be 3 uppercase letters".into()),
    }
}

fn time(value: &Value) -> Result<DateTime<Utc>, String> {
    value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| "must be an RFC 3339 time".into())
}

fn soft_close(value: Option<&Value>) -> Result<i32, String> {
    match optional(value) {
        None => Ok(0),
        Some(v) => v
            .as_i64()
            .filter(|s| (0..=MAX_SOFT_CLOSE_S).contains(s))
            .map(|s| s as i32)
            .ok_or_else(|| format!("must be an integer from 0 to {MAX_SOFT_CLOSE_S}")),
    }
}

fn increments(value: Option<&Value>) -> Result<Increments, String> {
    let Some(value) = optional(value) else {
        return Ok(Increments::default_table());
    };
    let tiers: Vec<IncrementTier> = serde_json::from_value(value.clone())
        .map_err(|_| "must be an array of {\"from\": integer, \"step\": integer}".to_owned())?;
    if tiers
        .iter()
        .any(|t| t.from > MAX_AMOUNT || t.step > MAX_AMOUNT)
    {
        return Err(format!("from and step must be at most {MAX_AMOUNT}"));
    }
    Increments::new(tiers)
}
