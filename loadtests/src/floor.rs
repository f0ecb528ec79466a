//! The HTTP floor: what a request costs on Gavel's HTTP stack with nothing
//! behind it. An axum router served over HTTP/1.1 keep-alive connections
//! as Gavel serves its API (hyper's connection builder, the same read
//! buffer, `TCP_NODELAY`), answering the generator's requests without a
//! database: every bid `202` with a small JSON body, every auction view
//! `200` (or `304` to its `ETag`), every auction created `201`. `bench
//! --modes floor` runs a scenario against it, so that Gavel's own CPU per
//! request can be read against the least any server on this stack spends.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use uuid::Uuid;

/// hyper's read buffer, as Gavel's (`gavel::http::serve::MAX_READ_BUFFER`).
const MAX_READ_BUFFER: usize = gavel::http::serve::MAX_READ_BUFFER;
/// The one version every auction view shows.
const VERSION: &str = "\"1\"";

/// The floor's routes: the requests the generator sends, and `/readyz`.
pub fn router() -> Router {
    Router::new()
        .route("/readyz", get(|| async { StatusCode::OK }))
        .route("/api/auctions", post(create_auction))
        .route("/api/auctions/{id}", get(view))
        .route("/api/auctions/{id}/bids", post(place_bid))
}

/// `POST /api/auctions`: a new id, nothing kept.
async fn create_auction(_body: Bytes) -> Response {
    (StatusCode::CREATED, Json(json!({ "id": Uuid::now_v7() }))).into_response()
}

/// `POST /api/auctions/{id}/bids`: `202 Accepted`, the bid pending, as
/// Gavel answers a bid it has appended.
async fn place_bid(Path(auction_id): Path<Uuid>, _body: Bytes) -> Response {
    let bid = json!({ "id": Uuid::now_v7(), "auction_id": auction_id, "status": "pending" });
    (StatusCode::ACCEPTED, Json(bid)).into_response()
}

/// `GET /api/auctions/{id}`: one unchanging version of the auction.
async fn view(Path(id): Path<Uuid>, headers: HeaderMap) -> Response {
    let etag = HeaderValue::from_static(VERSION);
    if headers.get(header::IF_NONE_MATCH) == Some(&etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let view = json!({ "id": id, "version": 1, "next_min_bid": 1 });
    ([(header::ETAG, etag)], Json(view)).into_response()
}

/// Serves the floor on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let router = router();
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let response = router.clone().oneshot(request.map(Body::new));
            async move { Ok::<_, Infallible>(response.await.unwrap_or_else(|e| match e {})) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_READ_BUFFER)
            .serve_connection(TokioIo::new(stream), service);
        tokio::spawn(connection);
    }
}

/// `gavel-loadtest floor`: serves the floor on `listen` until SIGTERM or
/// Ctrl-C.
pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("HTTP floor on http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(term) => term.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminated => {}
        }
        stop.cancel();
    });
    serve(listener, shutdown).await
}
