//! The watch page (`GET /watch`) in a real browser: headless Chromium loads
//! it for a test server's auction and follows the auction live while other
//! clients bid, and the viewer bids through the page's form.

use std::time::Duration;

use chrono::Utc;
use gavel::domain::mask_user;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::cdp::{test_output_dir, Browser, Page};
use crate::helpers::*;

/// What the page shows, read from its DOM (null until the watch page
/// replaced the browser's blank one).
const PAGE_STATE: &str = r#"(() => {
    if (!document.getElementById('price')) return null;
    const text = (id) => document.getElementById(id).textContent;
    const extension = document.getElementById('extension');
    return {
        connection: text('connection'),
        problem: text('problem'),
        price_label: text('price-label'),
        price: text('price'),
        leader: text('leader'),
        bid_count: text('bid-count'),
        time_left: text('time-left'),
        extension: extension.hidden ? null : extension.textContent,
        answer: text('answer'),
        my_bid: text('my-bid'),
        my_bid_status: document.getElementById('my-bid').dataset.status,
    };
})()"#;

const WAIT: Duration = Duration::from_secs(10);

/// Polls the page until `done` holds for what it shows; returns that.
async fn wait_for(page: &mut Page, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let state = page.evaluate(PAGE_STATE).await;
        if done(&state) {
            return state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page did not show {what} within {WAIT:?}; it shows {state:#}; \
             its problems: {:#?}",
            page.problems
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An amount as the page writes it: `1,550 GLD`.
fn gld(amount: &Value) -> String {
    let digits = amount.as_i64().expect("an amount").to_string();
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    format!("{grouped} GLD")
}

/// A countdown as the page writes it (`m:ss` or `h:mm:ss`), in seconds.
fn seconds_left(text: &str) -> i64 {
    text.split(':')
        .map(|part| part.parse::<i64>().expect("a countdown"))
        .fold(0, |total, part| total * 60 + part)
}

/// The seconds from now to a view's `ends_at`, by the test's clock (the
/// same machine as the server's).
fn seconds_to_end(view: &Value) -> i64 {
    (time_of(&view["ends_at"]) - Utc::now()).num_seconds()
}

#[tokio::test]
async fn the_watch_page_shows_an_auction_live_and_bids_from_its_form() {
    let app = TestApp::spawn().await;
    // A soft close longer than the time left: every bid moves the end.
    let ends_at = Utc::now() + chrono::Duration::minutes(10);
    let auction = app
        .create_auction(
            "seller-1",
            json!({"ends_at": ends_at.to_rfc3339(), "soft_close_s": 3600}),
        )
        .await;
    let auction_id = auction["id"].as_str().unwrap().to_owned();
    assert_page_headers(&app, &auction_id).await;

    let browser = Browser::launch().await;
    let mut page = browser.page().await;
    page.watch_problems().await;
    let viewer_token = app.token("watch-viewer", &[]);
    page.navigate(&app.url(&format!("/watch#auction={auction_id}&token={viewer_token}")))
        .await;

    let shown = wait_for(&mut page, "the starting price, live", |s| {
        s["price"] == "1,000 GLD" && s["connection"] == "live"
    })
    .await;
    assert_eq!(shown["price_label"], "Starting price");
    assert_eq!(shown["leader"], "no bids yet");
    let drift = seconds_left(shown["time_left"].as_str().unwrap()) - seconds_to_end(&auction);
    assert!(drift.abs() <= 2, "time left on the page: {shown}");

    // Other clients bid: the page shows the new price, the masked leader,
    // and the end moved by the soft close.
    app.bid_resolved("rival-one", &auction_id, 1_500).await;
    app.bid_resolved("rival-two", &auction_id, 2_000).await;
    let view = app.auction(&auction_id).await;
    let shown = wait_for(&mut page, "the rivals' bids", |s| {
        s["price"] == gld(&view["current_price"]) && s["bid_count"] == "2"
    })
    .await;
    assert_eq!(shown["price_label"], "Current price");
    assert_eq!(shown["leader"], mask_user("rival-two"));
    let extension = shown["extension"].as_str().expect("the extension shown");
    assert!(extension.starts_with("Extended by"), "{extension}");
    let drift = seconds_left(shown["time_left"].as_str().unwrap()) - seconds_to_end(&view);
    assert!(drift.abs() <= 2, "time left after the extension: {shown}");

    // The viewer bids from the page: first too little, then enough to lead.
    submit_bid(&mut page, 1).await;
    let shown = wait_for(&mut page, "the refusal", |s| {
        s["answer"].as_str().is_some_and(|a| a.starts_with("422: "))
    })
    .await;
    assert!(
        shown["answer"].as_str().unwrap().ends_with("(bid_too_low)"),
        "{shown}"
    );
    submit_bid(&mut page, 3_000).await;
    let shown = wait_for(&mut page, "the viewer's bid leading", |s| {
        s["my_bid_status"] == "leading"
    })
    .await;
    let view = app.auction(&auction_id).await;
    assert_eq!(view["leading_bidder"], mask_user("watch-viewer"));
    let price = gld(&view["current_price"]);
    assert_eq!(
        shown["answer"],
        format!("201 Created: leading at {price}"),
        "the bid's answer"
    );
    assert_eq!(
        shown["my_bid"],
        format!("Your maximum 3,000 GLD: leading at {price}")
    );

    // A rival outbids the viewer: the page learns it from /api/me/events.
    app.bid_resolved("rival-one", &auction_id, 5_000).await;
    let view = app.auction(&auction_id).await;
    let shown = wait_for(&mut page, "the viewer outbid", |s| {
        s["my_bid_status"] == "outbid" && s["price"] == gld(&view["current_price"])
    })
    .await;
    assert_eq!(shown["leader"], mask_user("rival-one"));
    assert_eq!(shown["my_bid"], "Your maximum 3,000 GLD: outbid");

    let screenshot = test_output_dir().join("watch-page.png");
    page.screenshot(&screenshot).await;
    println!("watch page screenshot: {}", screenshot.display());
    assert!(
        page.problems.is_empty(),
        "the page reported problems (a CSP violation is one): {:#?}",
        page.problems
    );
}

/// Fills the page's amount field and submits its form, as a viewer would.
async fn submit_bid(page: &mut Page, amount: i64) {
    page.evaluate(&format!(
        "document.getElementById('amount').value = '{amount}'; \
         document.getElementById('bid-form').requestSubmit();"
    ))
    .await;
}

/// The page's files carry the page's own policy (only `'self'`) and the
/// contract's other headers; the API keeps `default-src 'none'`.
async fn assert_page_headers(app: &TestApp, auction_id: &str) {
    let page_policy =
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
    for (path, content_type) in [
        ("/watch", "text/html; charset=utf-8"),
        ("/watch/watch.js", "text/javascript; charset=utf-8"),
        ("/watch/watch.css", "text/css; charset=utf-8"),
    ] {
        let response = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path} without a token");
        assert_eq!(header(&response, "content-type"), content_type, "{path}");
        assert_eq!(
            header(&response, "content-security-policy"),
            page_policy,
            "{path}"
        );
        assert_contract_headers(path, |name| header(&response, name));
    }
    let api = app
        .get_as(&format!("/api/auctions/{auction_id}"), "reader", &[])
        .await;
    assert_eq!(
        header(&api, "content-security-policy"),
        "default-src 'none'; frame-ancestors 'none'"
    );
    let posted = app.http.post(app.url("/watch")).send().await.unwrap();
    assert_eq!(posted.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        header(&posted, "content-security-policy"),
        "default-src 'none'; frame-ancestors 'none'",
        "a problem answer is the API's"
    );
}
