//! Bad input against the real server, as one table over the contract's
//! problem codes: every refusal is RFC 9457 problem details with the right
//! status and `code`, carries the security headers, and is never a 5xx.

use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use gavel::auth::{JwtKeys, Role};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::HeaderValue;
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// One request and the problem it must produce.
struct Case {
    name: String,
    method: Method,
    path: String,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
    /// For `validation_failed`: the fields `errors` must name (exactly).
    fields: Vec<&'static str>,
}

impl Case {
    fn new(name: impl Into<String>, method: Method, path: impl Into<String>) -> Self {
        Case {
            name: name.into(),
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
            status: 0,
            code: "",
            fields: Vec::new(),
        }
    }

    /// Sets (replaces) a header; the value may be any bytes.
    fn header(mut self, name: &'static str, value: impl AsRef<[u8]>) -> Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name, value.as_ref().to_vec()));
        self
    }

    /// Adds one more field of a header, keeping any already set.
    fn also(mut self, name: &'static str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name, value.as_ref().to_vec()));
        self
    }

    fn without(mut self, name: &str) -> Self {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    fn auth(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.body = Some(body.as_ref().to_vec());
        self
    }

    fn json(self, body: impl AsRef<[u8]>) -> Self {
        self.header("content-type", "application/json").body(body)
    }

    fn expect(mut self, status: u16, code: &'static str) -> Self {
        self.status = status;
        self.code = code;
        self
    }

    fn fields(mut self, fields: &[&'static str]) -> Self {
        self.fields = fields.to_vec();
        self
    }
}

async fn send(app: &TestApp, case: &Case) -> Response {
    let mut request = app.http.request(case.method.clone(), app.url(&case.path));
    for (name, value) in &case.headers {
        request = request.header(
            *name,
            HeaderValue::from_bytes(value).expect("test header value"),
        );
    }
    if let Some(body) = &case.body {
        request = request.body(body.clone());
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: request failed: {e}", case.name))
}

/// The headers every response carries (the API contract's conventions).
fn assert_common_headers(what: &str, response: &Response) {
    let headers = response.headers();
    let header = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("{what}: missing {name}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_contract_headers(what, header);
}

/// Checks one response against its case; returns the problem body.
async fn assert_problem(case: &Case, response: Response) -> Value {
    let what = &case.name;
    let status = response.status();
    assert!(!status.is_server_error(), "{what}: a 5xx ({status})");
    assert_common_headers(what, &response);
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let www_authenticate = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    assert_eq!(status.as_u16(), case.status, "{what}: status (body {text})");
    assert_eq!(
        content_type.as_deref(),
        Some("application/problem+json"),
        "{what}: content type"
    );
    if status == StatusCode::UNAUTHORIZED {
        assert_eq!(
            www_authenticate.as_deref(),
            Some("Bearer"),
            "{what}: WWW-Authenticate"
        );
    }
    let problem: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {text}"));
    for field in ["type", "title", "detail", "code"] {
        assert!(
            problem[field].as_str().is_some_and(|s| !s.is_empty()),
            "{what}: problem field {field} is a non-empty string: {problem}"
        );
    }
    assert_eq!(
        problem["status"],
        json!(case.status),
        "{what}: problem status: {problem}"
    );
    assert_eq!(problem["code"], case.code, "{what}: code: {problem}");
    let detail = problem["detail"].as_str().unwrap().to_ascii_lowercase();
    for leak in [
        "sqlstate",
        "postgres",
        "panicked",
        "tokio_postgres",
        "deadpool",
    ] {
        assert!(
            !detail.contains(leak),
            "{what}: detail leaks internals: {problem}"
        );
    }
    if case.code == "validation_failed" {
        let mut named: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: validation_failed has an errors array: {problem}"))
            .iter()
            .map(|e| {
                assert!(
                    e["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{what}: error message: {e}"
                );
                e["field"].as_str().expect("errors name a field")
            })
            .collect();
        named.sort_unstable();
        named.dedup();
        let mut expected = case.fields.clone();
        expected.sort_unstable();
        assert_eq!(named, expected, "{what}: fields named in errors: {problem}");
    }
    problem
}

/// A `starts_at` from which the last moments of year 9999 are within the
/// 30-day rule.
const LAST_DAYS: &str = "9999-12-15T00:00:00Z";

fn b64(data: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn unix_now() -> u64 {
    Utc::now().timestamp() as u64
}

fn sign(alg: Algorithm, secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A valid create-auction body with `overrides` applied (null removes a field).
fn auction_body(overrides: Value) -> String {
    let now = Utc::now();
    let mut body = json!({
        "title": "Shield of Dusk",
        "currency": "GLD",
        "starting_price": 1000,
        "ends_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
    });
    for (k, v) in overrides.as_object().unwrap() {
        if v.is_null() {
            body.as_object_mut().unwrap().remove(k);
        } else {
            body[k] = v.clone();
        }
    }
    body.to_string()
}

#[tokio::test]
async fn every_bad_request_gets_its_problem_code() {
    let app = TestApp::spawn().await;
    let auction = app.create_auction("seller-1", json!({})).await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    // Ends while the table runs; refused as closed once settled (last row).
    let short = app
        .create_auction(
            "seller-1",
            json!({"ends_at": (Utc::now() + chrono::Duration::milliseconds(1_000)).to_rfc3339()}),
        )
        .await;
    let short_id = short["id"].as_str().unwrap().to_owned();

    let alice = app.token("alice", &[]);
    let bidder = app.token("bob", &[Role::Bidder]);
    let seller = app.token("seller-1", &[Role::Seller]);
    let unknown = Uuid::now_v7();
    let bids_path = format!("/api/auctions/{auction_id}/bids");

    // A key already used by carol for 1500 on this auction.
    let used_key = new_key();
    assert_eq!(
        app.bid("carol", &auction_id, 1500, &used_key)
            .await
            .status(),
        StatusCode::ACCEPTED
    );

    // Tokens that must all be refused.
    let now = unix_now();
    let claims = |sub: &str, exp: u64, aud: &str| json!({"sub": sub, "exp": exp, "aud": aud});
    let expired = sign(
        Algorithm::HS256,
        SECRET,
        &claims("alice", now - 60, "gavel"),
    );
    let forged = sign(
        Algorithm::HS256,
        "another-secret-0123456789-abcdefghij",
        &claims("alice", now + 600, "gavel"),
    );
    let hs512 = sign(
        Algorithm::HS512,
        SECRET,
        &claims("alice", now + 600, "gavel"),
    );
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims("alice", now + 600, "gavel").to_string())
    );
    let wrong_audience = JwtKeys::new(SECRET, "not-gavel").mint("alice", &[], 600);
    let no_sub = sign(
        Algorithm::HS256,
        SECRET,
        &json!({"exp": now + 600, "aud": "gavel"}),
    );
    let no_exp = sign(
        Algorithm::HS256,
        SECRET,
        &json!({"sub": "alice", "aud": "gavel"}),
    );
    let no_aud = sign(
        Algorithm::HS256,
        SECRET,
        &json!({"sub": "alice", "exp": now + 600}),
    );
    let long_sub = sign(
        Algorithm::HS256,
        SECRET,
        &claims(&"u".repeat(65), now + 600, "gavel"),
    );
    let empty_sub = sign(Algorithm::HS256, SECRET, &claims("", now + 600, "gavel"));
    let unknown_role = sign(
        Algorithm::HS256,
        SECRET,
        &json!({"sub": "alice", "exp": now + 600, "aud": "gavel", "roles": ["root"]}),
    );
    let nbf_ahead = sign(
        Algorithm::HS256,
        SECRET,
        &json!({"sub": "alice", "exp": now + 7200, "aud": "gavel", "nbf": now + 3600}),
    );
    let nbf_not_a_date = sign(
        Algorithm::HS256,
        SECRET,
        &json!({"sub": "alice", "exp": now + 600, "aud": "gavel", "nbf": "yesterday"}),
    );
    let valid = app.token("alice", &[]);
    let tampered = {
        // A valid token whose claims were edited to make alice an admin.
        let parts: Vec<&str> = valid.split('.').collect();
        let admin = json!({"sub": "alice", "exp": now + 600, "aud": "gavel", "roles": ["admin"]});
        format!("{}.{}.{}", parts[0], b64(&admin.to_string()), parts[2])
    };

    // A bid by alice: valid unless a row changes something.
    let bid = |name: &str, body: &str| {
        Case::new(name, Method::POST, bids_path.clone())
            .auth(&alice)
            .header("idempotency-key", new_key())
            .json(body)
    };
    let create = |name: &str, overrides: Value| {
        Case::new(name, Method::POST, "/api/auctions")
            .auth(&seller)
            .json(auction_body(overrides))
    };
    let get = |name: &str, path: String| Case::new(name, Method::GET, path).auth(&alice);
    let huge = format!(r#"{{"amount": 1300, "pad": "{}"}}"#, "x".repeat(17 * 1024));
    let in_days = |days: i64| (Utc::now() + chrono::Duration::days(days)).to_rfc3339();
    let same = in_days(2);
    let in_hours = |hours: i64| (Utc::now() + chrono::Duration::hours(hours)).to_rfc3339();

    let cases = vec![
        // 400 invalid_request: unreadable bodies.
        bid("malformed JSON", r#"{"amount": 13"#).expect(400, "invalid_request"),
        bid("trailing garbage", r#"{"amount": 1300} x"#).expect(400, "invalid_request"),
        bid("empty body", "").expect(400, "invalid_request"),
        bid("body is an array", "[1300]").expect(400, "invalid_request"),
        bid("body is a number", "1300").expect(400, "invalid_request"),
        bid("body is null", "null").expect(400, "invalid_request"),
        bid("number out of f64 range", r#"{"amount": 1e400}"#).expect(400, "invalid_request"),
        bid("deeply nested JSON", format!("{}{}", "[".repeat(5_000), "]".repeat(5_000)).as_str())
            .expect(400, "invalid_request"),
        bid("invalid UTF-8", "").body(b"{\"amount\": \"\xff\"}").expect(400, "invalid_request"),
        // 422 validation_failed: amounts that are not 1..=10^15 integers.
        bid("amount is a string", r#"{"amount": "1300"}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("amount is a bool", r#"{"amount": true}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("amount is null", r#"{"amount": null}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("amount is an array", r#"{"amount": [1300]}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("amount is an object", r#"{"amount": {"value": 1300}}"#)
            .expect(422, "validation_failed")
            .fields(&["amount"]),
        bid("amount missing", r#"{"bid": 1300}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("empty object", "{}").expect(422, "validation_failed").fields(&["amount"]),
        bid("fractional amount", r#"{"amount": 1300.5}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("integral float amount", r#"{"amount": 1300.0}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("exponent amount", r#"{"amount": 1.3e3}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("zero amount", r#"{"amount": 0}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("negative amount", r#"{"amount": -1300}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("amount 10^15 + 1", r#"{"amount": 1000000000000001}"#)
            .expect(422, "validation_failed")
            .fields(&["amount"]),
        bid("amount 10^16", r#"{"amount": 10000000000000000}"#).expect(422, "validation_failed").fields(&["amount"]),
        bid("amount i64::MAX", r#"{"amount": 9223372036854775807}"#)
            .expect(422, "validation_failed")
            .fields(&["amount"]),
        bid("amount u64::MAX", r#"{"amount": 18446744073709551615}"#)
            .expect(422, "validation_failed")
            .fields(&["amount"]),
        bid("amount beyond u64", r#"{"amount": 123456789012345678901234567890}"#)
            .expect(422, "validation_failed")
            .fields(&["amount"]),
        bid("amount i64::MIN", r#"{"amount": -9223372036854775808}"#)
            .expect(422, "validation_failed")
            .fields(&["amount"]),
        // Ids in paths.
        Case::new("malformed auction id (bid)", Method::POST, "/api/auctions/not-a-uuid/bids")
            .auth(&alice)
            .header("idempotency-key", new_key())
            .json(r#"{"amount": 1300}"#)
            .expect(400, "invalid_request"),
        get("malformed auction id (read)", "/api/auctions/not-a-uuid".into()).expect(400, "invalid_request"),
        get("malformed auction id (history)", "/api/auctions/12345/bids".into()).expect(400, "invalid_request"),
        get("malformed bid id", "/api/bids/not-a-uuid".into()).expect(400, "invalid_request"),
        get("almost a uuid", format!("/api/bids/{}", &unknown.to_string()[..35])).expect(400, "invalid_request"),
        get("consistency token not base64", format!("/api/auctions/{auction_id}"))
            .header("gavel-consistency-token", "%%%")
            .expect(400, "invalid_request"),
        get("consistency token without a position", format!("/api/auctions/{auction_id}/bids"))
            .header("gavel-consistency-token", "bHNuOnh5eg")
            .expect(400, "invalid_request"),
        get("consistency token of another kind", format!("/api/bids/{unknown}"))
            .header("gavel-consistency-token", "aGVsbG8")
            .expect(400, "invalid_request"),
        Case::new("unknown auction (bid)", Method::POST, format!("/api/auctions/{unknown}/bids"))
            .auth(&alice)
            .header("idempotency-key", new_key())
            .json(r#"{"amount": 1300}"#)
            .expect(404, "not_found"),
        get("unknown auction (read)", format!("/api/auctions/{unknown}")).expect(404, "not_found"),
        get("unknown auction (history)", format!("/api/auctions/{unknown}/bids")).expect(404, "not_found"),
        get("unknown bid", format!("/api/bids/{unknown}")).expect(404, "not_found"),
        // 401 unauthorized.
        bid("missing token", r#"{"amount": 1300}"#).without("authorization").expect(401, "unauthorized"),
        get("missing token (read)", format!("/api/auctions/{auction_id}"))
            .without("authorization")
            .expect(401, "unauthorized"),
        create("missing token (create)", json!({})).without("authorization").expect(401, "unauthorized"),
        bid("Basic credentials", r#"{"amount": 1300}"#)
            .header("authorization", "Basic YWxpY2U6cGFzc3dvcmQ=")
            .expect(401, "unauthorized"),
        bid("token without scheme", r#"{"amount": 1300}"#)
            .header("authorization", valid.as_str())
            .expect(401, "unauthorized"),
        bid("bearer without token", r#"{"amount": 1300}"#)
            .header("authorization", "Bearer")
            .expect(401, "unauthorized"),
        bid("not a JWT", r#"{"amount": 1300}"#).auth("not.a.jwt").expect(401, "unauthorized"),
        bid("non-ASCII authorization", r#"{"amount": 1300}"#)
            .header("authorization", b"Bearer \xe9t\xe9".as_slice())
            .expect(401, "unauthorized"),
        bid("expired token", r#"{"amount": 1300}"#).auth(&expired).expect(401, "unauthorized"),
        bid("forged token", r#"{"amount": 1300}"#).auth(&forged).expect(401, "unauthorized"),
        bid("tampered claims", r#"{"amount": 1300}"#).auth(&tampered).expect(401, "unauthorized"),
        bid("alg none", r#"{"amount": 1300}"#).auth(&alg_none).expect(401, "unauthorized"),
        bid("alg HS512", r#"{"amount": 1300}"#).auth(&hs512).expect(401, "unauthorized"),
        bid("wrong audience", r#"{"amount": 1300}"#).auth(&wrong_audience).expect(401, "unauthorized"),
        bid("no sub", r#"{"amount": 1300}"#).auth(&no_sub).expect(401, "unauthorized"),
        bid("empty sub", r#"{"amount": 1300}"#).auth(&empty_sub).expect(401, "unauthorized"),
        bid("sub over 64 chars", r#"{"amount": 1300}"#).auth(&long_sub).expect(401, "unauthorized"),
        bid("no exp", r#"{"amount": 1300}"#).auth(&no_exp).expect(401, "unauthorized"),
        bid("no aud", r#"{"amount": 1300}"#).auth(&no_aud).expect(401, "unauthorized"),
        bid("unknown role", r#"{"amount": 1300}"#).auth(&unknown_role).expect(401, "unauthorized"),
        get("expired token (read)", format!("/api/auctions/{auction_id}")).auth(&expired).expect(401, "unauthorized"),
        create("forged token (create)", json!({})).auth(&forged).expect(401, "unauthorized"),
        bid("nbf an hour ahead", r#"{"amount": 1300}"#).auth(&nbf_ahead).expect(401, "unauthorized"),
        get("nbf an hour ahead (read)", format!("/api/auctions/{auction_id}"))
            .auth(&nbf_ahead)
            .expect(401, "unauthorized"),
        bid("nbf not a NumericDate", r#"{"amount": 1300}"#).auth(&nbf_not_a_date).expect(401, "unauthorized"),
        // 400 invalid_request: more than one Authorization header, in either
        // order: never "first one wins".
        bid("two Authorization headers (valid, forged)", r#"{"amount": 1300}"#)
            .auth(&alice)
            .also("authorization", format!("Bearer {forged}"))
            .expect(400, "invalid_request"),
        bid("two Authorization headers (forged, valid)", r#"{"amount": 1300}"#)
            .auth(&forged)
            .also("authorization", format!("Bearer {alice}"))
            .expect(400, "invalid_request"),
        bid("the same Authorization header twice", r#"{"amount": 1300}"#)
            .auth(&alice)
            .also("authorization", format!("Bearer {alice}"))
            .expect(400, "invalid_request"),
        get("two Authorization headers (read)", format!("/api/auctions/{auction_id}"))
            .auth(&alice)
            .also("authorization", format!("Bearer {forged}"))
            .expect(400, "invalid_request"),
        create("two Authorization headers (create)", json!({}))
            .also("authorization", format!("Bearer {forged}"))
            .expect(400, "invalid_request"),
        create("two Authorization headers (forged, valid; create)", json!({}))
            .auth(&forged)
            .also("authorization", format!("Bearer {seller}"))
            .expect(400, "invalid_request"),
        // 403.
        bid("seller bids on own auction", r#"{"amount": 1300}"#).auth(&seller).expect(403, "seller_cannot_bid"),
        create("plain user creates an auction", json!({})).auth(&alice).expect(403, "forbidden"),
        create("bidder creates an auction", json!({})).auth(&bidder).expect(403, "forbidden"),
        // 413, 415.
        bid("oversized bid body", &huge).expect(413, "payload_too_large"),
        create("oversized auction body", json!({"title": "x".repeat(17 * 1024)})).expect(413, "payload_too_large"),
        bid("text/plain body", r#"{"amount": 1300}"#)
            .header("content-type", "text/plain")
            .expect(415, "unsupported_media_type"),
        bid("form body", "amount=1300")
            .header("content-type", "application/x-www-form-urlencoded")
            .expect(415, "unsupported_media_type"),
        bid("no content type", r#"{"amount": 1300}"#).without("content-type").expect(415, "unsupported_media_type"),
        create("text/plain auction", json!({}))
            .header("content-type", "text/plain")
            .expect(415, "unsupported_media_type"),
        // Idempotency-Key.
        bid("no Idempotency-Key", r#"{"amount": 1300}"#)
            .without("idempotency-key")
            .expect(400, "idempotency_key_missing"),
        bid("empty Idempotency-Key", r#"{"amount": 1300}"#)
            .header("idempotency-key", "")
            .expect(400, "invalid_request"),
        bid("Idempotency-Key with a space", r#"{"amount": 1300}"#)
            .header("idempotency-key", "my key")
            .expect(400, "invalid_request"),
        bid("non-ASCII Idempotency-Key", r#"{"amount": 1300}"#)
            .header("idempotency-key", "cl\u{e9}-1".as_bytes())
            .expect(400, "invalid_request"),
        bid("Latin-1 Idempotency-Key", r#"{"amount": 1300}"#)
            .header("idempotency-key", b"cl\xe9-1".as_slice())
            .expect(400, "invalid_request"),
        bid("Idempotency-Key of 256 chars", r#"{"amount": 1300}"#)
            .header("idempotency-key", "k".repeat(256))
            .expect(400, "invalid_request"),
        bid("Idempotency-Key reused for another amount", r#"{"amount": 1600}"#)
            .auth(&app.token("carol", &[]))
            .header("idempotency-key", &used_key)
            .expect(422, "idempotency_key_reused"),
        // 422 bid_too_low.
        bid("below the starting price", r#"{"amount": 999}"#).expect(422, "bid_too_low"),
        bid("amount 1", r#"{"amount": 1}"#).expect(422, "bid_too_low"),
        // 422 validation_failed on create.
        create("currency lowercase", json!({"currency": "gld"})).expect(422, "validation_failed").fields(&["currency"]),
        create("currency of 4 letters", json!({"currency": "GOLD"}))
            .expect(422, "validation_failed")
            .fields(&["currency"]),
        create("currency a number", json!({"currency": 978})).expect(422, "validation_failed").fields(&["currency"]),
        create("currency missing", json!({"currency": null})).expect(422, "validation_failed").fields(&["currency"]),
        create("empty title", json!({"title": ""})).expect(422, "validation_failed").fields(&["title"]),
        create("title of 201 chars", json!({"title": "t".repeat(201)}))
            .expect(422, "validation_failed")
            .fields(&["title"]),
        create("title missing", json!({"title": null})).expect(422, "validation_failed").fields(&["title"]),
        create("title with a NUL", json!({"title": "Sword\u{0}of Dawn"}))
            .expect(422, "validation_failed")
            .fields(&["title"]),
        create("starting_price zero", json!({"starting_price": 0}))
            .expect(422, "validation_failed")
            .fields(&["starting_price"]),
        create("starting_price float", json!({"starting_price": 1000.5}))
            .expect(422, "validation_failed")
            .fields(&["starting_price"]),
        create("starting_price above 10^15", json!({"starting_price": 1_000_000_000_000_001_i64}))
            .expect(422, "validation_failed")
            .fields(&["starting_price"]),
        create("starting_price a string", json!({"starting_price": "1000"}))
            .expect(422, "validation_failed")
            .fields(&["starting_price"]),
        create("reserve below starting price", json!({"reserve_price": 999}))
            .expect(422, "validation_failed")
            .fields(&["reserve_price"]),
        create("reserve negative", json!({"reserve_price": -5}))
            .expect(422, "validation_failed")
            .fields(&["reserve_price"]),
        create("ends_at before starts_at", json!({"starts_at": in_hours(3), "ends_at": in_hours(2)}))
            .expect(422, "validation_failed")
            .fields(&["ends_at"]),
        create("ends_at equal to starts_at", json!({"starts_at": &same, "ends_at": &same}))
            .expect(422, "validation_failed")
            .fields(&["ends_at"]),
        create("ends_at more than 30 days out", json!({"ends_at": in_days(31)}))
            .expect(422, "validation_failed")
            .fields(&["ends_at"]),
        create("ends_at in the past", json!({"ends_at": in_hours(-1), "starts_at": in_hours(-2)}))
            .expect(422, "validation_failed")
            .fields(&["ends_at"]),
        create("ends_at missing", json!({"ends_at": null})).expect(422, "validation_failed").fields(&["ends_at"]),
        create("ends_at not RFC 3339", json!({"ends_at": "tomorrow"}))
            .expect(422, "validation_failed")
            .fields(&["ends_at"]),
        create("starts_at not RFC 3339", json!({"starts_at": 1_700_000_000}))
            .expect(422, "validation_failed")
            .fields(&["starts_at"]),
        create("max_end_at before ends_at", json!({"soft_close_s": 30, "max_end_at": in_hours(-1)}))
            .expect(422, "validation_failed")
            .fields(&["max_end_at"]),
        // 422 validation_failed: times RFC 3339 could not write back (years
        // past 9999), each with a starts_at that the 30-day rule accepts.
        create(
            "default max_end_at (ends_at + 1 h) past year 9999",
            json!({"starts_at": LAST_DAYS, "ends_at": "9999-12-31T23:59:59Z", "soft_close_s": 30}),
        )
        .expect(422, "validation_failed")
        .fields(&["ends_at"]),
        create("ends_at in year 10000", json!({"starts_at": LAST_DAYS, "ends_at": "10000-01-01T00:00:00Z"}))
            .expect(422, "validation_failed")
            .fields(&["ends_at"]),
        create("ends_at with a signed 5-digit year", json!({"starts_at": LAST_DAYS, "ends_at": "+10000-01-01T00:59:59Z"}))
            .expect(422, "validation_failed")
            .fields(&["ends_at"]),
        create("ends_at past year 9999 in UTC", json!({"starts_at": LAST_DAYS, "ends_at": "9999-12-31T23:30:00-01:00"}))
            .expect(422, "validation_failed")
            .fields(&["ends_at"]),
        create(
            "starts_at past year 9999 in UTC",
            json!({"starts_at": "9999-12-31T23:30:00-01:00", "ends_at": "9999-12-31T12:00:00Z"}),
        )
        .expect(422, "validation_failed")
        .fields(&["starts_at"]),
        create("starts_at before year 0001 in UTC", json!({"starts_at": "0001-01-01T00:30:00+01:00"}))
            .expect(422, "validation_failed")
            .fields(&["starts_at"]),
        create(
            "max_end_at past year 9999 in UTC",
            json!({"starts_at": LAST_DAYS, "ends_at": "9999-12-31T12:00:00Z", "soft_close_s": 30, "max_end_at": "9999-12-31T23:30:00-01:00"}),
        )
        .expect(422, "validation_failed")
        .fields(&["max_end_at"]),
        create(
            "max_end_at in year 10000 (no default in its place)",
            json!({"starts_at": LAST_DAYS, "ends_at": "9999-12-31T23:59:59Z", "soft_close_s": 30, "max_end_at": "10000-01-01T00:00:00Z"}),
        )
        .expect(422, "validation_failed")
        .fields(&["max_end_at"]),
        create("soft_close_s negative", json!({"soft_close_s": -1}))
            .expect(422, "validation_failed")
            .fields(&["soft_close_s"]),
        create("soft_close_s a float", json!({"soft_close_s": 1.5}))
            .expect(422, "validation_failed")
            .fields(&["soft_close_s"]),
        create("increments first from is not 0", json!({"increments": [{"from": 10, "step": 5}]}))
            .expect(422, "validation_failed")
            .fields(&["increments"]),
        create("increments step 0", json!({"increments": [{"from": 0, "step": 0}]}))
            .expect(422, "validation_failed")
            .fields(&["increments"]),
        create("increments negative step", json!({"increments": [{"from": 0, "step": 5}, {"from": 100, "step": -1}]}))
            .expect(422, "validation_failed")
            .fields(&["increments"]),
        create("increments not ascending", json!({"increments": [{"from": 0, "step": 5}, {"from": 100, "step": 10}, {"from": 100, "step": 20}]}))
            .expect(422, "validation_failed")
            .fields(&["increments"]),
        create("increments empty", json!({"increments": []})).expect(422, "validation_failed").fields(&["increments"]),
        create("increments not an array", json!({"increments": "5%"}))
            .expect(422, "validation_failed")
            .fields(&["increments"]),
        create("increments with float step", json!({"increments": [{"from": 0, "step": 2.5}]}))
            .expect(422, "validation_failed")
            .fields(&["increments"]),
        create(
            "several bad fields at once",
            json!({"title": "", "currency": "gold", "reserve_price": 10, "increments": [{"from": 0, "step": 0}], "ends_at": in_days(40)}),
        )
        .expect(422, "validation_failed")
        .fields(&["title", "currency", "reserve_price", "increments", "ends_at"]),
        // Routes.
        get("unknown API route", "/api/nope".into()).expect(404, "not_found"),
        get("unknown route without a token", "/nope".into()).without("authorization").expect(404, "not_found"),
        get("list of bids is not a route", "/api/bids".into()).expect(404, "not_found"),
        Case::new("method not allowed", Method::DELETE, format!("/api/auctions/{auction_id}"))
            .auth(&seller)
            .expect(405, "invalid_request"),
        Case::new("method not allowed on a probe", Method::POST, "/healthz").expect(405, "invalid_request"),
        // Query strings.
        get("history limit 0", format!("/api/auctions/{auction_id}/bids?limit=0")).expect(400, "invalid_request"),
        get("history limit not a number", format!("/api/auctions/{auction_id}/bids?limit=ten"))
            .expect(400, "invalid_request"),
        get("history cursor garbage", format!("/api/auctions/{auction_id}/bids?cursor=%%%")).expect(400, "invalid_request"),
    ];
    for case in &cases {
        assert_ne!(case.status, 0, "{}: row without an expectation", case.name);
    }

    for case in &cases {
        let response = send(&app, case).await;
        assert_problem(case, response).await;
    }

    // Refused synchronously as closed only once the close is settled.
    app.wait_settled(&short_id, Duration::from_secs(10)).await;
    let closed = Case::new(
        "bid on a settled auction",
        Method::POST,
        format!("/api/auctions/{short_id}/bids"),
    )
    .auth(&alice)
    .header("idempotency-key", new_key())
    .json(r#"{"amount": 5000}"#)
    .expect(422, "auction_closed");
    assert_problem(&closed, send(&app, &closed).await).await;

    // None of the refused bids reached the log: only carol's.
    let db = app.db().await;
    let logged: i64 = db
        .query_one("SELECT count(*) FROM bid_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 1, "refused requests appended nothing");

    // The server still serves: a valid bid, the 10^15 boundary, health.
    let ok = app
        .http
        .post(app.url(&bids_path))
        .bearer_auth(&alice)
        .header("idempotency-key", "k".repeat(255))
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"amount": 1300}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.status(),
        StatusCode::ACCEPTED,
        "a 255-char key and a charset parameter are fine"
    );
    assert_common_headers("valid bid", &ok);
    let boundary = app.create_auction("seller-1", json!({})).await;
    let top = app
        .bid(
            "alice",
            boundary["id"].as_str().unwrap(),
            1_000_000_000_000_000,
            &new_key(),
        )
        .await;
    assert_eq!(
        top.status(),
        StatusCode::ACCEPTED,
        "10^15 is a valid amount"
    );
    let top: Value = top.json().await.unwrap();
    assert_eq!(top["amount"], json!(1_000_000_000_000_000_i64));
    // The auth scheme is case-insensitive (RFC 9110, section 11.1).
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let read = app
            .http
            .get(app.url(&format!("/api/auctions/{auction_id}")))
            .header("authorization", format!("{scheme} {alice}"))
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), StatusCode::OK, "scheme {scheme}");
    }
    // A token is good from its nbf on.
    let now = unix_now();
    for (what, nbf) in [("nbf an hour ago", now - 3600), ("nbf now", now)] {
        let token = sign(
            Algorithm::HS256,
            SECRET,
            &json!({"sub": "alice", "exp": now + 600, "aud": "gavel", "nbf": nbf}),
        );
        let read = app
            .http
            .get(app.url(&format!("/api/auctions/{auction_id}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), StatusCode::OK, "{what}");
    }
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_common_headers("healthz", &health);

    // X-Request-Id: echoed when sent (errors included), generated otherwise.
    let echoed = app
        .http
        .get(app.url(&format!("/api/auctions/{auction_id}")))
        .bearer_auth(&alice)
        .header("x-request-id", "bad-input-req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.status(), StatusCode::OK);
    assert_eq!(echoed.headers()["x-request-id"], "bad-input-req-42");
    let echoed_error = app
        .http
        .get(app.url("/api/nope"))
        .header("x-request-id", "bad-input-req-43")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed_error.status(), StatusCode::NOT_FOUND);
    assert_eq!(echoed_error.headers()["x-request-id"], "bad-input-req-43");
    let a = app.http.get(app.url("/healthz")).send().await.unwrap();
    let b = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_ne!(
        a.headers()["x-request-id"],
        b.headers()["x-request-id"],
        "generated request ids are unique"
    );

    // A method of the client's own making is counted as `other`.
    let method = reqwest::Method::from_bytes(b"BIDNOW").unwrap();
    let odd = app
        .http
        .request(method, app.url("/api/auctions"))
        .send()
        .await
        .unwrap();
    assert_eq!(odd.status(), StatusCode::METHOD_NOT_ALLOWED);

    // The refusals were counted by status on the admin listener.
    let metrics = app
        .http
        .get(format!("http://{}/metrics", app.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let metrics = metrics.text().await.unwrap();
    for status in ["401", "413", "415", "422"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("gavel_http_requests_total")
                    && l.contains(&format!("status=\"{status}\""))),
            "requests with status {status} are counted"
        );
    }
    assert!(
        metrics.contains("method=\"other\"") && !metrics.contains("BIDNOW"),
        "an unknown method is labelled other"
    );

    app.stop().await;
}

/// Checks that a JSON time is RFC 3339 in UTC with a four-digit year.
fn assert_rfc3339_utc(what: &str, value: &Value) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {value}"));
    let bytes = text.as_bytes();
    assert!(
        bytes.len() > 4 && bytes[..4].iter().all(u8::is_ascii_digit) && bytes[4] == b'-',
        "{what}: a four-digit year: {text}"
    );
    assert!(text.ends_with('Z'), "{what}: UTC written as Z: {text}");
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{what}: not RFC 3339 ({e}): {text}"))
        .to_utc()
}

/// Every time in an auction view is RFC 3339 with a four-digit year.
fn assert_view_times(what: &str, view: &Value) {
    let times: Vec<&String> = view
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {view}"))
        .keys()
        .filter(|k| k.ends_with("_at"))
        .collect();
    assert!(times.len() >= 3, "{what}: the view's times: {view}");
    for key in times {
        assert_rfc3339_utc(&format!("{what}: {key}"), &view[key.as_str()]);
    }
}

#[tokio::test]
async fn auction_times_stay_within_four_digit_years() {
    let app = TestApp::spawn().await;
    let seller = app.token("seller-1", &[Role::Seller]);
    let body = |overrides: Value| {
        let mut body = json!({
            "title": "Crown of the Last Year",
            "currency": "GLD",
            "starting_price": 1000,
            "starts_at": LAST_DAYS,
        });
        for (k, v) in overrides.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let create = |body: Value| {
        app.http
            .post(app.url("/api/auctions"))
            .bearer_auth(&seller)
            .json(&body)
            .send()
    };

    // Soft close without max_end_at on the last second: the default cap
    // (ends_at + 1 h) would be in year 10000, so ends_at is refused, saying why.
    let refused = create(body(
        json!({"ends_at": "9999-12-31T23:59:59Z", "soft_close_s": 30}),
    ))
    .await
    .unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "validation_failed", "{problem}");
    let errors = problem["errors"].as_array().expect("an errors array");
    assert_eq!(errors.len(), 1, "{problem}");
    assert_eq!(errors[0]["field"], "ends_at", "{problem}");
    let message = errors[0]["message"].as_str().unwrap();
    assert!(
        message.contains("max_end_at") && message.contains("9999"),
        "the message explains the default max_end_at: {message}"
    );

    // The last representable times are accepted and written back as RFC 3339.
    let accepted = [
        (
            "default max_end_at on the last second",
            json!({"ends_at": "9999-12-31T22:59:59Z", "soft_close_s": 30}),
            "9999-12-31T23:59:59Z",
        ),
        (
            "hard close on the last second",
            json!({"ends_at": "9999-12-31T23:59:59Z"}),
            "9999-12-31T23:59:59Z",
        ),
        (
            // Stored with microseconds: truncated, never rounded into 10000.
            "explicit max_end_at on the last nanosecond",
            json!({"ends_at": "9999-12-31T23:59:59Z", "soft_close_s": 30, "max_end_at": "9999-12-31T23:59:59.999999999Z"}),
            "9999-12-31T23:59:59.999999Z",
        ),
    ];
    for (what, overrides, max_end_at) in accepted {
        let response = create(body(overrides)).await.unwrap();
        let status = response.status();
        let location = header(&response, "location");
        let created: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{what}: {created}");
        assert_view_times(what, &created);
        assert_eq!(created["starts_at"], LAST_DAYS, "{what}");
        assert_eq!(created["max_end_at"], max_end_at, "{what}");
        assert_eq!(created["status"], "scheduled", "{what}");

        let read = app.get_as(&location, "bob", &[]).await;
        assert_eq!(read.status(), StatusCode::OK, "{what}: read back");
        let server_time = header(&read, "gavel-server-time");
        if !server_time.is_empty() {
            assert_rfc3339_utc(&format!("{what}: Gavel-Server-Time"), &json!(server_time));
        }
        let view: Value = read.json().await.unwrap();
        assert_view_times(&format!("{what} (read back)"), &view);
        assert_eq!(view["max_end_at"], max_end_at, "{what}: read back");
    }

    app.stop().await;
}

/// The `X-Request-Id` of the response to a request that sent `sent`.
async fn request_id_for(app: &TestApp, path: &str, sent: HeaderValue) -> String {
    let response = app
        .http
        .get(app.url(path))
        .header("x-request-id", sent)
        .send()
        .await
        .unwrap();
    let ids: Vec<_> = response.headers().get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1, "{path}: one X-Request-Id: {ids:?}");
    ids[0]
        .to_str()
        .unwrap_or_else(|_| panic!("{path}: X-Request-Id is visible ASCII: {:?}", ids[0]))
        .to_owned()
}

fn assert_generated(what: &str, id: &str) {
    assert!(
        Uuid::parse_str(id).is_ok(),
        "{what}: a generated UUID, not {id:?}"
    );
}

#[tokio::test]
async fn an_empty_request_id_gets_a_generated_one() {
    let app = TestApp::spawn().await;
    for path in ["/healthz", "/api/nope"] {
        let id = request_id_for(&app, path, HeaderValue::from_static("")).await;
        assert_generated(&format!("empty X-Request-Id on {path}"), &id);
    }
    app.stop().await;
}

#[tokio::test]
async fn an_invalid_request_id_gets_a_generated_one_and_a_valid_one_is_echoed() {
    let app = TestApp::spawn().await;
    let invalid: [(&str, Vec<u8>); 6] = [
        ("201 characters", "r".repeat(201).into_bytes()),
        ("4 KiB", "r".repeat(4096).into_bytes()),
        ("a space", b"req 42".to_vec()),
        ("a tab", b"req\t42".to_vec()),
        ("UTF-8", "req-\u{e9}".as_bytes().to_vec()),
        ("a Latin-1 byte", b"req-\xe9".to_vec()),
    ];
    for (what, sent) in &invalid {
        for path in ["/healthz", "/api/nope"] {
            let value = HeaderValue::from_bytes(sent).expect("test header value");
            let id = request_id_for(&app, path, value).await;
            assert_generated(&format!("X-Request-Id with {what} on {path}"), &id);
            assert_ne!(id.as_bytes(), sent.as_slice(), "{what}: not echoed");
        }
    }

    let every_visible: String = ('!'..='~').collect();
    let valid = [
        "x".to_owned(),
        "r".repeat(200),
        every_visible,
        Uuid::now_v7().to_string(),
    ];
    for sent in &valid {
        for path in ["/healthz", "/api/nope"] {
            let value = HeaderValue::from_str(sent).expect("test header value");
            let id = request_id_for(&app, path, value).await;
            assert_eq!(&id, sent, "{path}: a valid X-Request-Id is echoed");
        }
    }
    app.stop().await;
}
