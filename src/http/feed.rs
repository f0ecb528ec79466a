//! `GET /api/events`: the marketplace's admin feed of events (API.md
//! "Events for the marketplace"), read by [`crate::marketplace::Feed`].
//! Outside the request deadline, like the event streams: `Prefer: wait`
//! may hold a page open for up to 30 s, holding no database connection.

use std::time::Duration;

use axum::extract::Query;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};

use super::extract::prefer_wait_up_to;
use super::AppState;
use crate::auth::User;
use crate::error::ApiError;
use crate::marketplace::{Cursor, Event, Feed, MAX_LIMIT, MAX_WAIT_S};

/// Events in a page when `limit` is not given.
const DEFAULT_LIMIT: i64 = 100;

/// The feed's route, reading the log through the API pool and woken by
/// the process's signals.
pub fn router(state: &AppState) -> Router<AppState> {
    let feed = Feed::new(state.pools.api.clone(), state.signals.clone());
    Router::new()
        .route("/api/events", get(list))
        .layer(Extension(feed))
}

/// The query as sent: both parameters are checked by hand for the
/// contract's messages.
#[derive(Deserialize)]
struct FeedQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// A page of the feed.
#[derive(Serialize)]
struct FeedView {
    items: Vec<Event>,
    next_cursor: String,
}

/// `GET /api/events?after=&limit=`.
async fn list(
    Extension(feed): Extension<Feed>,
    user: User,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<FeedView>, ApiError> {
    if !user.is_admin() {
        return Err(ApiError::Forbidden("the event feed is for admins"));
    }
    let Query(query) =
        query.map_err(|_| ApiError::InvalidRequest("the query string is malformed".into()))?;
    let limit = parse_limit(query.limit.as_deref())?;
    let after = match query.after.as_deref() {
        None => None,
        Some(text) => Some(Cursor::decode(text).ok_or_else(|| {
            ApiError::InvalidRequest("after must be a next_cursor of this feed".into())
        })?),
    };
    let wait = Duration::from_secs(prefer_wait_up_to(&headers, MAX_WAIT_S).unwrap_or(0));
    let page = feed.page(after, limit, wait).await?;
    Ok(Json(FeedView {
        items: page.items,
        next_cursor: page.next.encode(),
    }))
}

/// `limit`: 1..=1000, 100 when absent.
fn parse_limit(raw: Option<&str>) -> Result<i64, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    match raw.parse::<i64>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(ApiError::InvalidRequest(format!(
            "limit must be an integer in 1..={MAX_LIMIT}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_one_to_a_thousand_and_a_hundred_by_default() {
        assert_eq!(parse_limit(None).unwrap(), 100);
        assert_eq!(parse_limit(Some("1")).unwrap(), 1);
        assert_eq!(parse_limit(Some("1000")).unwrap(), 1000);
        for bad in ["0", "1001", "-1", "ten", "", "1.5"] {
            assert!(parse_limit(Some(bad)).is_err(), "{bad}");
        }
    }
}
