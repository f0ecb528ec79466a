//! One delivery attempt: the event POSTed to its URL with the Standard
//! Webhooks headers, signed at this attempt's time, within the attempt's
//! time limit, redirects not followed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::db::webhooks::Delivery;
use crate::domain::WebhookSecret;

/// How long one attempt may take, connecting included (the contract's 10 s).
pub const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);

/// The HTTP client of the deliveries: no redirects, no proxies, the
/// attempt's time limit, at most `per_host` idle connections per receiver.
pub fn client(per_host: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(ATTEMPT_LIMIT)
        .connect_timeout(ATTEMPT_LIMIT)
        .pool_max_idle_per_host(per_host)
        .user_agent(concat!("gavel-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Posts `delivery`; `Ok` when the receiver answered 2xx, else why not.
pub async fn post(
    http: &reqwest::Client,
    secret: &WebhookSecret,
    delivery: &Delivery,
) -> Result<(), String> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let signature = secret.sign(&delivery.event_id, timestamp, delivery.body.as_bytes());
    let answer = http
        .post(&delivery.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &delivery.event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(delivery.body.clone())
        .send()
        .await;
    // The answer's body is never read: only its status matters.
    match answer {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("HTTP {}", response.status().as_u16())),
        Err(e) if e.is_timeout() => Err(format!("no answer within {ATTEMPT_LIMIT:?}")),
        // Without the URL, which may carry credentials.
        Err(e) => Err(error_chain(&e.without_url())),
    }
}

/// An error with its causes, on one line, at most 300 characters.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text.chars().take(300).collect()
}
