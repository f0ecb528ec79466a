//! Gavel's one application error type: every failure a caller can see,
//! with the stable `code` of the API contract. The data access, bid path
//! and reads return it; only the HTTP layer ([`crate::http::error`]) turns
//! it into a response.

use std::sync::Arc;

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
    /// The stable `code` of the API contract.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidRequest(_) | MethodNotAllowed | UriTooLong(_) | HeadersTooLarge { .. } => {
                "invalid_request"
            }
            IdempotencyKeyMissing => "idempotency_key_missing",
            Unauthorized(_) => "unauthorized",
            Forbidden(_) => "forbidden",
            SellerCannotBid => "seller_cannot_bid",
            NotFound(_) => "not_found",
            IdempotencyKeyInFlight => "idempotency_key_in_flight",
            PayloadTooLarge(_) => "payload_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            Validation(_) => "validation_failed",
            BidTooLow { .. } => "bid_too_low",
            AuctionClosed => "auction_closed",
            IdempotencyKeyReused => "idempotency_key_reused",
            RateLimited { .. } => "rate_limited",
            Overloaded | Shed { .. } | DeadlineExceeded => "overloaded",
            Unavailable(_) => "unavailable",
            Internal(_) => "internal",
        }
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
