//! `GET /api/v1/stats/counts`: series from the exact per-minute aggregate, bounded in range and
//! in points.

use axum::Json;
use axum::extract::{RawQuery, State};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use sqlx::postgres::Postgres;
use sqlx::{QueryBuilder, Row};
use utoipa::{IntoParams, ToSchema};

use super::errors::{ApiError, CommonErrors, ErrorBody};
use super::params::{QueryParams, check_range};
use super::{ApiState, read_only};

/// Largest number of points one counts response may hold; a larger result is refused with 400.
pub const MAX_SERIES_POINTS: usize = 50_000;

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
pub(super) struct CountsQuery {
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
pub(super) struct CountPoint {
    /// Start of the bucket (UTC).
    bucket: DateTime<Utc>,
    /// The event type or service, per `group_by`.
    key: String,
    /// Events stored with a timestamp in this bucket (and in the requested range).
    count: i64,
}

/// Event counts per bucket and key; buckets without events are left out.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CountsResponse {
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
        CommonErrors
    ),
    security(("bearer" = []))
)]
pub(super) async fn event_counts(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<CountsResponse>, ApiError> {
    counts(&state, raw.as_deref()).await.map(Json)
}

/// The series' SQL: the grouping column is one of two fixed names, every value a bind parameter.
fn series_query(
    bucket: Bucket,
    group_by: GroupBy,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    event_type: Option<String>,
    service: Option<String>,
) -> QueryBuilder<Postgres> {
    let mut sql = QueryBuilder::new("SELECT date_trunc(");
    sql.push_bind(bucket.unit())
        .push(", bucket, 'UTC') AS b, ")
        .push(group_by.column())
        .push(" AS key, sum(count)::bigint AS n FROM analytics.event_counts WHERE bucket >= ")
        .push_bind(from)
        .push(" AND bucket < ")
        .push_bind(to);
    if let Some(v) = event_type {
        sql.push(" AND event_type = ").push_bind(v);
    }
    if let Some(v) = service {
        sql.push(" AND service = ").push_bind(v);
    }
    sql.push(" GROUP BY 1, 2 ORDER BY 1, 2 LIMIT ").push_bind(MAX_SERIES_POINTS as i64 + 1);
    sql
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

    let mut query = series_query(bucket, group_by, from, to, event_type, service);
    let rows = read_only(state, move |conn| {
        Box::pin(async move { query.build().fetch_all(&mut *conn).await })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_query_binds_every_value() {
        let to = Utc::now();
        let from = to - TimeDelta::hours(1);
        let sql = series_query(Bucket::Hour, GroupBy::Service, from, to, None, Some("auth".into()))
            .into_string();
        assert!(
            sql.starts_with("SELECT date_trunc($1, bucket, 'UTC') AS b, service AS key"),
            "{sql}"
        );
        assert!(sql.contains("bucket >= $2 AND bucket < $3 AND service = $4 GROUP BY"), "{sql}");
        assert!(sql.ends_with("LIMIT $5"), "{sql}");
    }
}
