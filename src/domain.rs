//! Domain values with parse constructors: a value of these types has already
//! passed the contract's checks, so handlers and queries never re-validate.
//! A bid's status and what a resolved outcome writes are in [`bid_status`];
//! the webhook secret and its signatures in [`webhook_secret`].

use std::fmt;

pub mod bid_status;
pub mod webhook_secret;

pub use bid_status::BidStatus;
pub use webhook_secret::WebhookSecret;

/// Largest accepted amount in minor units (the API accepts `1 <= amount <= 10^15`).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// An amount of money in minor units, `1..=10^15`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(i64);

impl Amount {
    /// Accepts `1..=10^15`; the message says why a value is refused.
    pub fn parse(value: i64) -> Result<Self, String> {
        if value < 1 {
            Err("must be at least 1".into())
        } else if value > MAX_AMOUNT {
            Err(format!("must be at most {MAX_AMOUNT}"))
        } else {
            Ok(Amount(value))
        }
    }

    /// Parses a JSON value that must be an integer (no floats, no strings).
    pub fn from_json(value: &serde_json::Value) -> Result<Self, String> {
        match value {
            serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(v), _) => Amount::parse(v),
                (None, Some(_)) => Err(format!("must be at most {MAX_AMOUNT}")),
                (None, None) => Err("must be an integer number of minor units".into()),
            },
            _ => Err("must be an integer number of minor units".into()),
        }
    }

    /// The value in minor units.
    pub fn get(self) -> i64 {
        self.0
    }
}

/// A client-chosen idempotency key: 1..=255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Accepts 1..=255 characters in `!`..=`~`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 255 {
            return Err("Idempotency-Key must be 1 to 255 characters".into());
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("Idempotency-Key must be visible ASCII characters".into());
        }
        Ok(IdempotencyKey(raw.to_owned()))
    }

    /// The key as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A user id taken from a token's `sub`: 1..=64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    /// Accepts 1..=64 characters without control characters.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let chars = raw.chars().count();
        if chars == 0 || chars > 64 {
            return Err("sub must be 1 to 64 characters".into());
        }
        if raw.chars().any(char::is_control) {
            return Err("sub must not contain control characters".into());
        }
        Ok(UserId(raw.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Masks a user id for public display: first and last character around
/// `***`; ids of three characters or fewer show only the first.
pub fn mask_user(id: &str) -> String {
    let mut chars = id.chars();
    match (chars.next(), id.chars().count()) {
        (Some(first), n) if n > 3 => format!("{first}***{}", chars.next_back().unwrap_or(first)),
        (Some(first), _) => format!("{first}***"),
        (None, _) => "***".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amount_bounds() {
        assert!(Amount::parse(0).is_err());
        assert!(Amount::parse(-5).is_err());
        assert_eq!(Amount::parse(1).unwrap().get(), 1);
        assert_eq!(Amount::parse(MAX_AMOUNT).unwrap().get(), MAX_AMOUNT);
        assert!(Amount::parse(MAX_AMOUNT + 1).is_err());
    }

    #[test]
    fn amount_from_json_refuses_non_integers() {
        assert_eq!(Amount::from_json(&json!(1300)).unwrap().get(), 1300);
        for bad in [
            json!(1300.0),
            json!(1.5),
            json!("1300"),
            json!(null),
            json!(true),
            json!([1]),
        ] {
            assert!(Amount::from_json(&bad).is_err(), "{bad}");
        }
        assert!(Amount::from_json(&json!(u64::MAX)).is_err());
        assert!(Amount::from_json(&json!(10_000_000_000_000_000_i64)).is_err());
    }

    #[test]
    fn idempotency_key_bounds() {
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("a b").is_err());
        assert!(IdempotencyKey::parse("é").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse("0193a1b2-key!~").is_ok());
    }

    #[test]
    fn user_id_bounds_and_masking() {
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse(&"u".repeat(65)).is_err());
        assert!(UserId::parse("a\nb").is_err());
        assert_eq!(UserId::parse("alice").unwrap().as_str(), "alice");
        assert_eq!(mask_user("alice"), "a***e");
        assert_eq!(mask_user("x"), "x***");
        assert_eq!(mask_user("ab"), "a***");
        assert_eq!(mask_user("bob"), "b***");
        assert_eq!(mask_user(""), "***");
    }
}
