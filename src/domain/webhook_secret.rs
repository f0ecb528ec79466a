//! The webhook signing secret (`GAVEL_WEBHOOK_SECRET`) and the Standard
//! Webhooks v1 signature it makes: `v1,` + base64 of HMAC-SHA256, keyed
//! with the secret's decoded bytes, over `{id}.{timestamp}.{body}`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A webhook secret: `whsec_` and standard base64 of 24 to 64 bytes.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    /// Accepts `whsec_<base64 of 24..=64 bytes>`; the message says why not.
    pub fn parse(text: &str) -> Result<Self, String> {
        let encoded = text
            .strip_prefix("whsec_")
            .ok_or("must start with whsec_")?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| "must be whsec_ followed by standard base64")?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "must encode 24 to 64 bytes (it encodes {})",
                key.len()
            ));
        }
        Ok(WebhookSecret(key))
    }

    /// The `webhook-signature` of `body` sent as `id` at `timestamp`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_webhooks_example_signs_as_its_reference_libraries() {
        // The example of the Standard Webhooks specification's libraries.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_malformed_secret_is_refused_with_the_reason() {
        for (text, why) in [
            ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_"),
            ("whsec_not base64!", "base64"),
            ("whsec_c2hvcnQ=", "24 to 64"),
            (&format!("whsec_{}", STANDARD.encode([7u8; 65])), "24 to 64"),
        ] {
            let e = WebhookSecret::parse(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        assert!(WebhookSecret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 24]))).is_ok());
    }
}
