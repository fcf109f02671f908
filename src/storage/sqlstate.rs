//! SQLSTATE codes and classes, named once for every database path (the batch writer and the
//! query API ask different questions of the same codes).

/// `unique_violation`: the row is already stored (a redelivery).
pub const UNIQUE_VIOLATION: &str = "23505";
/// `query_canceled`: the statement timeout fired.
pub const QUERY_CANCELED: &str = "57014";

/// The data is at fault, so retrying cannot help: class 22 (data exception), 23 (integrity
/// constraint violation), 54 (program limit exceeded).
pub fn data_at_fault(code: &str) -> bool {
    ["22", "23", "54"].iter().any(|class| code.starts_with(class))
}

/// The database cannot answer now, through no fault of the request: class 08 (connection),
/// 28 (login refused), 3D (no such database), 53 (insufficient resources), 57 (operator
/// intervention: shutdown, cancel), 40 (transaction rollback: hot-standby conflicts), and
/// 42P01 (a table missing before the migrations ran).
pub fn unavailable(code: &str) -> bool {
    ["08", "28", "3D", "53", "57", "40"].iter().any(|class| code.starts_with(class))
        || code == "42P01"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert!(
            data_at_fault("22P02") && data_at_fault(UNIQUE_VIOLATION) && data_at_fault("54000")
        );
        assert!(!data_at_fault("08006") && !data_at_fault(QUERY_CANCELED));
        assert!(unavailable("08006") && unavailable(QUERY_CANCELED) && unavailable("42P01"));
        assert!(!unavailable("42601") && !unavailable("22P02"));
    }
}
