//! The read-only query API on `API_PORT`: events, counts and user timelines as JSON, plus the
//! OpenAPI document that describes them.
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
//! **Bounded work**: every request runs in its own `READ ONLY` transaction with
//! `SET LOCAL statement_timeout` ([`DEFAULT_STATEMENT_TIMEOUT`] unless changed with
//! [`ApiState::with_statement_timeout`]), the whole database part of a request is abandoned a
//! little after that, pages hold at most [`MAX_LIMIT`] events, and count queries are bounded in
//! range ([`Bucket::max_range`]) and in points ([`MAX_SERIES_POINTS`]). A database that is down
//! or too slow gives 503, never connection details.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use crate::config::Secret;

/// Events per page when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest accepted `limit`.
pub const MAX_LIMIT: u32 = 1000;
/// Largest number of points one counts response may hold; a larger result is refused with 400.
pub const MAX_SERIES_POINTS: usize = 50_000;
/// Statement timeout of every API query unless [`ApiState::with_statement_timeout`] says otherwise.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed on top of the statement timeout (waiting for a connection, round trips) before
/// a request is abandoned with 503.
const REQUEST_GRACE: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------------------------ state

/// What the API handlers share: the read pool, the optional bearer token and the query budget.
///
/// Built from `(pool, token)`: `ApiState::new(pool, settings.api_token.clone())` or
/// `ApiState::from((pool, token))`.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    token: Option<Secret>,
    statement_timeout: Duration,
    openapi_json: String,
}

impl ApiState {
    /// The state for a pool (ideally a read-only role's, see [`read_pool`]) and the token every
    /// request must carry (`None`: no authentication).
    pub fn new(pool: PgPool, token: Option<Secret>) -> Self {
        let openapi_json =
            openapi().to_json().expect("the generated OpenAPI document serialises to JSON");
        let statement_timeout = DEFAULT_STATEMENT_TIMEOUT;
        Self { inner: Arc::new(Inner { pool, token, statement_timeout, openapi_json }) }
    }

    /// Changes the per-statement time budget (at least one millisecond).
    pub fn with_statement_timeout(self, timeout: Duration) -> Self {
        let inner = &self.inner;
        Self {
            inner: Arc::new(Inner {
                pool: inner.pool.clone(),
                token: inner.token.clone(),
                statement_timeout: timeout.max(Duration::from_millis(1)),
                openapi_json: inner.openapi_json.clone(),
            }),
        }
    }

    /// The per-statement time budget.
    pub fn statement_timeout(&self) -> Duration {
        self.inner.statement_timeout
    }

    /// Whether requests must carry a bearer token.
    pub fn requires_token(&self) -> bool {
        self.inner.token.is_some()
    }
}

impl From<(PgPool, Option<Secret>)> for ApiState {
    fn from((pool, token): (PgPool, Option<Secret>)) -> Self {
        Self::new(pool, token)
    }
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("token", &self.inner.token)
            .field("statement_timeout", &self.inner.statement_timeout)
            .finish_non_exhaustive()
    }
}

/// A lazily connecting pool for the API (`API_DATABASE_URL`, else `DATABASE_URL`): sessions
/// default to read-only transactions and to [`DEFAULT_STATEMENT_TIMEOUT`], a connection is
/// waited for at most 3 s, and the application name is `nexus-analytics-api`.
///
/// Call inside a Tokio runtime. The error never contains the URL's password.
pub fn read_pool(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let timeout_ms = DEFAULT_STATEMENT_TIMEOUT.as_millis().to_string();
    let options = options.application_name("nexus-analytics-api").options([
        ("default_transaction_read_only", "on"),
        ("statement_timeout", timeout_ms.as_str()),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(options))
}

// ----------------------------------------------------------------------------------- router

/// The query API router (all of `/api/v1`), to be served on `API_PORT`. Any other path answers
/// 404 and a wrong method 405, both with the JSON error shape.
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/api/v1/events", get(list_events))
        .route("/api/v1/stats/counts", get(event_counts))
        .route("/api/v1/users/{user_id}/timeline", get(user_timeline))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/api/v1/openapi.json", get(openapi_json))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The OpenAPI document of this API, generated from the handlers' annotations.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "nexus-analytics query API",
        description = "Read-only access to the events nexus-analytics stored.\n\n\
            Every error has the shape `{\"error\": {\"code\", \"message\", \"parameter\"?}}`; \
            `parameter` names the query or path parameter at fault. Unknown and repeated query \
            parameters are refused (400), and so are empty values (`?event_type=`): leave the \
            parameter out instead. Times are RFC 3339 (`2026-03-01T12:00:00Z`); ranges include \
            `from` and exclude `to`.\n\n\
            When the service has `API_TOKEN` set, every operation except this document needs \
            `Authorization: Bearer <token>`."
    ),
    paths(list_events, event_counts, user_timeline, openapi_json),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, Bucket, GroupBy)),
    modifiers(&BearerScheme),
    tags(
        (name = "events", description = "Stored events"),
        (name = "stats", description = "Aggregated counts"),
        (name = "meta", description = "This document")
    )
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Required when the service has API_TOKEN set: `Authorization: Bearer <API_TOKEN>`.",
                    ))
                    .build(),
            ),
        );
    }
}

// ----------------------------------------------------------------------------------- errors

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
    /// Anything else (500); details are in the service log, not in the response.
    Internal,
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
struct ErrorDetail {
    /// The kind of error.
    code: ErrorCode,
    /// A human-readable explanation.
    message: String,
    /// The query or path parameter at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    parameter: Option<String>,
}

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    parameter: Option<String>,
}

impl ApiError {
    fn bad_parameter(parameter: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: ErrorCode::BadRequest,
            message: message.into(),
            parameter: Some(shorten(parameter, 100)),
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: ErrorCode::Unavailable,
            message: message.into(),
            parameter: None,
        }
    }

    fn internal() -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: ErrorCode::Internal,
            message: "internal error; see the service log".into(),
            parameter: None,
        }
    }

    /// Maps a database error to 503 (the database cannot answer now) or 500, logging what
    /// happened without connection details.
    fn database(e: &sqlx::Error, statement_timeout: Duration) -> Self {
        let description = crate::storage::describe_error(e);
        match e {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if code == "57014" {
                    tracing::warn!(error = %description, "query API: statement timeout");
                    return Self::unavailable(format!(
                        "the query took longer than {} ms; narrow the time range or add filters",
                        statement_timeout.as_millis()
                    ));
                }
                // 08 connection, 28 login refused, 3D no such database, 53 resources, 57 operator
                // intervention (shutdown), 40 transaction conflicts (hot standbys), 42P01 a table
                // missing before migrations ran: none of them is the request's fault.
                if ["08", "28", "3D", "53", "57", "40"].iter().any(|c| code.starts_with(c))
                    || code == "42P01"
                {
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
        let unauthorized = self.code == ErrorCode::Unauthorized;
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                parameter: self.parameter,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(max_chars).collect();
        s.push('…');
        s
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: ErrorCode::NotFound,
        message: "no such route; see /api/v1/openapi.json".into(),
        parameter: None,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: ErrorCode::MethodNotAllowed,
        message: "method not allowed; this API only answers GET".into(),
        parameter: None,
    }
}

// ------------------------------------------------------------------------------------- auth

async fn authorize(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.inner.token
        && !bearer_matches(request.headers(), token)
    {
        return ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: ErrorCode::Unauthorized,
            message: "missing or invalid bearer token (Authorization: Bearer <token>)".into(),
            parameter: None,
        }
        .into_response();
    }
    next.run(request).await
}

fn bearer_matches(headers: &HeaderMap, token: &Secret) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return false };
    let value = value.as_bytes();
    let (scheme, presented) = match value.iter().position(|b| *b == b' ') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => return false,
    };
    scheme.eq_ignore_ascii_case(b"bearer")
        && constant_time_eq(trim_ascii(presented), token.expose().as_bytes())
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Compares in time that depends only on the lengths, never on where the bytes differ.
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = (presented.len() ^ expected.len()) as u64;
    if expected.is_empty() {
        return diff == 0;
    }
    for (i, b) in presented.iter().enumerate() {
        diff |= u64::from(b ^ expected[i % expected.len()]);
    }
    std::hint::black_box(diff) == 0
}

// ------------------------------------------------------------------------------- parameters

/// The query parameters of one request, checked against the names an operation accepts.
struct QueryParams {
    values: BTreeMap<String, String>,
}

impl QueryParams {
    fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Self, ApiError> {
        let mut values = BTreeMap::new();
        for (name, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if name.is_empty() && value.is_empty() {
                continue; // `?&limit=5`
            }
            if !allowed.contains(&name.as_ref()) {
                return Err(ApiError::bad_parameter(
                    &name,
                    format!("unknown query parameter; accepted: {}", allowed.join(", ")),
                ));
            }
            if values.insert(name.to_string(), value.to_string()).is_some() {
                return Err(ApiError::bad_parameter(&name, "given more than once"));
            }
        }
        Ok(Self { values })
    }

    /// A non-empty text value.
    fn text(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.values.get(name).map(String::as_str) {
            None => Ok(None),
            Some("") => Err(ApiError::bad_parameter(
                name,
                "must not be empty (leave the parameter out instead)",
            )),
            Some(v) => Ok(Some(checked_text(name, v)?.to_string())),
        }
    }

    fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.text(name)?.map(|v| parse_time(name, &v)).transpose()
    }

    fn limit(&self) -> Result<u32, ApiError> {
        let Some(v) = self.text("limit")? else { return Ok(DEFAULT_LIMIT) };
        match v.trim().parse::<i64>() {
            Ok(n) if (1..=i64::from(MAX_LIMIT)).contains(&n) => Ok(n as u32),
            Ok(_) => {
                Err(ApiError::bad_parameter("limit", format!("must be between 1 and {MAX_LIMIT}")))
            }
            Err(_) => Err(ApiError::bad_parameter(
                "limit",
                format!("must be an integer between 1 and {MAX_LIMIT}"),
            )),
        }
    }

    fn cursor(&self) -> Result<Option<Cursor>, ApiError> {
        self.text("cursor")?.map(|v| Cursor::decode(&v)).transpose()
    }
}

/// PostgreSQL text cannot hold NUL; refusing it here keeps such input a 400, not a 500.
fn checked_text<'a>(name: &str, value: &'a str) -> Result<&'a str, ApiError> {
    if value.contains('\0') {
        return Err(ApiError::bad_parameter(name, "must not contain NUL characters"));
    }
    Ok(value)
}

fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    let parsed = DateTime::parse_from_rfc3339(value)
        // An unencoded `+01:00` arrives as ` 01:00` (form encoding turns `+` into a space).
        .or_else(|e| match value.rfind(' ') {
            Some(i) if i > 10 => {
                DateTime::parse_from_rfc3339(&format!("{}+{}", &value[..i], &value[i + 1..]))
            }
            _ => Err(e),
        })
        .map_err(|e| {
            ApiError::bad_parameter(
                name,
                format!("not an RFC 3339 time such as 2026-03-01T12:00:00Z ({e})"),
            )
        })?;
    Ok(parsed.with_timezone(&Utc))
}

fn check_range(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Result<(), ApiError> {
    match (from, to) {
        (Some(from), Some(to)) if to <= from => {
            Err(ApiError::bad_parameter("to", "must be later than from"))
        }
        _ => Ok(()),
    }
}

/// Position after the last event of a page: its (timestamp, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    timestamp: DateTime<Utc>,
    id: i64,
}

impl Cursor {
    fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}:{}", self.timestamp.timestamp_micros(), self.id))
    }

    fn decode(text: &str) -> Result<Self, ApiError> {
        let invalid =
            || ApiError::bad_parameter("cursor", "not a cursor returned by this API (next_cursor)");
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| invalid())?;
        let text = std::str::from_utf8(&bytes).map_err(|_| invalid())?;
        let (micros, id) = text.split_once(':').ok_or_else(invalid)?;
        let micros: i64 = micros.parse().map_err(|_| invalid())?;
        let id: i64 = id.parse().map_err(|_| invalid())?;
        let timestamp = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
        Ok(Self { timestamp, id })
    }
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
    let timeout = state.inner.statement_timeout;
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

// ----------------------------------------------------------------------------------- events

/// One stored event.
#[derive(Debug, Serialize, ToSchema)]
struct EventOut {
    /// Row id (unique together with `timestamp`).
    id: i64,
    /// Event type, e.g. `user.registered`.
    event_type: String,
    /// The user the event is about.
    user_id: String,
    /// The service that emitted it.
    service: String,
    /// When the event happened (UTC).
    timestamp: DateTime<Utc>,
    /// The event's payload as sent, or null.
    data: Option<serde_json::Value>,
    /// When the row was stored (UTC).
    created_at: DateTime<Utc>,
}

/// A page of events, newest first.
#[derive(Debug, Serialize, ToSchema)]
struct EventsPage {
    /// The events of this page, ordered by `timestamp` then `id`, descending.
    events: Vec<EventOut>,
    /// Pass as `cursor` to get the next page; null on the last page.
    next_cursor: Option<String>,
}

/// A page of one user's events, newest first.
#[derive(Debug, Serialize, ToSchema)]
struct TimelinePage {
    /// The user.
    user_id: String,
    /// The events of this page, ordered by `timestamp` then `id`, descending.
    events: Vec<EventOut>,
    /// Pass as `cursor` to get the next page; null on the last page.
    next_cursor: Option<String>,
}

/// Query parameters of `GET /api/v1/events` (documentation; parsing is done by hand so that
/// every failure names its parameter).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct EventsQuery {
    /// Only events of this type (exact match).
    #[param(min_length = 1)]
    event_type: Option<String>,
    /// Only events of this user (exact match).
    #[param(min_length = 1)]
    user_id: Option<String>,
    /// Only events from this service (exact match).
    #[param(min_length = 1)]
    service: Option<String>,
    /// Only events at or after this time (RFC 3339).
    from: Option<DateTime<Utc>>,
    /// Only events before this time (RFC 3339); must be later than `from`.
    to: Option<DateTime<Utc>>,
    /// `next_cursor` of the previous page (opaque); omit for the first page.
    #[param(min_length = 1, pattern = "^[A-Za-z0-9_-]+$")]
    cursor: Option<String>,
    /// Events per page.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
}

/// Query parameters of `GET /api/v1/users/{user_id}/timeline`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct TimelineQuery {
    /// `next_cursor` of the previous page (opaque); omit for the first page.
    #[param(min_length = 1, pattern = "^[A-Za-z0-9_-]+$")]
    cursor: Option<String>,
    /// Events per page.
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
}

#[derive(Debug, Default)]
struct EventFilter {
    event_type: Option<String>,
    user_id: Option<String>,
    service: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    cursor: Option<Cursor>,
    limit: u32,
}

/// Events matching `filter`, newest first, one page.
async fn fetch_events(
    state: &ApiState,
    filter: EventFilter,
) -> Result<(Vec<EventOut>, Option<String>), ApiError> {
    let mut sql = String::from(
        r#"SELECT id, event_type, user_id, service, "timestamp", data, created_at
FROM analytics.events WHERE TRUE"#,
    );
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    if filter.event_type.is_some() {
        let _ = write!(sql, " AND event_type = ${}", next());
    }
    if filter.user_id.is_some() {
        let _ = write!(sql, " AND user_id = ${}", next());
    }
    if filter.service.is_some() {
        let _ = write!(sql, " AND service = ${}", next());
    }
    if filter.from.is_some() {
        let _ = write!(sql, r#" AND "timestamp" >= ${}"#, next());
    }
    if filter.to.is_some() {
        let _ = write!(sql, r#" AND "timestamp" < ${}"#, next());
    }
    if filter.cursor.is_some() {
        // Written so the timestamp indexes (and partition pruning) apply.
        let (ts, id) = (next(), next());
        let _ = write!(sql, r#" AND "timestamp" <= ${ts} AND ("timestamp" < ${ts} OR id < ${id})"#);
    }
    let _ = write!(sql, r#" ORDER BY "timestamp" DESC, id DESC LIMIT ${}"#, next());

    let limit = filter.limit as usize;
    let rows = read_only(state, move |conn| {
        Box::pin(async move {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for value in [filter.event_type, filter.user_id, filter.service].into_iter().flatten() {
                query = query.bind(value);
            }
            for value in [filter.from, filter.to].into_iter().flatten() {
                query = query.bind(value);
            }
            if let Some(cursor) = filter.cursor {
                query = query.bind(cursor.timestamp).bind(cursor.id);
            }
            query = query.bind(filter.limit as i64 + 1);
            query.fetch_all(&mut *conn).await
        })
    })
    .await?;

    let mut events =
        rows.iter().map(event_from_row).collect::<Result<Vec<_>, _>>().map_err(|e| {
            tracing::error!(error = %crate::storage::describe_error(&e), "query API: unexpected row shape");
            ApiError::internal()
        })?;
    let next_cursor = if events.len() > limit {
        events.truncate(limit);
        events.last().map(|e| Cursor { timestamp: e.timestamp, id: e.id }.encode())
    } else {
        None
    };
    Ok((events, next_cursor))
}

fn event_from_row(row: &PgRow) -> Result<EventOut, sqlx::Error> {
    Ok(EventOut {
        id: row.try_get("id")?,
        event_type: row.try_get("event_type")?,
        user_id: row.try_get("user_id")?,
        service: row.try_get("service")?,
        timestamp: row.try_get("timestamp")?,
        data: row.try_get("data")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Lists stored events, newest first, with optional filters and keyset pagination.
#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "events",
    operation_id = "list_events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events", body = EventsPage),
        (status = 400, description = "A bad parameter (named in `error.parameter`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 500, description = "Unexpected failure", body = ErrorBody),
        (status = 503, description = "Database unavailable or query too slow", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn list_events(State(state): State<ApiState>, RawQuery(raw): RawQuery) -> Response {
    let result = async {
        let params = QueryParams::parse(
            raw.as_deref(),
            &["event_type", "user_id", "service", "from", "to", "cursor", "limit"],
        )?;
        let filter = EventFilter {
            event_type: params.text("event_type")?,
            user_id: params.text("user_id")?,
            service: params.text("service")?,
            from: params.time("from")?,
            to: params.time("to")?,
            cursor: params.cursor()?,
            limit: params.limit()?,
        };
        check_range(filter.from, filter.to)?;
        let (events, next_cursor) = fetch_events(&state, filter).await?;
        Ok::<_, ApiError>(EventsPage { events, next_cursor })
    };
    match result.await {
        Ok(page) => Json(page).into_response(),
        Err(e) => e.into_response(),
    }
}

/// One user's events, newest first, with keyset pagination.
#[utoipa::path(
    get,
    path = "/api/v1/users/{user_id}/timeline",
    tag = "events",
    operation_id = "user_timeline",
    params(
        ("user_id" = String, Path, description = "The user (exact match)"),
        TimelineQuery
    ),
    responses(
        (status = 200, description = "A page of the user's events (empty for an unknown user)", body = TimelinePage),
        (status = 400, description = "A bad parameter (named in `error.parameter`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 500, description = "Unexpected failure", body = ErrorBody),
        (status = 503, description = "Database unavailable or query too slow", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn user_timeline(
    State(state): State<ApiState>,
    user_id: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Response {
    let result = async {
        let Path(user_id) = user_id.map_err(|e| {
            ApiError::bad_parameter("user_id", format!("not a valid path segment ({e})"))
        })?;
        checked_text("user_id", &user_id)?;
        let params = QueryParams::parse(raw.as_deref(), &["cursor", "limit"])?;
        let filter = EventFilter {
            user_id: Some(user_id.clone()),
            cursor: params.cursor()?,
            limit: params.limit()?,
            ..EventFilter::default()
        };
        let (events, next_cursor) = fetch_events(&state, filter).await?;
        Ok::<_, ApiError>(TimelinePage { user_id, events, next_cursor })
    };
    match result.await {
        Ok(page) => Json(page).into_response(),
        Err(e) => e.into_response(),
    }
}

// ----------------------------------------------------------------------------------- counts

/// Width of one counts bucket (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    /// One UTC minute.
    Minute,
    /// One UTC hour.
    Hour,
    /// One UTC day.
    Day,
}

impl Bucket {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "minute" => Some(Self::Minute),
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            _ => None,
        }
    }

    /// The `date_trunc` unit.
    fn unit(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
        }
    }

    /// The longest `to - from` accepted for this bucket: 7 days of minutes, 92 days of hours,
    /// 3660 days of days.
    pub fn max_range(self) -> TimeDelta {
        match self {
            Self::Minute => TimeDelta::days(7),
            Self::Hour => TimeDelta::days(92),
            Self::Day => TimeDelta::days(3660),
        }
    }

    /// The range used when `from` is not given: the last hour, day or 30 days before `to`.
    fn default_range(self) -> TimeDelta {
        match self {
            Self::Minute => TimeDelta::hours(1),
            Self::Hour => TimeDelta::days(1),
            Self::Day => TimeDelta::days(30),
        }
    }
}

/// What the series are split by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// One series per event type.
    EventType,
    /// One series per service.
    Service,
}

impl GroupBy {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "event_type" => Some(Self::EventType),
            "service" => Some(Self::Service),
            _ => None,
        }
    }

    fn column(self) -> &'static str {
        match self {
            Self::EventType => "event_type",
            Self::Service => "service",
        }
    }
}

/// Query parameters of `GET /api/v1/stats/counts`.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct CountsQuery {
    /// Start of the range (RFC 3339, inclusive); default: `to` minus 1 hour (minute buckets),
    /// 1 day (hour buckets) or 30 days (day buckets). `to - from` may be at most 7 days for
    /// minute buckets, 92 days for hour buckets and 3660 days for day buckets.
    from: Option<DateTime<Utc>>,
    /// End of the range (RFC 3339, exclusive); default: now.
    to: Option<DateTime<Utc>>,
    /// Bucket width (UTC); default `hour`.
    #[param(inline)]
    bucket: Option<Bucket>,
    /// What the series are split by; default `event_type`.
    #[param(inline)]
    group_by: Option<GroupBy>,
    /// Count only this event type.
    #[param(min_length = 1)]
    event_type: Option<String>,
    /// Count only this service.
    #[param(min_length = 1)]
    service: Option<String>,
}

/// One point of a series.
#[derive(Debug, Serialize, ToSchema)]
struct CountPoint {
    /// Start of the bucket (UTC).
    bucket: DateTime<Utc>,
    /// The event type or service, per `group_by`.
    key: String,
    /// Events stored with a timestamp in this bucket (and in the requested range).
    count: i64,
}

/// Event counts per bucket and key; buckets without events are left out.
#[derive(Debug, Serialize, ToSchema)]
struct CountsResponse {
    /// Bucket width.
    bucket: Bucket,
    /// What `key` is.
    group_by: GroupBy,
    /// The range counted, inclusive.
    from: DateTime<Utc>,
    /// The range counted, exclusive.
    to: DateTime<Utc>,
    /// Points ordered by bucket, then key.
    series: Vec<CountPoint>,
}

/// Event counts per minute, hour or day, split by event type or service.
///
/// Served from the exact per-minute aggregate `analytics.event_counts`, so `from` and `to` act
/// at minute granularity: a minute is counted when its start lies in `[from, to)`.
#[utoipa::path(
    get,
    path = "/api/v1/stats/counts",
    tag = "stats",
    operation_id = "event_counts",
    params(CountsQuery),
    responses(
        (status = 200, description = "The series", body = CountsResponse),
        (status = 400, description = "A bad parameter, a range too long for the bucket, or too many points (named in `error.parameter`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 500, description = "Unexpected failure", body = ErrorBody),
        (status = 503, description = "Database unavailable or query too slow", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
async fn event_counts(State(state): State<ApiState>, RawQuery(raw): RawQuery) -> Response {
    match counts(&state, raw.as_deref()).await {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn counts(state: &ApiState, raw: Option<&str>) -> Result<CountsResponse, ApiError> {
    let params =
        QueryParams::parse(raw, &["from", "to", "bucket", "group_by", "event_type", "service"])?;
    let bucket = match params.text("bucket")? {
        None => Bucket::Hour,
        Some(v) => Bucket::parse(&v)
            .ok_or_else(|| ApiError::bad_parameter("bucket", "must be minute, hour or day"))?,
    };
    let group_by = match params.text("group_by")? {
        None => GroupBy::EventType,
        Some(v) => GroupBy::parse(&v)
            .ok_or_else(|| ApiError::bad_parameter("group_by", "must be event_type or service"))?,
    };
    let event_type = params.text("event_type")?;
    let service = params.text("service")?;
    let to = match params.time("to")? {
        Some(to) => to,
        None => Utc::now(),
    };
    let from = match params.time("from")? {
        Some(from) => from,
        None => to.checked_sub_signed(bucket.default_range()).ok_or_else(|| {
            ApiError::bad_parameter("to", "too early to count back from; give from as well")
        })?,
    };
    check_range(Some(from), Some(to))?;
    let max = bucket.max_range();
    if to.signed_duration_since(from) > max {
        return Err(ApiError::bad_parameter(
            "from",
            format!(
                "the range from..to may span at most {} days for bucket={}; narrow it or use a larger bucket",
                max.num_days(),
                bucket.unit()
            ),
        ));
    }

    let column = group_by.column();
    let mut sql = format!(
        "SELECT date_trunc($1, bucket, 'UTC') AS b, {column} AS key, sum(count)::bigint AS n
FROM analytics.event_counts WHERE bucket >= $2 AND bucket < $3"
    );
    let mut n = 3;
    if event_type.is_some() {
        n += 1;
        let _ = write!(sql, " AND event_type = ${n}");
    }
    if service.is_some() {
        n += 1;
        let _ = write!(sql, " AND service = ${n}");
    }
    let _ = write!(sql, " GROUP BY 1, 2 ORDER BY 1, 2 LIMIT ${}", n + 1);

    let rows = read_only(state, move |conn| {
        Box::pin(async move {
            let mut query =
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(bucket.unit()).bind(from).bind(to);
            for value in [event_type, service].into_iter().flatten() {
                query = query.bind(value);
            }
            query.bind(MAX_SERIES_POINTS as i64 + 1).fetch_all(&mut *conn).await
        })
    })
    .await?;
    if rows.len() > MAX_SERIES_POINTS {
        return Err(ApiError::bad_parameter(
            "from",
            format!(
                "more than {MAX_SERIES_POINTS} points; narrow the range, use a larger bucket or filter by event_type or service"
            ),
        ));
    }
    let series = rows
        .iter()
        .map(|row| {
            Ok(CountPoint {
                bucket: row.try_get("b")?,
                key: row.try_get("key")?,
                count: row.try_get("n")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(|e| {
            tracing::error!(error = %crate::storage::describe_error(&e), "query API: unexpected row shape");
            ApiError::internal()
        })?;
    Ok(CountsResponse { bucket, group_by, from, to, series })
}

// ------------------------------------------------------------------------------------- meta

/// This OpenAPI document. Never needs a token.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)),
    security(())
)]
async fn openapi_json(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        state.inner.openapi_json.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = Cursor {
            timestamp: DateTime::parse_from_rfc3339("1969-12-31T23:59:59.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            id: 42,
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in [
            "",
            "!!",
            "abc",
            &URL_SAFE_NO_PAD.encode("1:x"),
            &URL_SAFE_NO_PAD.encode("9223372036854775807:1"),
        ] {
            let e = Cursor::decode(bad).unwrap_err();
            assert_eq!(e.parameter.as_deref(), Some("cursor"), "{bad}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        let mut headers = HeaderMap::new();
        let token = Secret::new("s3cr3t");
        assert!(!bearer_matches(&headers, &token));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer s3cr3t"));
        assert!(bearer_matches(&headers, &token));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic s3cr3t"));
        assert!(!bearer_matches(&headers, &token));
    }

    #[test]
    fn times_accept_an_unencoded_plus() {
        let t = parse_time("from", "2026-03-01T12:00:00 01:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-03-01T11:00:00+00:00");
        assert_eq!(parse_time("from", "yesterday").unwrap_err().parameter.as_deref(), Some("from"));
    }

    #[test]
    fn query_parameters_are_checked() {
        let e = QueryParams::parse(Some("limit=1&limit=2"), &["limit"]).err().unwrap();
        assert_eq!(e.parameter.as_deref(), Some("limit"));
        let e = QueryParams::parse(Some("lmit=1"), &["limit"]).err().unwrap();
        assert_eq!(e.parameter.as_deref(), Some("lmit"));
        let p = QueryParams::parse(Some("limit=&cursor="), &["limit", "cursor"]).unwrap();
        assert_eq!(p.limit().unwrap_err().parameter.as_deref(), Some("limit"));
        assert_eq!(p.cursor().unwrap_err().parameter.as_deref(), Some("cursor"));
        let p = QueryParams::parse(Some("&limit=7&"), &["limit", "cursor"]).unwrap();
        assert_eq!(p.limit().unwrap(), 7);
        assert_eq!(p.cursor().unwrap(), None);
        let p = QueryParams::parse(Some("event_type=a%00b"), &["event_type"]).unwrap();
        assert_eq!(p.text("event_type").unwrap_err().parameter.as_deref(), Some("event_type"));
    }

    #[test]
    fn openapi_document_lists_every_route() {
        let doc = serde_json::to_value(openapi()).unwrap();
        for path in [
            "/api/v1/events",
            "/api/v1/stats/counts",
            "/api/v1/users/{user_id}/timeline",
            "/api/v1/openapi.json",
        ] {
            assert!(doc["paths"][path]["get"].is_object(), "{path} missing");
        }
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    }
}
