//! The one error shape of the API and how failures map to it.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::OVERLOAD_RETRY_AFTER_SECS;
use crate::storage::sqlstate;

/// Machine-readable error kinds; stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A parameter is missing, malformed, out of range, unknown or repeated (400).
    BadRequest,
    /// The bearer token is missing or wrong (401).
    Unauthorized,
    /// No such route (404).
    NotFound,
    /// The route exists but not for this method (405).
    MethodNotAllowed,
    /// The database is unreachable, overloaded, or the query ran out of time (503).
    Unavailable,
    /// The API is serving as many requests as it may at once (503 with `Retry-After`); retry
    /// after that many seconds.
    Overloaded,
    /// Anything else (500); details are in the service log, not in the response.
    Internal,
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorDetail {
    /// The kind of error.
    code: ErrorCode,
    /// A human-readable explanation.
    message: String,
    /// The query or path parameter at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    parameter: Option<String>,
}

#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: ErrorCode,
    pub(super) message: String,
    pub(super) parameter: Option<String>,
}

impl ApiError {
    pub(super) fn bad_parameter(parameter: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: ErrorCode::BadRequest,
            message: message.into(),
            parameter: Some(shorten(parameter, 100)),
        }
    }

    pub(super) fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: ErrorCode::Unavailable,
            message: message.into(),
            parameter: None,
        }
    }

    pub(super) fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: ErrorCode::Unauthorized,
            message: "missing or invalid bearer token (Authorization: Bearer <token>)".into(),
            parameter: None,
        }
    }

    /// All `limit` request permits are taken.
    pub(super) fn overloaded(limit: usize) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: ErrorCode::Overloaded,
            message: format!(
                "the API is serving its maximum of {limit} requests at once; retry after {OVERLOAD_RETRY_AFTER_SECS} s"
            ),
            parameter: None,
        }
    }

    pub(super) fn internal() -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: ErrorCode::Internal,
            message: "internal error; see the service log".into(),
            parameter: None,
        }
    }

    /// Maps a database error to 503 (the database cannot answer now) or 500, logging what
    /// happened without connection details.
    pub(super) fn database(e: &sqlx::Error, statement_timeout: Duration) -> Self {
        let description = crate::storage::describe_error(e);
        match e {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if code == sqlstate::QUERY_CANCELED {
                    tracing::warn!(error = %description, "query API: statement timeout");
                    return Self::unavailable(format!(
                        "the query took longer than {} ms; narrow the time range or add filters",
                        statement_timeout.as_millis()
                    ));
                }
                if sqlstate::unavailable(&code) {
                    tracing::warn!(error = %description, "query API: database unavailable");
                    return Self::unavailable("database unavailable; retry later");
                }
                tracing::error!(error = %description, "query API: database error");
                Self::internal()
            }
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::BeginFailed => {
                tracing::warn!(error = %description, "query API: database unavailable");
                Self::unavailable("database unavailable; retry later")
            }
            _ => {
                tracing::error!(error = %description, "query API: database error");
                Self::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code;
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                parameter: self.parameter,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        match code {
            ErrorCode::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ErrorCode::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(OVERLOAD_RETRY_AFTER_SECS));
            }
            _ => {}
        }
        response
    }
}

pub(super) fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(max_chars).collect();
        s.push('…');
        s
    }
}

pub(super) async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: ErrorCode::NotFound,
        message: "no such route; see /api/v1/openapi.json".into(),
        parameter: None,
    }
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: ErrorCode::MethodNotAllowed,
        message: "method not allowed; this API only answers GET".into(),
        parameter: None,
    }
}

/// The error answers every data endpoint shares, for the OpenAPI document (`responses(...,
/// CommonErrors)`); the 400 stays with each endpoint, whose description says what it checks.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its derive is used
pub(super) enum CommonErrors {
    /// Missing or wrong bearer token.
    #[response(status = 401, description = "Missing or wrong bearer token")]
    Unauthorized(ErrorBody),
    /// Unexpected failure.
    #[response(status = 500, description = "Unexpected failure")]
    Internal(ErrorBody),
    /// The database cannot answer now, or too many requests.
    #[response(
        status = 503,
        description = "`unavailable`: the database is down or the query too slow; `overloaded`: too many requests at once, retry after `Retry-After` seconds",
        headers(("Retry-After" = u64, description = "With `overloaded`: seconds to wait before retrying"))
    )]
    Unavailable(ErrorBody),
}
