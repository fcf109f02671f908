//! Consumer lag arithmetic. Pure, so the edge cases (no commit yet, retention moved the log
//! start past the commit, unknown watermarks) are unit-tested without a broker.

/// Messages this group still has to consume in one partition.
///
/// `committed` is the group's committed offset (the next offset to read), `None` when the
/// group never committed; the consumer then starts at the log start (`auto.offset.reset` is
/// `earliest`). An offset below the log start was deleted by retention and is read from the
/// log start too. Unknown watermarks (negative) yield `None` rather than a wrong number.
pub fn partition_lag(low: i64, high: i64, committed: Option<i64>) -> Option<i64> {
    if high < 0 {
        return None;
    }
    let start = match committed {
        Some(c) if c >= 0 => c.max(low.max(0)),
        _ if low >= 0 => low,
        _ => return None,
    };
    Some((high - start).max(0))
}

/// The freshest of two observations of a watermark (ListOffsets and the fetch response carried
/// in statistics); neither the log start nor the high watermark moves backwards, so the larger
/// known one is current.
pub fn freshest_watermark(listed: Option<i64>, fetched: Option<i64>) -> Option<i64> {
    match (listed.filter(|h| *h >= 0), fetched.filter(|h| *h >= 0)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_high_watermark_minus_commit() {
        assert_eq!(partition_lag(0, 100, Some(40)), Some(60));
        assert_eq!(partition_lag(0, 100, Some(100)), Some(0));
    }

    #[test]
    fn no_commit_counts_from_the_log_start() {
        assert_eq!(partition_lag(10, 100, None), Some(90));
        assert_eq!(partition_lag(10, 100, Some(-1001)), Some(90));
    }

    #[test]
    fn commit_behind_retention_counts_from_the_log_start() {
        assert_eq!(partition_lag(50, 100, Some(20)), Some(50));
    }

    #[test]
    fn never_negative_and_unknown_stays_unknown() {
        assert_eq!(partition_lag(0, 100, Some(120)), Some(0));
        assert_eq!(partition_lag(0, -1, Some(5)), None);
        assert_eq!(partition_lag(-1, 10, None), None);
    }

    #[test]
    fn a_partition_paused_before_its_first_fetch_counts_from_the_listed_log_start() {
        // Statistics report -1 for both watermarks until a fetch response arrives.
        let low = freshest_watermark(Some(0), Some(-1));
        let high = freshest_watermark(Some(1000), Some(-1));
        assert_eq!(partition_lag(low.unwrap_or(-1), high.unwrap_or(-1), None), Some(1000));
    }

    #[test]
    fn freshest_watermark_wins() {
        assert_eq!(freshest_watermark(Some(5), Some(9)), Some(9));
        assert_eq!(freshest_watermark(Some(9), None), Some(9));
        assert_eq!(freshest_watermark(Some(-1), Some(3)), Some(3));
        assert_eq!(freshest_watermark(None, None), None);
    }
}
