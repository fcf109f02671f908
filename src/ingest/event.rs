//! The event envelope: decoding and validation of one Kafka record into a row.
//!
//! Pure code. Everything derived here is a function of the record alone (payload and record
//! timestamp, never the wall clock), so a redelivered record produces the identical row.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The event types Nexus Core publishes today; others are stored all the same.
pub const KNOWN_EVENT_TYPES: &[&str] = &[
    "user.registered",
    "user.login",
    "user.logout",
    "user.profile_updated",
    "user.profile_viewed",
    "user.search_performed",
    "user.deactivated",
    "user.activated",
];

/// The services that publish them.
pub const KNOWN_SERVICES: &[&str] = &["auth-service", "user-service"];

/// Column limits of `analytics.events` (characters, as PostgreSQL counts VARCHAR).
pub const MAX_EVENT_TYPE_CHARS: usize = 100;
/// See [`MAX_EVENT_TYPE_CHARS`].
pub const MAX_USER_ID_CHARS: usize = 100;
/// See [`MAX_EVENT_TYPE_CHARS`].
pub const MAX_SERVICE_CHARS: usize = 50;

/// PostgreSQL's earliest `timestamptz` (4714-11-24 BC) in Unix microseconds. Its latest
/// (294276 AD) lies beyond what chrono represents, so chrono's own limit applies there.
const PG_MIN_MICROS: i64 = -210_866_803_200_000_000;

/// Epoch numbers at or above this magnitude are milliseconds (1e11 s is the year 5138).
const EPOCH_MILLIS_THRESHOLD: f64 = 1e11;

/// Why a record was not stored; the label of `analytics_events_processing_errors_total`
/// and the `dlq.reason` header. A small fixed set so metric cardinality stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not JSON at all (syntax error, invalid UTF-8, empty payload).
    InvalidJson,
    /// JSON, but a required field is absent or null.
    MissingField,
    /// A field has the wrong type, is empty, too long or holds a NUL character.
    InvalidField,
    /// The timestamp cannot be read or lies outside what can be stored.
    InvalidTimestamp,
    /// The record exceeds `MAX_EVENT_BYTES`.
    TooLarge,
    /// PostgreSQL refused the row (caught when a batch is split down to that row).
    DbRejected,
    /// The event time lies further ahead than the partitions kept ready (see
    /// [`crate::storage::partitions::ingest_window`]): almost always a producer's clock or unit error.
    FutureTimestamp,
}

impl RejectReason {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [RejectReason; 7] = [
        Self::InvalidJson,
        Self::MissingField,
        Self::InvalidField,
        Self::InvalidTimestamp,
        Self::TooLarge,
        Self::DbRejected,
        Self::FutureTimestamp,
    ];

    /// Stable snake_case name used in metrics and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::TooLarge => "too_large",
            Self::DbRejected => "db_rejected",
            Self::FutureTimestamp => "future_timestamp",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that cannot become a row, with a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    /// The category.
    pub reason: RejectReason,
    /// What exactly was wrong (no payload echo beyond field names).
    pub detail: String,
}

impl Rejection {
    /// A rejection with its detail.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }
}

/// One validated event, ready for `analytics.events`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// e.g. `user.login`.
    pub event_type: String,
    /// The subject user.
    pub user_id: String,
    /// The publishing service.
    pub service: String,
    /// When the event happened (UTC).
    pub timestamp: DateTime<Utc>,
    /// The `data` member as JSON text; `None` when absent or null.
    pub data: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    event_type: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default, borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// Decodes and validates one record payload.
///
/// `record_timestamp_ms` is the Kafka record's timestamp, used when the envelope has none.
pub fn decode(
    payload: &[u8],
    record_timestamp_ms: Option<i64>,
    max_bytes: usize,
) -> Result<Event, Rejection> {
    if payload.len() > max_bytes {
        return Err(Rejection::new(
            RejectReason::TooLarge,
            format!("{} bytes exceeds the limit of {max_bytes}", payload.len()),
        ));
    }
    let envelope: Envelope<'_> = serde_json::from_slice(payload).map_err(|e| {
        let reason = match e.classify() {
            serde_json::error::Category::Data => RejectReason::InvalidField,
            _ => RejectReason::InvalidJson,
        };
        Rejection::new(reason, e.to_string())
    })?;
    let event_type = required(envelope.event_type, "event_type", MAX_EVENT_TYPE_CHARS)?;
    let user_id = required(envelope.user_id, "user_id", MAX_USER_ID_CHARS)?;
    let service = required(envelope.service, "service", MAX_SERVICE_CHARS)?;
    let timestamp = match envelope.timestamp.map(RawValue::get) {
        None | Some("null") => match record_timestamp_ms {
            Some(ms) => from_epoch_micros(ms.saturating_mul(1000))
                .ok_or_else(|| ts_error("the record timestamp is out of range"))?,
            None => return Err(ts_error("no timestamp in the event and none on the record")),
        },
        Some(raw) => parse_timestamp(raw)?,
    };
    let data = match envelope.data.map(RawValue::get) {
        None | Some("null") => None,
        Some(raw) => {
            if json_has_nul_escape(raw) {
                return Err(Rejection::new(
                    RejectReason::InvalidField,
                    "data contains \\u0000, which PostgreSQL jsonb cannot store",
                ));
            }
            Some(raw.to_owned())
        }
    };
    Ok(Event { event_type, user_id, service, timestamp, data })
}

fn required(value: Option<String>, field: &str, max_chars: usize) -> Result<String, Rejection> {
    let value = value
        .ok_or_else(|| Rejection::new(RejectReason::MissingField, format!("{field} is missing")))?;
    if value.trim().is_empty() {
        return Err(Rejection::new(RejectReason::InvalidField, format!("{field} is empty")));
    }
    if value.contains('\0') {
        return Err(Rejection::new(RejectReason::InvalidField, format!("{field} contains NUL")));
    }
    let chars = value.chars().count();
    if chars > max_chars {
        return Err(Rejection::new(
            RejectReason::InvalidField,
            format!("{field} has {chars} characters, the limit is {max_chars}"),
        ));
    }
    Ok(value)
}

fn ts_error(detail: impl Into<String>) -> Rejection {
    Rejection::new(RejectReason::InvalidTimestamp, detail)
}

/// Parses the envelope's `timestamp` member (raw JSON: a string or a number).
pub fn parse_timestamp(raw: &str) -> Result<DateTime<Utc>, Rejection> {
    if raw.starts_with('"') {
        let text: String = serde_json::from_str(raw).map_err(|e| ts_error(e.to_string()))?;
        parse_timestamp_text(&text)
    } else {
        let n: f64 = raw.parse().map_err(|_| ts_error(format!("not a string or number: {raw}")))?;
        parse_epoch(n)
    }
}

/// Accepts RFC 3339 (with or without offset; naive means UTC) and `YYYY-MM-DD HH:MM:SS[.f]`.
fn parse_timestamp_text(text: &str) -> Result<DateTime<Utc>, Rejection> {
    let text = text.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(text) {
        return check_range(dt.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
            return check_range(Utc.from_utc_datetime(&naive));
        }
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%#z"] {
        if let Ok(dt) = DateTime::parse_from_str(text, format) {
            return check_range(dt.with_timezone(&Utc));
        }
    }
    Err(ts_error(format!("cannot parse {text:?} as a timestamp")))
}

/// Epoch seconds (fractions allowed) or, from 1e11 up, milliseconds.
fn parse_epoch(n: f64) -> Result<DateTime<Utc>, Rejection> {
    if !n.is_finite() {
        return Err(ts_error("epoch timestamp is not finite"));
    }
    let micros = if n.abs() >= EPOCH_MILLIS_THRESHOLD { n * 1e3 } else { n * 1e6 };
    if micros.abs() > i64::MAX as f64 / 2.0 {
        return Err(ts_error(format!("epoch timestamp {n} is out of range")));
    }
    from_epoch_micros(micros.round() as i64)
        .ok_or_else(|| ts_error(format!("epoch timestamp {n} is out of range")))
}

fn from_epoch_micros(micros: i64) -> Option<DateTime<Utc>> {
    if micros < PG_MIN_MICROS {
        return None;
    }
    DateTime::from_timestamp_micros(micros)
}

fn check_range(dt: DateTime<Utc>) -> Result<DateTime<Utc>, Rejection> {
    // PostgreSQL stores microseconds; finer input is truncated there, so truncate here too
    // to keep what we count and what is stored identical.
    from_epoch_micros(dt.timestamp_micros())
        .ok_or_else(|| ts_error(format!("{dt} is outside PostgreSQL's range")))
}

/// True when a JSON text contains the escape `\u0000` (which jsonb rejects), honouring
/// escaped backslashes so that the literal text `\\u0000` is not a false positive.
pub fn json_has_nul_escape(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'u') && bytes.get(i + 2..i + 6) == Some(b"0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 512 * 1024;

    fn ok(json: &str) -> Event {
        decode(json.as_bytes(), Some(1_700_000_000_000), MAX).expect("valid event")
    }

    fn err(json: &str) -> RejectReason {
        decode(json.as_bytes(), Some(1_700_000_000_000), MAX).unwrap_err().reason
    }

    fn ts(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn decodes_a_full_envelope() {
        let e = ok(r#"{"event_type":"user.login","user_id":"u1","service":"auth-service",
            "timestamp":"2024-11-08T12:34:56Z","data":{"ip":"10.0.0.1"},"extra":1}"#);
        assert_eq!(e.event_type, "user.login");
        assert_eq!(e.timestamp, ts("2024-11-08T12:34:56Z"));
        assert_eq!(e.data.as_deref(), Some(r#"{"ip":"10.0.0.1"}"#));
    }

    #[test]
    fn unknown_types_and_absent_data_are_fine() {
        let e = ok(r#"{"event_type":"user.new_thing","user_id":"u","service":"s"}"#);
        assert_eq!(e.data, None);
        assert_eq!(e.timestamp, ts("2023-11-14T22:13:20Z"), "record timestamp used");
        assert_eq!(ok(r#"{"event_type":"t","user_id":"u","service":"s","data":null}"#).data, None);
        assert_eq!(
            ok(r#"{"event_type":"t","user_id":"u","service":"s","data":[1]}"#).data.as_deref(),
            Some("[1]")
        );
    }

    #[test]
    fn timestamp_forms() {
        let cases = [
            (r#""2024-11-08T12:34:56.123456+02:00""#, "2024-11-08T10:34:56.123456Z"),
            (r#""2024-11-08T12:34:56.123456""#, "2024-11-08T12:34:56.123456Z"),
            (r#""2024-11-08 12:34:56""#, "2024-11-08T12:34:56Z"),
            (r#""2024-11-08 12:34:56.5""#, "2024-11-08T12:34:56.5Z"),
            (r#""2024-11-08 12:34:56+00:00""#, "2024-11-08T12:34:56Z"),
            ("1731069296", "2024-11-08T12:34:56Z"),
            ("1731069296.25", "2024-11-08T12:34:56.25Z"),
            ("1731069296250", "2024-11-08T12:34:56.25Z"),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_timestamp(raw).unwrap(), ts(want), "{raw}");
        }
    }

    #[test]
    fn impossible_timestamps_are_rejected() {
        for raw in [
            r#""2024-02-30T00:00:00Z""#,
            r#""yesterday""#,
            r#""""#,
            "1e300",
            "true",
            r#""2024-11-08T25:00:00""#,
        ] {
            assert_eq!(
                parse_timestamp(raw).unwrap_err().reason,
                RejectReason::InvalidTimestamp,
                "{raw}"
            );
        }
        assert_eq!(
            decode(br#"{"event_type":"t","user_id":"u","service":"s"}"#, None, MAX)
                .unwrap_err()
                .reason,
            RejectReason::InvalidTimestamp
        );
    }

    #[test]
    fn invalid_payloads_are_classified() {
        assert_eq!(err("{not json"), RejectReason::InvalidJson);
        assert_eq!(err(""), RejectReason::InvalidJson);
        assert_eq!(decode(&[0xff, 0xfe], None, MAX).unwrap_err().reason, RejectReason::InvalidJson);
        assert_eq!(err(r#"{"user_id":"u","service":"s"}"#), RejectReason::MissingField);
        assert_eq!(
            err(r#"{"event_type":null,"user_id":"u","service":"s"}"#),
            RejectReason::MissingField
        );
        assert_eq!(
            err(r#"{"event_type":"","user_id":"u","service":"s"}"#),
            RejectReason::InvalidField
        );
        assert_eq!(
            err(r#"{"event_type":5,"user_id":"u","service":"s"}"#),
            RejectReason::InvalidField
        );
        assert_eq!(err("[1,2]"), RejectReason::InvalidField);
        let long = "x".repeat(101);
        assert_eq!(
            err(&format!(r#"{{"event_type":"{long}","user_id":"u","service":"s"}}"#)),
            RejectReason::InvalidField
        );
        let long = "é".repeat(100);
        assert_eq!(
            ok(&format!(r#"{{"event_type":"{long}","user_id":"u","service":"s"}}"#))
                .event_type
                .chars()
                .count(),
            100
        );
        assert_eq!(
            err(r#"{"event_type":"t","user_id":"u\u0000","service":"s"}"#),
            RejectReason::InvalidField
        );
        assert_eq!(
            err(r#"{"event_type":"t","user_id":"u","service":"s","data":{"a":"\u0000"}}"#),
            RejectReason::InvalidField
        );
    }

    #[test]
    fn oversize_records_are_rejected_before_parsing() {
        let r = decode(&[b' '; 11], None, 10).unwrap_err();
        assert_eq!(r.reason, RejectReason::TooLarge);
    }

    #[test]
    fn nul_escape_scan_honours_escaped_backslashes() {
        assert!(json_has_nul_escape(r#"{"a":"\u0000"}"#));
        assert!(!json_has_nul_escape(r#"{"a":"\\u0000"}"#));
        assert!(json_has_nul_escape(r#"{"a":"\\\u0000"}"#));
        assert!(json_has_nul_escape(r#"{"a":"\u00001"}"#));
        assert!(!json_has_nul_escape(r#"{"a":"\u0001"}"#));
    }

    #[test]
    fn replays_decode_identically() {
        let payload = br#"{"event_type":"t","user_id":"u","service":"s"}"#;
        assert_eq!(decode(payload, Some(42), MAX), decode(payload, Some(42), MAX));
    }
}
