//! The API's one error type: every failure a client can see, rendered as
//! RFC 9457 problem details with a stable `code`. Server-side causes are
//! logged with their chain; clients of a 5xx never see internals.

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One invalid field of a request body.
#[derive(Debug, Clone, Serialize)]
pub struct FieldError {
    /// The field name, as in the request.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Everything the API can answer with instead of success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_request`.
    #[error("{0}")]
    InvalidRequest(String),
    /// 400 `idempotency_key_missing`.
    #[error("the Idempotency-Key header is required")]
    IdempotencyKeyMissing,
    /// 401 `unauthorized`.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403 `forbidden`.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 403 `seller_cannot_bid`.
    #[error("the seller cannot bid on their own auction")]
    SellerCannotBid,
    /// 404 `not_found`.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 405 (no stable code in the contract; reported as `invalid_request`).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 `idempotency_key_in_flight`.
    #[error("a request with this Idempotency-Key is still being processed")]
    IdempotencyKeyInFlight,
    /// 413 `payload_too_large`.
    #[error("request body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request target exceeds {0} bytes")]
    UriTooLong(usize),
    #[error("the request has more than {fields} header fields or {bytes} bytes of headers")]
    HeadersTooLarge { fields: usize, bytes: usize },
    /// 415 `unsupported_media_type`.
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    /// 422 `validation_failed`.
    #[error("the request has invalid fields")]
    Validation(Vec<FieldError>),
    /// 422 `bid_too_low`.
    #[error("the amount is below the minimum bid of {next_min_bid}")]
    BidTooLow {
        /// The minimum known to be in force.
        next_min_bid: i64,
    },
    /// 422 `auction_closed`.
    #[error("the auction is closed")]
    AuctionClosed,
    /// 422 `idempotency_key_reused`.
    #[error("this Idempotency-Key was used for a different request")]
    IdempotencyKeyReused,
    /// 429 `rate_limited`: this bidder is sending too fast.
    #[error("too many bids; retry after {retry_after_s} s")]
    RateLimited {
        /// Seconds until the next bid is allowed.
        retry_after_s: u64,
    },
    /// 503 `overloaded`: shed load now, retry soon.
    #[error("the service is overloaded; retry shortly")]
    Overloaded,
    #[error("the service is overloaded; retry after {retry_after_s} s")]
    Shed { retry_after_s: u64 },
    /// 503 `overloaded`: the request did not finish within its deadline.
    #[error("the request did not finish in time; retry shortly")]
    DeadlineExceeded,
    /// 503 `unavailable`: a dependency is down.
    #[error("the service is temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// 500: a bug or an unexpected failure. Logged, never shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// HTTP status and stable `code`.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            IdempotencyKeyMissing => (StatusCode::BAD_REQUEST, "idempotency_key_missing"),
            Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            SellerCannotBid => (StatusCode::FORBIDDEN, "seller_cannot_bid"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "invalid_request"),
            IdempotencyKeyInFlight => (StatusCode::CONFLICT, "idempotency_key_in_flight"),
            PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            UriTooLong(_) => (StatusCode::URI_TOO_LONG, "invalid_request"),
            HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "invalid_request",
            ),
            UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            BidTooLow { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "bid_too_low"),
            AuctionClosed => (StatusCode::UNPROCESSABLE_ENTITY, "auction_closed"),
            IdempotencyKeyReused => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Overloaded | Shed { .. } | DeadlineExceeded => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
            }
            Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a [FieldError]>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error");
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(error = format!("{cause:#}"), "dependency unavailable");
            }
            _ => {}
        }
        let problem = Problem {
            kind: format!("https://gavel.dev/problems/{code}"),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: self.to_string(),
            code,
            errors: match &self {
                ApiError::Validation(errors) => Some(errors),
                _ => None,
            },
        };
        let body = serde_json::to_vec(&problem).expect("problem serializes");
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::Overloaded | ApiError::DeadlineExceeded | ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::RateLimited { retry_after_s } | ApiError::Shed { retry_after_s } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            _ => {}
        }
        response
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        let wait_timeout = is_wait_timeout(&e);
        ApiError::from_pool(wait_timeout, || e.into())
    }
}

/// A pool failure shared by the requests of one coalesced append.
impl From<Arc<deadpool_postgres::PoolError>> for ApiError {
    fn from(e: Arc<deadpool_postgres::PoolError>) -> Self {
        ApiError::from_pool(is_wait_timeout(&e), || anyhow::Error::new(e))
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        let code = e.code().cloned();
        ApiError::from_database(code.as_ref(), || e.into())
    }
}

/// A statement failure shared by the requests of one coalesced append.
impl From<Arc<tokio_postgres::Error>> for ApiError {
    fn from(e: Arc<tokio_postgres::Error>) -> Self {
        let code = e.code().cloned();
        ApiError::from_database(code.as_ref(), || anyhow::Error::new(e))
    }
}

fn is_wait_timeout(e: &deadpool_postgres::PoolError) -> bool {
    matches!(
        e,
        deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)
    )
}

impl ApiError {
    fn from_pool(wait_timeout: bool, cause: impl FnOnce() -> anyhow::Error) -> Self {
        if wait_timeout {
            // No free connection in time: shed load instead of queueing.
            ApiError::Overloaded
        } else {
            // Connecting took too long, or the server refused: it is down.
            ApiError::Unavailable(cause())
        }
    }

    fn from_database(
        code: Option<&tokio_postgres::error::SqlState>,
        cause: impl FnOnce() -> anyhow::Error,
    ) -> Self {
        use tokio_postgres::error::SqlState;
        match code {
            // statement_timeout / lock_timeout: the database is saturated.
            Some(code)
                if *code == SqlState::QUERY_CANCELED || *code == SqlState::LOCK_NOT_AVAILABLE =>
            {
                ApiError::Overloaded
            }
            // The server is shutting down, restarting, out of resources
            // (class 53) or the connection broke (class 08).
            Some(code)
                if *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CRASH_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW
                    || code.code().starts_with("53")
                    || code.code().starts_with("08") =>
            {
                ApiError::Unavailable(cause())
            }
            // No SQL state: the connection failed or closed.
            None => ApiError::Unavailable(cause()),
            Some(_) => ApiError::Internal(cause()),
        }
    }
}
