//! The read-only query API on `API_PORT`: events, counts and user timelines as JSON, plus the
//! OpenAPI document that describes them. Served from the consumer process (`nexus-analytics
//! run`, for small installs) or from its own process (`nexus-analytics api`), so that API load
//! and ingestion can be separate failure domains.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /api/v1/events` | events, newest first, filtered; keyset pagination (`cursor`, `limit`) |
//! | `GET /api/v1/stats/counts` | counts per minute, hour or day by event type or service, from `analytics.event_counts` |
//! | `GET /api/v1/users/{user_id}/timeline` | one user's events, newest first, paginated like events |
//! | `GET /api/v1/openapi.json` | the OpenAPI 3.1 document, generated from this module |
//!
//! **Errors** always have the shape `{"error": {"code", "message", "parameter"?}}`, where `code`
//! is one of [`ErrorCode`]'s values and `parameter` names the query or path parameter at fault
//! (unknown, repeated and empty parameters included: leave a parameter out rather than send it
//! empty).
//!
//! **Authentication**: when a token is configured (`API_TOKEN`), every route except
//! `openapi.json` needs `Authorization: Bearer <token>`; the document stays open so tools can
//! fetch it. The comparison takes the same time wherever the tokens differ, and the token is
//! never logged.
//!
//! **Bounded work and memory** ([`ApiLimits`]), so that no client can hurt the process it
//! shares with ingestion:
//! - every request runs in its own `READ ONLY` transaction with `SET LOCAL statement_timeout`,
//!   and the whole database part of a request is abandoned a little after that;
//! - an event page holds at most `limit` ≤ [`MAX_LIMIT`] events **and** at most
//!   `max_page_bytes` of JSON: rows are read through a server-side cursor a few at a time and
//!   reading stops when the next row would exceed the budget; the page then says
//!   `"truncated": "byte_budget"` and carries a `next_cursor`. A single row larger than the
//!   budget is still returned, alone on its page, so a request holds at most
//!   `max(max_page_bytes, largest row)` plus one row being read;
//! - count queries are bounded in range ([`Bucket::max_range`]) and points ([`MAX_SERIES_POINTS`]);
//! - at most `max_concurrent_requests` requests are served at once (each with its own
//!   database connection); one more is answered at once with 503 `overloaded` and
//!   `Retry-After`, never queued. A permit is held until the response body has been sent.
//!
//! A database that is down or too slow gives 503 `unavailable`, never connection details.

mod counts;
mod errors;
mod events;
mod openapi;
mod params;
pub mod probes;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body::Body as HttpBody;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use secrecy::{ExposeSecret, SecretString};

pub use counts::{Bucket, GroupBy, MAX_SERIES_POINTS};
use errors::ApiError;
pub use errors::ErrorCode;
pub use events::{DEFAULT_LIMIT, MAX_LIMIT, Truncated};
pub use openapi::openapi;

/// Statement timeout of every API query unless [`ApiLimits::statement_timeout`] says otherwise.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default JSON budget of one event page (`API_MAX_PAGE_BYTES`).
pub const DEFAULT_MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Default number of requests served at once (`API_MAX_CONCURRENT_REQUESTS`).
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 8;
/// `Retry-After` (seconds) of the 503 `overloaded` answer.
pub const OVERLOAD_RETRY_AFTER_SECS: u64 = 1;
/// Time allowed on top of the statement timeout (waiting for a connection, round trips) before
/// a request is abandoned with 503.
const REQUEST_GRACE: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------------------------ state

/// The bounds every request is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Per-statement time budget (at least one millisecond).
    pub statement_timeout: Duration,
    /// JSON bytes one event page may hold; a row larger than this is returned alone.
    pub max_page_bytes: usize,
    /// Requests served at once; more are refused with 503 `overloaded` (at least 1).
    pub max_concurrent_requests: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            max_page_bytes: DEFAULT_MAX_PAGE_BYTES,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
        }
    }
}

/// What the API handlers share: the read pool, the optional bearer token, the limits and the
/// request permits.
///
/// Built from `(pool, token)`: `ApiState::new(pool, settings.api.token.clone())` or
/// `ApiState::from((pool, token))`, then [`ApiState::with_limits`].
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    token: Option<SecretString>,
    limits: ApiLimits,
    permits: Arc<Semaphore>,
    openapi_json: String,
}

impl ApiState {
    /// The state for a pool (ideally a read-only role's, see [`read_pool`]) and the token every
    /// request must carry (`None`: no authentication), with the default [`ApiLimits`].
    pub fn new(pool: PgPool, token: Option<SecretString>) -> Self {
        let openapi_json =
            openapi().to_json().expect("the generated OpenAPI document serialises to JSON");
        Self::build(pool, token, ApiLimits::default(), openapi_json)
    }

    fn build(
        pool: PgPool,
        token: Option<SecretString>,
        limits: ApiLimits,
        openapi_json: String,
    ) -> Self {
        let limits = ApiLimits {
            statement_timeout: limits.statement_timeout.max(Duration::from_millis(1)),
            max_page_bytes: limits.max_page_bytes.max(1),
            max_concurrent_requests: limits.max_concurrent_requests.max(1),
        };
        let permits = Arc::new(Semaphore::new(limits.max_concurrent_requests));
        Self { inner: Arc::new(Inner { pool, token, limits, permits, openapi_json }) }
    }

    /// Replaces the limits (zero values are raised to the smallest legal one).
    pub fn with_limits(self, limits: ApiLimits) -> Self {
        let inner = &self.inner;
        Self::build(inner.pool.clone(), inner.token.clone(), limits, inner.openapi_json.clone())
    }

    /// Changes the per-statement time budget only.
    pub fn with_statement_timeout(self, timeout: Duration) -> Self {
        let limits = ApiLimits { statement_timeout: timeout, ..self.inner.limits };
        self.with_limits(limits)
    }

    /// The limits in force.
    pub fn limits(&self) -> ApiLimits {
        self.inner.limits
    }

    /// The per-statement time budget.
    pub fn statement_timeout(&self) -> Duration {
        self.inner.limits.statement_timeout
    }

    /// Whether requests must carry a bearer token.
    pub fn requires_token(&self) -> bool {
        self.inner.token.is_some()
    }
}

impl From<(PgPool, Option<SecretString>)> for ApiState {
    fn from((pool, token): (PgPool, Option<SecretString>)) -> Self {
        Self::new(pool, token)
    }
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("token", &self.inner.token)
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

/// A lazily connecting pool for the API (`API_DATABASE_URL`, else `DATABASE_URL`): sessions
/// default to read-only transactions and to [`DEFAULT_STATEMENT_TIMEOUT`], a connection is
/// waited for at most 3 s, and the application name is `nexus-analytics-api`. Size it to
/// [`ApiLimits::max_concurrent_requests`]: every admitted request then finds a connection.
///
/// Call inside a Tokio runtime. The error never contains the URL's password.
pub fn read_pool(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let timeout_ms = DEFAULT_STATEMENT_TIMEOUT.as_millis().to_string();
    let options = options.application_name("nexus-analytics-api").options([
        ("default_transaction_read_only", "on"),
        ("statement_timeout", timeout_ms.as_str()),
    ]);
    Ok(crate::storage::lazy_pool(options, max_connections))
}

// ----------------------------------------------------------------------------------- router

/// The query API router (all of `/api/v1`), to be served on `API_PORT`. Any other path answers
/// 404 and a wrong method 405, both with the JSON error shape.
pub fn router(state: ApiState) -> Router {
    // Layers run outside in: authenticate first (cheap, and an unauthenticated flood takes no
    // permit), then take a permit or answer 503 overloaded.
    let protected = Router::new()
        .route("/api/v1/events", get(events::list_events))
        .route("/api/v1/stats/counts", get(counts::event_counts))
        .route("/api/v1/users/{user_id}/timeline", get(events::user_timeline))
        .route_layer(middleware::from_fn_with_state(state.clone(), limit_concurrency))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .merge(protected)
        .fallback(errors::not_found)
        .method_not_allowed_fallback(errors::method_not_allowed)
        .with_state(state)
}

// ------------------------------------------------------------------------------ concurrency

/// Serves the request with a permit, or refuses it at once when all permits are taken. The
/// permit travels with the response body, so a slow reader keeps counting against the limit
/// for as long as its page is held in memory.
async fn limit_concurrency(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(permit) = state.inner.permits.clone().try_acquire_owned() else {
        tracing::debug!("query API: overloaded, request refused");
        return ApiError::overloaded(state.inner.limits.max_concurrent_requests).into_response();
    };
    let (parts, body) = next.run(request).await.into_parts();
    Response::from_parts(parts, Body::new(PermitBody { body, _permit: permit }))
}

/// A response body that returns its request permit when it is dropped (sent or abandoned).
struct PermitBody {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for PermitBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

// ------------------------------------------------------------------------------------- auth

async fn authorize(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.inner.token
        && !bearer_matches(request.headers(), token)
    {
        return ApiError::unauthorized().into_response();
    }
    next.run(request).await
}

fn bearer_matches(headers: &HeaderMap, token: &SecretString) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return false };
    let value = value.as_bytes();
    let (scheme, presented) = match value.iter().position(|b| *b == b' ') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => return false,
    };
    scheme.eq_ignore_ascii_case(b"bearer")
        && constant_time_eq(trim_ascii(presented), token.expose_secret().as_bytes())
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Compares in time that depends only on the lengths, never on where the bytes differ
/// (`subtle`: the comparison the RustCrypto crates use, not a hand-written loop).
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    presented.ct_eq(expected).into()
}

// --------------------------------------------------------------------------------- database

/// Runs `work` in a read-only transaction with the statement timeout set, giving up a little
/// after the timeout (waiting for a pool connection included).
async fn read_only<T, F>(state: &ApiState, work: F) -> Result<T, ApiError>
where
    F: for<'t> FnOnce(
        &'t mut sqlx::PgConnection,
    ) -> futures::future::BoxFuture<'t, Result<T, sqlx::Error>>,
{
    let timeout = state.inner.limits.statement_timeout;
    let run = async {
        let begin = format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {}",
            timeout.as_millis().max(1)
        );
        let mut tx = state.inner.pool.begin_with(sqlx::AssertSqlSafe(begin)).await?;
        let out = work(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    };
    match tokio::time::timeout(timeout + REQUEST_GRACE, run).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(ApiError::database(&e, timeout)),
        Err(_) => {
            tracing::warn!("query API: request abandoned after {:?}", timeout + REQUEST_GRACE);
            Err(ApiError::unavailable("database did not answer in time; retry later"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        let mut headers = HeaderMap::new();
        let token = SecretString::from("s3cr3t");
        assert!(!bearer_matches(&headers, &token));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer s3cr3t"));
        assert!(bearer_matches(&headers, &token));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic s3cr3t"));
        assert!(!bearer_matches(&headers, &token));
    }
}
