//! Errors the proxy answers itself, in OpenAI's shape (`{"error":{"message","type","code"}}`),
//! so SDKs surface them like any API error. Each knows its status, a bounded `error.type` for
//! spans and metrics, and never includes a secret or an internal detail.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::audit::RequestError;

/// A request the proxy answers without (or after failing to reach) the upstream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// The body exceeds `server.max_body_bytes`.
    #[error("request body exceeds the limit of {0} bytes")]
    BodyTooLarge(usize),
    /// Request headers exceed `server.max_header_bytes`.
    #[error("request headers exceed the limit of {0} bytes")]
    HeadersTooLarge(usize),
    /// The body could not be read from the client.
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    /// Not `application/json`.
    #[error("unsupported content type {0:?}: send application/json")]
    UnsupportedMediaType(String),
    /// The JSON body is not an acceptable request.
    #[error("{0}")]
    InvalidRequest(#[from] RequestError),
    /// Authentication failed (managed keys).
    #[error("{message}")]
    Unauthorized {
        /// Bounded reason (`missing_key`, `unknown_key`, `malformed`).
        reason: &'static str,
        /// What the client is told.
        message: &'static str,
    },
    /// The audit store is failing and `on_store_failure = "reject"`.
    #[error("the audit store is unavailable; requests are refused until it recovers")]
    StoreUnavailable,
    /// The upstream did not answer in time.
    #[error("upstream {which} timeout ({})", humantime::format_duration(*after))]
    UpstreamTimeout {
        /// `connect`, `first-byte` or `idle`.
        which: &'static str,
        /// The configured limit.
        after: Duration,
    },
    /// The proxy shut down (grace period over) before the answer was complete.
    #[error("the audit proxy shut down before the answer was complete")]
    ShuttingDown,
    /// The upstream could not be reached or broke the connection.
    #[error("upstream connection failed: {0}")]
    UpstreamTransport(String),
}

impl ProxyError {
    /// HTTP status answered.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyRead(_) | ProxyError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::StoreUnavailable | ProxyError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamTransport(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// OpenAI's `type`.
    fn error_type(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized { .. } => "authentication_error",
            ProxyError::StoreUnavailable
            | ProxyError::ShuttingDown
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::UpstreamTransport(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `code`; also the bounded `error.type` of the span and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge(_) => "request_too_large",
            ProxyError::HeadersTooLarge(_) => "headers_too_large",
            ProxyError::BodyRead(_) => "body_read_failed",
            ProxyError::UnsupportedMediaType(_) => "unsupported_media_type",
            ProxyError::InvalidRequest(e) => e.code(),
            ProxyError::Unauthorized { .. } => "invalid_api_key",
            ProxyError::StoreUnavailable => "audit_store_unavailable",
            ProxyError::ShuttingDown => "shutting_down",
            ProxyError::UpstreamTimeout { .. } => "timeout",
            ProxyError::UpstreamTransport(_) => "upstream_unreachable",
        }
    }

    /// The response, carrying the audit record's id.
    pub fn into_response_with_id(self, request_id: &str) -> Response {
        let body = json!({"error": {
            "message": self.to_string(),
            "type": self.error_type(),
            "code": self.code(),
        }});
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Ok(v) = HeaderValue::from_str(request_id) {
            response.headers_mut().insert(super::REQUEST_ID_HEADER, v);
        }
        response
    }
}
