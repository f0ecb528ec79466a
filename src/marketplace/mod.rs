//! Events for the marketplace (API.md "Events for the marketplace"): the
//! JSON form of an event with its stable id, the feed's opaque cursor, and
//! the feed itself ([`Feed`]), which pages the event log and can hold an
//! empty page open until something settles. Webhook delivery
//! ([`crate::webhooks`]) renders the same events.

mod feed;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;

pub use feed::{Feed, FeedPage, MAX_LIMIT, MAX_WAIT_S};

use crate::db::events::Position;
use crate::db::marketplace::MarketEvent;

/// An event as the feed lists it and a webhook posts it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Unique and stable: derived from the event's row in the log.
    pub id: String,
    /// The event's type, e.g. `auction.settled`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it happened (RFC 3339, milliseconds, UTC).
    pub timestamp: String,
    /// Its payload.
    pub data: Value,
}

impl From<&MarketEvent> for Event {
    fn from(event: &MarketEvent) -> Self {
        Event {
            id: event_id(event.position),
            kind: event.kind.clone(),
            timestamp: event
                .at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            data: event.data.clone(),
        }
    }
}

/// The id of the event at `position`: its row key, which no other row has
/// and which never changes.
pub fn event_id(position: Position) -> String {
    format!(
        "evt_{}_{}_{}",
        position.xid,
        position.auction_id.simple(),
        position.n
    )
}

/// The feed's opaque cursor: a position in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(pub Position);

impl Cursor {
    /// The text a client sends back as `after`.
    pub fn encode(&self) -> String {
        let Position { xid, auction_id, n } = self.0;
        URL_SAFE_NO_PAD.encode(format!("m1.{xid}.{auction_id}.{n}"))
    }

    /// Reads a cursor; `None` when the text is not one.
    pub fn decode(text: &str) -> Option<Cursor> {
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(text.trim()).ok()?).ok()?;
        let fields: Vec<&str> = raw.strip_prefix("m1.")?.split('.').collect();
        let [xid, auction_id, n] = fields[..] else {
            return None;
        };
        let xid: i64 = xid.parse().ok().filter(|x| *x >= 0)?;
        Some(Cursor(Position {
            xid,
            auction_id: auction_id.parse().ok()?,
            n: n.parse().ok()?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn a_cursor_reads_back_and_garbage_is_refused() {
        let cursor = Cursor(Position {
            xid: 7_123,
            auction_id: Uuid::now_v7(),
            n: 1,
        });
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        for text in ["", "yesterday", "bTEuMS4y", "djEuMS4yLjMuNA"] {
            assert_eq!(Cursor::decode(text), None, "{text}");
        }
    }

    #[test]
    fn an_event_id_is_its_row_key() {
        let auction_id = Uuid::now_v7();
        let position = Position {
            xid: 42,
            auction_id,
            n: 1,
        };
        assert_eq!(
            event_id(position),
            format!("evt_42_{}_1", auction_id.simple())
        );
        assert_ne!(event_id(position), event_id(Position { n: 0, ..position }));
    }
}
