//! Turns the application error ([`crate::error::ApiError`]) into RFC 9457
//! problem details: the HTTP status for each `code`, `Retry-After` and
//! `WWW-Authenticate` where they apply. Server-side causes are logged with
//! their chain; clients of a 5xx never see internals.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::{ApiError, FieldError};

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidRequest(_) | IdempotencyKeyMissing => StatusCode::BAD_REQUEST,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Forbidden(_) | SellerCannotBid => StatusCode::FORBIDDEN,
            NotFound(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            IdempotencyKeyInFlight => StatusCode::CONFLICT,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            UriTooLong(_) => StatusCode::URI_TOO_LONG,
            HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Validation(_) | BidTooLow { .. } | AuctionClosed | IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Overloaded | Shed { .. } | DeadlineExceeded | Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
        let (status, code) = (self.status(), self.code());
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
