//! `GET /api/v1/events` and `GET /api/v1/users/{user_id}/timeline`: pages of events, newest
//! first, bounded by `limit` and by a byte budget.
//!
//! A page is read through a server-side cursor (`DECLARE … CURSOR` + `FETCH n`) inside the
//! request's read-only transaction, a few rows at a time, and each row is serialised straight
//! into the response body ([`PageBuilder`]). Reading stops at `limit` events or when the next
//! row would take the body past the budget, so PostgreSQL never sends, and the process never
//! holds, much more than one page — however large the rows (up to `MAX_EVENT_BYTES`) are.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::{QueryBuilder, Row};
use utoipa::{IntoParams, ToSchema};

use super::errors::{ApiError, CommonErrors, ErrorBody};
use super::params::{Cursor, QueryParams, check_range, checked_text};
use super::{ApiState, read_only};

/// Events per page when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest accepted `limit`.
pub const MAX_LIMIT: u32 = 1000;
/// Rows asked for by the first `FETCH` of a page, before the row size is known.
const FIRST_FETCH: usize = 16;
/// Most rows asked for by one `FETCH`.
const MAX_FETCH: usize = 256;

/// Why a page holds fewer than `limit` events although more follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Truncated {
    /// The next event would have taken the page past the service's byte budget
    /// (`API_MAX_PAGE_BYTES`); `next_cursor` continues with it.
    ByteBudget,
}

// ---------------------------------------------------------------------------- documentation

/// One stored event.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // the schema of what EventJson writes
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
#[allow(dead_code)] // the schema of what PageBuilder writes
struct EventsPage {
    /// The events of this page, ordered by `timestamp` then `id`, descending. At most `limit`
    /// events and at most the byte budget, except that one event larger than the budget is
    /// returned alone.
    events: Vec<EventOut>,
    /// Pass as `cursor` to get the next page; null on the last page.
    next_cursor: Option<String>,
    /// `byte_budget` when the page was cut short by the byte budget (fewer than `limit` events,
    /// more follow); null otherwise.
    truncated: Option<Truncated>,
}

/// A page of one user's events, newest first.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // the schema of what PageBuilder writes
struct TimelinePage {
    /// The user.
    user_id: String,
    /// The events of this page, ordered by `timestamp` then `id`, descending; bounded like
    /// `GET /api/v1/events`.
    events: Vec<EventOut>,
    /// Pass as `cursor` to get the next page; null on the last page.
    next_cursor: Option<String>,
    /// `byte_budget` when the page was cut short by the byte budget; null otherwise.
    truncated: Option<Truncated>,
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
    /// Most events per page (the byte budget may cut a page shorter: see `truncated`).
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
    /// Most events per page (the byte budget may cut a page shorter: see `truncated`).
    #[param(minimum = 1, maximum = 1000, default = 100)]
    limit: Option<u32>,
}

// ------------------------------------------------------------------------------ page builder

/// One event as written into a page, borrowing from its row.
#[derive(Serialize)]
struct EventJson<'r> {
    id: i64,
    event_type: &'r str,
    user_id: &'r str,
    service: &'r str,
    timestamp: DateTime<Utc>,
    data: Option<&'r RawValue>,
    created_at: DateTime<Utc>,
}

/// Writes one page body while rows are offered to it, enforcing `limit` and the byte budget
/// (pure: no I/O).
///
/// The body is `<prefix>[e1,e2,…],"next_cursor":…,"truncated":…}` where the prefix opens the
/// object (`{"events":` or `{"user_id":…,"events":`). While the page is open the body never
/// exceeds the budget, except with its first event, which is always taken.
#[derive(Debug)]
pub(super) struct PageBuilder {
    body: Vec<u8>,
    events: usize,
    offered: usize,
    limit: usize,
    budget: usize,
    last: Option<Cursor>,
    more: Option<Option<Truncated>>,
}

impl PageBuilder {
    /// A page that opens with `prefix` and holds at most `limit` events (at least one) and
    /// `budget` bytes.
    pub(super) fn new(prefix: &str, limit: usize, budget: usize) -> Self {
        let mut body = Vec::with_capacity(budget.min(64 * 1024));
        body.extend_from_slice(prefix.as_bytes());
        body.push(b'[');
        Self { body, events: 0, offered: 0, limit: limit.max(1), budget, last: None, more: None }
    }

    /// Offers the next row, serialised; returns `false` when the page is complete, in which
    /// case the row was not taken and the next page starts with it.
    pub(super) fn offer(&mut self, event: &[u8], position: Cursor) -> bool {
        if self.more.is_some() {
            return false;
        }
        self.offered += 1;
        if self.events == self.limit {
            self.more = Some(None);
            return false;
        }
        if self.events > 0 && self.body.len() + 1 + event.len() > self.budget {
            self.more = Some(Some(Truncated::ByteBudget));
            return false;
        }
        if self.events > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(event);
        self.events += 1;
        self.last = Some(position);
        true
    }

    /// How many rows the next `FETCH` should ask for: enough to fill the page (one more than
    /// `limit`, to learn whether another page follows), estimated from the rows taken so far so
    /// that a page of large rows does not make PostgreSQL send many rows that are then dropped.
    pub(super) fn next_fetch(&self) -> usize {
        let rows_left = (self.limit + 1).saturating_sub(self.offered);
        let by_budget = match self.body.len().checked_div(self.events) {
            None => FIRST_FETCH,
            Some(per_event) => self.budget.saturating_sub(self.body.len()) / per_event.max(1) + 1,
        };
        rows_left.min(by_budget).clamp(1, MAX_FETCH)
    }

    /// Events taken so far.
    pub(super) fn len(&self) -> usize {
        self.events
    }

    /// Closes the page: `next_cursor` points after the last event when a row was refused.
    pub(super) fn finish(mut self) -> Vec<u8> {
        let (cursor, truncated) = match (self.more, self.last) {
            (Some(truncated), Some(last)) => (Some(last.encode()), truncated),
            _ => (None, None),
        };
        self.body.extend_from_slice(b"],\"next_cursor\":");
        match cursor {
            // The cursor alphabet (URL-safe base64) needs no escaping.
            Some(c) => {
                self.body.push(b'"');
                self.body.extend_from_slice(c.as_bytes());
                self.body.push(b'"');
            }
            None => self.body.extend_from_slice(b"null"),
        }
        self.body.extend_from_slice(b",\"truncated\":");
        match truncated {
            Some(Truncated::ByteBudget) => self.body.extend_from_slice(b"\"byte_budget\""),
            None => self.body.extend_from_slice(b"null"),
        }
        self.body.push(b'}');
        self.body
    }
}

// --------------------------------------------------------------------------------- database

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

/// `DECLARE`s the cursor over the events matching `filter`, newest first; every value is a bind
/// parameter.
fn page_query(filter: EventFilter) -> QueryBuilder<Postgres> {
    let mut sql = QueryBuilder::new(
        r#"DECLARE api_page NO SCROLL CURSOR FOR
SELECT id, event_type, user_id, service, "timestamp", data::text AS data, created_at
FROM analytics.events WHERE TRUE"#,
    );
    if let Some(v) = filter.event_type {
        sql.push(" AND event_type = ").push_bind(v);
    }
    if let Some(v) = filter.user_id {
        sql.push(" AND user_id = ").push_bind(v);
    }
    if let Some(v) = filter.service {
        sql.push(" AND service = ").push_bind(v);
    }
    if let Some(v) = filter.from {
        sql.push(r#" AND "timestamp" >= "#).push_bind(v);
    }
    if let Some(v) = filter.to {
        sql.push(r#" AND "timestamp" < "#).push_bind(v);
    }
    if let Some(cursor) = filter.cursor {
        // Written so the timestamp indexes (and partition pruning) apply.
        sql.push(r#" AND "timestamp" <= "#).push_bind(cursor.timestamp);
        sql.push(r#" AND ("timestamp" < "#).push_bind(cursor.timestamp);
        sql.push(" OR id < ").push_bind(cursor.id).push(")");
    }
    // The cursor's plan is chosen for fetching the first rows fast; the LIMIT keeps it from
    // reading past one page whatever the client does.
    sql.push(r#" ORDER BY "timestamp" DESC, id DESC LIMIT "#)
        .push_bind(i64::from(filter.limit) + 1);
    sql
}

/// The events matching `filter`, newest first, as one page body opening with `prefix`.
async fn fetch_page(
    state: &ApiState,
    filter: EventFilter,
    prefix: String,
) -> Result<Vec<u8>, ApiError> {
    let limit = filter.limit as usize;
    let mut declare = page_query(filter);
    let budget = state.inner.limits.max_page_bytes;
    read_only(state, move |conn| {
        Box::pin(async move {
            declare.build().persistent(false).execute(&mut *conn).await?;

            let mut page = PageBuilder::new(&prefix, limit, budget);
            let mut event = Vec::new();
            'page: loop {
                let want = page.next_fetch();
                let fetch = format!("FETCH FORWARD {want} FROM api_page");
                let mut rows =
                    sqlx::query(sqlx::AssertSqlSafe(fetch)).persistent(false).fetch(&mut *conn);
                let mut got = 0;
                while let Some(row) = rows.try_next().await? {
                    got += 1;
                    event.clear();
                    let position = write_event(&row, &mut event)?;
                    if !page.offer(&event, position) {
                        break 'page;
                    }
                }
                if got < want {
                    break; // the cursor is exhausted: last page
                }
            }
            // Rows of the last FETCH not read yet are discarded by the connection; the cursor
            // closes with the transaction.
            tracing::debug!(events = page.len(), "query API: page read");
            Ok(page.finish())
        })
    })
    .await
}

/// Serialises one row into `out` and returns its position for the next page's cursor.
fn write_event(row: &PgRow, out: &mut Vec<u8>) -> Result<Cursor, sqlx::Error> {
    let data: Option<&str> = row.try_get("data")?;
    let data = data
        .map(serde_json::from_str::<&RawValue>)
        .transpose()
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    let event = EventJson {
        id: row.try_get("id")?,
        event_type: row.try_get("event_type")?,
        user_id: row.try_get("user_id")?,
        service: row.try_get("service")?,
        timestamp: row.try_get("timestamp")?,
        data,
        created_at: row.try_get("created_at")?,
    };
    serde_json::to_writer(&mut *out, &event).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(Cursor { timestamp: event.timestamp, id: event.id })
}

/// A body already written as JSON bytes (a page from [`PageBuilder`], the OpenAPI document),
/// served as `application/json` without a second serialisation.
pub(super) struct JsonBytes(pub(super) Vec<u8>);

impl IntoResponse for JsonBytes {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], self.0)
            .into_response()
    }
}

// ---------------------------------------------------------------------------------- handlers

/// Lists stored events, newest first, with optional filters and keyset pagination.
///
/// A page ends at `limit` events or at the service's byte budget, whichever comes first
/// (`truncated` says which); follow `next_cursor` until it is null.
#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "events",
    operation_id = "list_events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events", body = EventsPage),
        (status = 400, description = "A bad parameter (named in `error.parameter`)", body = ErrorBody),
        CommonErrors
    ),
    security(("bearer" = []))
)]
pub(super) async fn list_events(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<JsonBytes, ApiError> {
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
    fetch_page(&state, filter, "{\"events\":".into()).await.map(JsonBytes)
}

/// One user's events, newest first, with keyset pagination (bounded like `/api/v1/events`).
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
        CommonErrors
    ),
    security(("bearer" = []))
)]
pub(super) async fn user_timeline(
    State(state): State<ApiState>,
    user_id: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<JsonBytes, ApiError> {
    let Path(user_id) = user_id.map_err(|e| {
        ApiError::bad_parameter("user_id", format!("not a valid path segment ({e})"))
    })?;
    checked_text("user_id", &user_id)?;
    let params = QueryParams::parse(raw.as_deref(), &["cursor", "limit"])?;
    let prefix = format!(
        "{{\"user_id\":{},\"events\":",
        serde_json::to_string(&user_id).map_err(|_| ApiError::internal())?
    );
    let filter = EventFilter {
        user_id: Some(user_id),
        cursor: params.cursor()?,
        limit: params.limit()?,
        ..EventFilter::default()
    };
    fetch_page(&state, filter, prefix).await.map(JsonBytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(id: i64) -> Cursor {
        Cursor { timestamp: DateTime::from_timestamp(1_700_000_000, 0).unwrap(), id }
    }

    /// Every filter becomes a bind parameter, numbered in order; nothing is spliced into the SQL.
    #[test]
    fn page_query_binds_every_value() {
        let filter = EventFilter {
            event_type: Some("x'; DROP TABLE analytics.events; --".into()),
            service: Some("auth".into()),
            cursor: Some(at(7)),
            limit: 50,
            ..EventFilter::default()
        };
        let sql = page_query(filter).into_string();
        assert!(sql.contains("event_type = $1 AND service = $2"), "{sql}");
        assert!(sql.contains(r#""timestamp" <= $3 AND ("timestamp" < $4 OR id < $5)"#), "{sql}");
        assert!(sql.ends_with("LIMIT $6"), "{sql}");
        assert!(!sql.contains("DROP"), "{sql}");
        let bare = page_query(EventFilter { limit: 1, ..EventFilter::default() }).into_string();
        assert!(
            bare.ends_with(r#"WHERE TRUE ORDER BY "timestamp" DESC, id DESC LIMIT $1"#),
            "{bare}"
        );
    }

    fn parse(body: Vec<u8>) -> serde_json::Value {
        serde_json::from_slice(&body).expect("a page is JSON")
    }

    #[test]
    fn limit_ends_a_page_with_a_cursor_but_not_truncated() {
        let mut page = PageBuilder::new("{\"events\":", 2, 1000);
        assert!(page.offer(b"1", at(1)));
        assert!(page.offer(b"2", at(2)));
        assert!(!page.offer(b"3", at(3)));
        let v = parse(page.finish());
        assert_eq!(v["events"], serde_json::json!([1, 2]));
        assert_eq!(v["next_cursor"], at(2).encode());
        assert!(v["truncated"].is_null());
    }

    #[test]
    fn budget_cuts_a_page_and_says_so() {
        let mut page = PageBuilder::new("{\"events\":", 100, 20);
        // `{"events":[` is 11 bytes; "111" makes 14, ",222" 18, ",333" would make 22 > 20.
        assert!(page.offer(b"111", at(1)));
        assert!(page.offer(b"222", at(2)));
        assert!(!page.offer(b"333", at(3)));
        assert!(!page.offer(b"4", at(4)), "a closed page takes nothing more");
        let v = parse(page.finish());
        assert_eq!(v["events"], serde_json::json!([111, 222]));
        assert_eq!(v["next_cursor"], at(2).encode());
        assert_eq!(v["truncated"], "byte_budget");
    }

    #[test]
    fn a_row_larger_than_the_budget_is_returned_alone() {
        let big = format!("\"{}\"", "x".repeat(500)).into_bytes();
        let mut page = PageBuilder::new("{\"events\":", 100, 64);
        assert!(page.offer(&big, at(1)));
        assert!(!page.offer(b"1", at(2)));
        let v = parse(page.finish());
        assert_eq!(v["events"].as_array().unwrap().len(), 1);
        assert_eq!(v["truncated"], "byte_budget");
        // The same row as the last one: no cursor, nothing truncated.
        let mut page = PageBuilder::new("{\"events\":", 100, 64);
        assert!(page.offer(&big, at(1)));
        let v = parse(page.finish());
        assert!(v["next_cursor"].is_null() && v["truncated"].is_null());
    }

    #[test]
    fn empty_and_last_pages_have_no_cursor() {
        let v = parse(PageBuilder::new("{\"user_id\":\"u\",\"events\":", 10, 100).finish());
        assert_eq!(
            v,
            serde_json::json!({"user_id": "u", "events": [], "next_cursor": null, "truncated": null})
        );
    }

    #[test]
    fn fetch_sizes_follow_the_rows_seen() {
        let mut page = PageBuilder::new("{\"events\":", 1000, 10_000);
        assert_eq!(page.next_fetch(), FIRST_FETCH);
        let event = format!("\"{}\"", "x".repeat(987)).into_bytes();
        assert!(page.offer(&event, at(1))); // body now 1000 bytes, one event
        assert_eq!(page.next_fetch(), 10); // room for ~9 more of that size, plus one
        let mut small = PageBuilder::new("{\"events\":", 3, 10_000);
        assert_eq!(small.next_fetch(), 4, "never more than limit + 1");
        small.offer(b"1", at(1));
        assert_eq!(small.next_fetch(), 3);
        let mut tiny = PageBuilder::new("{\"events\":", 1000, 1_000_000);
        tiny.offer(b"1", at(1));
        assert_eq!(tiny.next_fetch(), MAX_FETCH);
    }
}
