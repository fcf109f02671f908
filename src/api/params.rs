//! Query parameters, times, ranges and the page cursor: parsed by hand so that every failure
//! names its parameter.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};

use super::errors::ApiError;
use super::events::{DEFAULT_LIMIT, MAX_LIMIT};

/// The query parameters of one request, checked against the names an operation accepts.
pub(super) struct QueryParams {
    values: BTreeMap<String, String>,
}

impl QueryParams {
    pub(super) fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<Self, ApiError> {
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
    pub(super) fn text(&self, name: &str) -> Result<Option<String>, ApiError> {
        match self.values.get(name).map(String::as_str) {
            None => Ok(None),
            Some("") => Err(ApiError::bad_parameter(
                name,
                "must not be empty (leave the parameter out instead)",
            )),
            Some(v) => Ok(Some(checked_text(name, v)?.to_string())),
        }
    }

    pub(super) fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.text(name)?.map(|v| parse_time(name, &v)).transpose()
    }

    pub(super) fn limit(&self) -> Result<u32, ApiError> {
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

    pub(super) fn cursor(&self) -> Result<Option<Cursor>, ApiError> {
        self.text("cursor")?.map(|v| Cursor::decode(&v)).transpose()
    }
}

/// PostgreSQL text cannot hold NUL; refusing it here keeps such input a 400, not a 500.
pub(super) fn checked_text<'a>(name: &str, value: &'a str) -> Result<&'a str, ApiError> {
    if value.contains('\0') {
        return Err(ApiError::bad_parameter(name, "must not contain NUL characters"));
    }
    Ok(value)
}

pub(super) fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
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

pub(super) fn check_range(
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<(), ApiError> {
    match (from, to) {
        (Some(from), Some(to)) if to <= from => {
            Err(ApiError::bad_parameter("to", "must be later than from"))
        }
        _ => Ok(()),
    }
}

/// Position after the last event of a page: its (timestamp, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cursor {
    pub(super) timestamp: DateTime<Utc>,
    pub(super) id: i64,
}

impl Cursor {
    pub(super) fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}:{}", self.timestamp.timestamp_micros(), self.id))
    }

    pub(super) fn decode(text: &str) -> Result<Self, ApiError> {
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
}
