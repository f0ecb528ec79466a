//! Auction endpoints: create, read (with `ETag`/`If-None-Match`), and the
//! public bid history.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::consistency::{self, ReadToken};
use super::extract::{parse_id, JsonBody, PathId};
use super::AppState;
use crate::auth::{Role, User};
use crate::db::auctions::{self, AuctionRecord, NewAuction};
use crate::db::{bids, reads};
use crate::domain::{mask_user, Amount, MAX_AMOUNT};
use crate::error::{ApiError, FieldError};
use crate::rules::{self, AuctionTerms, IncrementTier, Increments};

/// Longest auction, from start to scheduled end.
const MAX_DURATION_DAYS: i64 = 30;
/// Longest soft-close window.
const MAX_SOFT_CLOSE_S: i64 = 86_400;
/// Default cap on soft-close extensions when `max_end_at` is not sent.
const DEFAULT_MAX_EXTENSION: Duration = Duration::hours(1);

/// The latest instant Gavel accepts, and so ever emits for an auction:
/// RFC 3339 has four-digit years only, and chrono writes a later time as
/// `+10000-01-01T...`, which no RFC 3339 parser reads. Auction times are
/// bounded by it (an auction's `ends_at` only moves up to its `max_end_at`);
/// other emitted times come from the server clock.
const LATEST_TIME: DateTime<Utc> = NaiveDate::from_ymd_opt(9999, 12, 31)
    .expect("a valid date")
    .and_hms_nano_opt(23, 59, 59, 999_999_999)
    .expect("a valid time")
    .and_utc();
/// The earliest instant Gavel accepts: year 0000 is four digits too, but
/// many RFC 3339 parsers (ISO 8601's year 0 is 1 BC) refuse it. Unreachable
/// today (`ends_at` is in the future and at most 30 days after
/// `starts_at`), kept so that no rule change can make it reachable.
const EARLIEST_TIME: DateTime<Utc> = NaiveDate::from_ymd_opt(1, 1, 1)
    .expect("a valid date")
    .and_hms_nano_opt(0, 0, 0, 0)
    .expect("a valid time")
    .and_utc();

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
    let now = Utc::now();
    let view = AuctionView::new(auction, viewer, now);
    let mut response = (status, Json(view)).into_response();
    version_headers(response.headers_mut(), auction.version, now);
    response
}

/// The headers of every auction response, 304 included: the version as a
/// strong `ETag`, `Cache-Control: no-cache` and `Gavel-Server-Time`.
fn version_headers(headers: &mut HeaderMap, version: i64, now: DateTime<Utc>) {
    headers.insert(header::ETAG, etag(version));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(SERVER_TIME, server_time(now));
}

/// `Gavel-Server-Time`: the server's clock, so clients count time left
/// against it rather than their own.
pub const SERVER_TIME: HeaderName = HeaderName::from_static("gavel-server-time");

/// An instant as `Gavel-Server-Time` and `server_time` write it: UTC with
/// exactly three fractional digits.
pub fn format_server_time(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn server_time(now: DateTime<Utc>) -> HeaderValue {
    HeaderValue::from_str(&format_server_time(now)).expect("a time is a valid header value")
}

async fn create(
    State(state): State<AppState>,
    user: User,
    body: Result<JsonBody<CreateAuction>, ApiError>,
) -> Result<Response, ApiError> {
    if !(user.has(Role::Seller) || user.is_admin()) {
        return Err(ApiError::Forbidden(
            "creating an auction needs the seller or admin role",
        ));
    }
    let JsonBody(body) = body?;
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
            version_headers(response.headers_mut(), auction.version, Utc::now());
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
    status: crate::domain::BidStatus,
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

/// The body of `POST /api/auctions`. Each field is kept as sent (absent and
/// `null` alike are `None`) and parsed into its domain type by
/// [`validate_new_auction`], so one response names every invalid field with
/// the contract's message rather than serde's first error.
#[derive(Debug, Default, Deserialize)]
struct CreateAuction {
    title: Option<Value>,
    currency: Option<Value>,
    starting_price: Option<Value>,
    reserve_price: Option<Value>,
    increments: Option<Value>,
    starts_at: Option<Value>,
    ends_at: Option<Value>,
    max_end_at: Option<Value>,
    soft_close_s: Option<Value>,
}

/// Each field of a [`CreateAuction`] parsed on its own: `None` where the
/// field is invalid (its problem recorded), `Some(None)` where an optional
/// field was not sent.
struct Fields {
    title: Option<String>,
    currency: Option<String>,
    starting_price: Option<Amount>,
    reserve_price: Option<Amount>,
    increments: Option<Increments>,
    starts_at: Option<Option<DateTime<Utc>>>,
    ends_at: Option<DateTime<Utc>>,
    max_end_at: Option<Option<DateTime<Utc>>>,
    soft_close_s: Option<i32>,
}

impl Fields {
    fn parse(body: &CreateAuction, errors: &mut Vec<FieldError>) -> Self {
        let reserve_price = body.reserve_price.as_ref().map(Amount::from_json);
        Fields {
            title: check(errors, "title", title(body.title.as_ref())),
            currency: check(errors, "currency", currency(body.currency.as_ref())),
            starting_price: check(
                errors,
                "starting_price",
                required(body.starting_price.as_ref()).and_then(Amount::from_json),
            ),
            reserve_price: check(errors, "reserve_price", reserve_price.transpose()).flatten(),
            increments: check(errors, "increments", increments(body.increments.as_ref())),
            starts_at: check(
                errors,
                "starts_at",
                body.starts_at.as_ref().map(time).transpose(),
            ),
            ends_at: check(
                errors,
                "ends_at",
                required(body.ends_at.as_ref()).and_then(time),
            ),
            max_end_at: check(
                errors,
                "max_end_at",
                body.max_end_at.as_ref().map(time).transpose(),
            ),
            soft_close_s: check(
                errors,
                "soft_close_s",
                soft_close(body.soft_close_s.as_ref()),
            ),
        }
    }
}

/// Checks every field of a create-auction body, then the rules between
/// fields, reporting all problems at once.
fn validate_new_auction(
    body: &CreateAuction,
    seller_id: &str,
    now: DateTime<Utc>,
) -> Result<NewAuction, ApiError> {
    let mut errors = Vec::new();
    let f = Fields::parse(body, &mut errors);
    // An invalid starts_at is reported on its own: ends_at is not also
    // measured against a start the client did not ask for.
    let starts_at_known = f.starts_at.is_some();
    let starts_at = f.starts_at.flatten().unwrap_or(now);
    if let (Some(start), Some(reserve)) = (f.starting_price, f.reserve_price) {
        if reserve.get() < start.get() {
            check(
                &mut errors,
                "reserve_price",
                Err::<(), _>("must be at least starting_price".into()),
            );
        }
    }
    let mut ends_at_ok = f.ends_at.is_some();
    if let Some(problem) = f
        .ends_at
        .and_then(|e| ends_at_problem(e, starts_at_known.then_some(starts_at), now))
    {
        ends_at_ok = false;
        check(&mut errors, "ends_at", Err::<(), _>(problem));
    }
    let max_end_at = extension_cap(
        &mut errors,
        f.ends_at,
        ends_at_ok,
        f.max_end_at,
        f.soft_close_s,
    );
    let (
        Some(title),
        Some(currency),
        Some(starting_price),
        Some(increments),
        Some(ends_at),
        Some(soft_close_s),
        Some(max_end_at),
    ) = (
        f.title,
        f.currency,
        f.starting_price,
        f.increments,
        f.ends_at,
        f.soft_close_s,
        max_end_at,
    )
    else {
        return Err(ApiError::Validation(errors));
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    Ok(NewAuction {
        id: Uuid::now_v7(),
        title,
        currency,
        terms: AuctionTerms {
            seller_id: seller_id.to_owned(),
            starting_price: starting_price.get(),
            reserve_price: f.reserve_price.map(Amount::get),
            increments,
            starts_at,
            soft_close: Duration::seconds(i64::from(soft_close_s)),
            max_end_at,
        },
        ends_at,
        soft_close_s,
    })
}

/// Why `ends_at` is refused against the start the client sent (if any)
/// and the clock, if it is.
fn ends_at_problem(
    ends_at: DateTime<Utc>,
    starts_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<String> {
    match starts_at {
        Some(start) if ends_at <= start => Some("must be after starts_at".to_owned()),
        Some(start) if ends_at > start + Duration::days(MAX_DURATION_DAYS) => Some(format!(
            "must be at most {MAX_DURATION_DAYS} days after starts_at"
        )),
        _ if ends_at <= now => Some("must be in the future".to_owned()),
        _ => None,
    }
}

/// The cap on soft-close extensions: `max_end_at` as sent (`Some(None)`
/// when not sent, `None` when sent but invalid), else `ends_at` + 1 hour
/// with soft close on, else `ends_at`; `None` with the problem recorded
/// when refused.
fn extension_cap(
    errors: &mut Vec<FieldError>,
    ends_at: Option<DateTime<Utc>>,
    ends_at_ok: bool,
    max_end_at: Option<Option<DateTime<Utc>>>,
    soft_close_s: Option<i32>,
) -> Option<DateTime<Utc>> {
    match (ends_at, max_end_at) {
        // Sent but invalid (reported): no default is put in its place.
        (_, None) | (None, _) => None,
        (Some(ends_at), Some(Some(max))) if max < ends_at => {
            check(
                errors,
                "max_end_at",
                Err::<(), _>("must not be before ends_at".into()),
            );
            None
        }
        (Some(_), Some(Some(max))) => Some(max),
        (Some(ends_at), Some(None)) if soft_close_s.is_some_and(|s| s > 0) => {
            let max = ends_at
                .checked_add_signed(DEFAULT_MAX_EXTENSION)
                .filter(|max| *max <= LATEST_TIME);
            // Named on `ends_at`, the value the client sent that causes it
            // (the client did not send `max_end_at`); the message names
            // both ways out. Not repeated when `ends_at` is already refused.
            if max.is_none() && ends_at_ok {
                check(
                    errors,
                    "ends_at",
                    Err::<(), _>(
                        "with soft_close_s set and no max_end_at, the default \
                         max_end_at (ends_at + 1 hour) would pass year 9999; \
                         send an earlier ends_at or an explicit max_end_at"
                            .into(),
                    ),
                );
            }
            max
        }
        (Some(ends_at), Some(None)) => Some(ends_at),
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
    value.ok_or_else(|| "is required".to_owned())
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

/// An RFC 3339 time whose UTC form is RFC 3339 too: an offset may carry a
/// time of 9999-12-31 past the end of year 9999 in UTC (or 0001-01-01 back
/// before year 1), which Gavel could not write back.
fn time(value: &Value) -> Result<DateTime<Utc>, String> {
    let time = value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| "must be an RFC 3339 time".to_owned())?;
    if time > LATEST_TIME {
        Err("must be before year 10000 in UTC (RFC 3339 has four-digit years)".into())
    } else if time < EARLIEST_TIME {
        Err("must not be before year 0001 in UTC".into())
    } else {
        Ok(time)
    }
}

fn soft_close(value: Option<&Value>) -> Result<i32, String> {
    match value {
        None => Ok(0),
        Some(v) => v
            .as_i64()
            .filter(|s| (0..=MAX_SOFT_CLOSE_S).contains(s))
            .map(|s| s as i32)
            .ok_or_else(|| format!("must be an integer from 0 to {MAX_SOFT_CLOSE_S}")),
    }
}

fn increments(value: Option<&Value>) -> Result<Increments, String> {
    let Some(value) = value else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(times: Value) -> CreateAuction {
        let mut body = json!({"title": "Lance", "currency": "GLD", "starting_price": 100});
        for (k, v) in times.as_object().unwrap() {
            body[k] = v.clone();
        }
        serde_json::from_value(body).unwrap()
    }

    fn fields(result: Result<NewAuction, ApiError>) -> Vec<(String, String)> {
        match result {
            Err(ApiError::Validation(errors)) => {
                errors.into_iter().map(|e| (e.field, e.message)).collect()
            }
            Err(other) => panic!("not a validation error: {other:?}"),
            Ok(_) => panic!("accepted"),
        }
    }

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().to_utc()
    }

    #[test]
    fn server_time_has_exactly_three_fractional_digits() {
        assert_eq!(
            format_server_time(at("2026-11-25T11:59:41.25Z")),
            "2026-11-25T11:59:41.250Z"
        );
        assert_eq!(
            format_server_time(at("2026-11-25T11:59:41+01:00")),
            "2026-11-25T10:59:41.000Z"
        );
    }

    #[test]
    fn latest_and_earliest_times() {
        assert_eq!(
            LATEST_TIME.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            "9999-12-31T23:59:59.999999999Z"
        );
        assert_eq!(
            EARLIEST_TIME.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "0001-01-01T00:00:00Z"
        );
    }

    #[test]
    fn times_past_year_9999_are_refused_by_field() {
        let now = at("9999-12-15T00:00:00Z");
        // Via an offset, each of the three fields.
        for field in ["starts_at", "ends_at", "max_end_at"] {
            let mut times = json!({
                "starts_at": "9999-12-20T00:00:00Z",
                "ends_at": "9999-12-31T00:00:00Z",
                "max_end_at": "9999-12-31T12:00:00Z",
                "soft_close_s": 30,
            });
            times[field] = json!("9999-12-31T23:30:00-01:00");
            let errors = fields(validate_new_auction(&body(times), "s", now));
            assert_eq!(errors.len(), 1, "{field}: {errors:?}");
            assert_eq!(errors[0].0, field, "{errors:?}");
            assert!(errors[0].1.contains("year 10000"), "{errors:?}");
        }
        // Year 10000 itself is not RFC 3339.
        let errors = fields(validate_new_auction(
            &body(json!({"starts_at": "9999-12-20T00:00:00Z", "ends_at": "10000-01-01T00:00:00Z"})),
            "s",
            now,
        ));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, "ends_at");
    }

    #[test]
    fn a_default_max_end_at_past_year_9999_names_ends_at() {
        let now = at("9999-12-15T00:00:00Z");
        let errors = fields(validate_new_auction(
            &body(json!({"ends_at": "9999-12-31T23:59:59Z", "soft_close_s": 30})),
            "s",
            now,
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, "ends_at");
        assert!(errors[0].1.contains("max_end_at"), "{errors:?}");

        // An invalid max_end_at is reported alone: no default replaces it.
        let errors = fields(validate_new_auction(
            &body(
                json!({"ends_at": "9999-12-31T23:59:59Z", "soft_close_s": 30, "max_end_at": "10000-01-01T00:00:00Z"}),
            ),
            "s",
            now,
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, "max_end_at");

        // An ends_at refused for another reason is reported once.
        let errors = fields(validate_new_auction(
            &body(
                json!({"starts_at": "9999-12-31T23:59:59Z", "ends_at": "9999-12-31T23:59:59Z", "soft_close_s": 30}),
            ),
            "s",
            now,
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, "ends_at");
    }

    #[test]
    fn the_last_representable_times_are_accepted() {
        let now = at("9999-12-15T00:00:00Z");
        // The default max_end_at lands on the last second.
        let new = validate_new_auction(
            &body(json!({"ends_at": "9999-12-31T22:59:59Z", "soft_close_s": 30})),
            "s",
            now,
        )
        .unwrap();
        assert_eq!(new.terms.max_end_at, at("9999-12-31T23:59:59Z"));
        // Hard close: max_end_at is ends_at.
        let new = validate_new_auction(&body(json!({"ends_at": "9999-12-31T23:59:59Z"})), "s", now)
            .unwrap();
        assert_eq!(new.terms.max_end_at, at("9999-12-31T23:59:59Z"));
        // An explicit max_end_at at the last instant.
        let new = validate_new_auction(
            &body(json!({
                "ends_at": "9999-12-31T23:59:59Z",
                "soft_close_s": 30,
                "max_end_at": "9999-12-31T23:59:59.999999999Z",
            })),
            "s",
            now,
        )
        .unwrap();
        assert_eq!(new.terms.max_end_at, LATEST_TIME);
    }
}
