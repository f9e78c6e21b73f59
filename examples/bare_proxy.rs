//! The floor of the stack, for `bench/`: a reverse proxy on the same axum/hyper/tokio server,
//! hyper-util pooled client and allocator as `llm-audit serve`, with no auditing at all (no
//! parsing, no record, no span, no metrics, no store). Its CPU per request, beside nginx's and
//! the audit proxy's, splits the audit proxy's cost into "the stack" and "the audit".
//!
//! `cargo run --release --example bare_proxy -- 127.0.0.1:18083 http://127.0.0.1:18080`

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Upstream = Client<HttpConnector, Body>;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:18083".into())
        .parse()?;
    let base = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:18080".into());
    tokio::runtime::Runtime::new()?.block_on(async move {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client: Upstream = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(http);
        let state = Arc::new((client, base));
        let app = Router::new().fallback(forward).with_state(state);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        eprintln!("bare proxy on http://{addr}");
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}

async fn forward(State(state): State<Arc<(Upstream, String)>>, mut req: Request) -> Response {
    let (client, base) = &*state;
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{base}{path}").parse::<Uri>() else {
        return axum::http::StatusCode::BAD_REQUEST.into_response();
    };
    *req.uri_mut() = uri;
    req.headers_mut().remove(axum::http::header::HOST);
    match client.request(req).await {
        Ok(resp) => resp.map(Body::new),
        Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
    }
}
