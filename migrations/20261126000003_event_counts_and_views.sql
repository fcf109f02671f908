-- Exact real-time aggregates and views for analysts.
--
-- analytics.event_counts is maintained by the same statement that inserts events, from the
-- rows that statement actually inserted (ON CONFLICT DO NOTHING ... RETURNING), so
-- redeliveries, crashes and replays never count an event twice. Buckets are UTC minutes.
-- Dropping old event partitions (retention) keeps the counts.

CREATE TABLE analytics.event_counts (
    bucket     TIMESTAMPTZ  NOT NULL,
    event_type VARCHAR(100) NOT NULL,
    service    VARCHAR(50)  NOT NULL,
    count      BIGINT       NOT NULL,
    PRIMARY KEY (bucket, event_type, service)
);
COMMENT ON TABLE analytics.event_counts IS
    'Events stored per UTC minute, type and service; exact (counts inserted rows only).';

-- Counts for rows stored before this table existed.
INSERT INTO analytics.event_counts (bucket, event_type, service, count)
SELECT date_trunc('minute', "timestamp", 'UTC'), event_type, service, count(*)
FROM analytics.events
GROUP BY 1, 2, 3;

CREATE VIEW analytics.event_counts_hourly AS
SELECT date_trunc('hour', bucket, 'UTC') AS bucket, event_type, service, sum(count)::bigint AS count
FROM analytics.event_counts
GROUP BY 1, 2, 3;
COMMENT ON VIEW analytics.event_counts_hourly IS 'Hourly rollup of analytics.event_counts (UTC).';

CREATE VIEW analytics.event_counts_daily AS
SELECT date_trunc('day', bucket, 'UTC') AS bucket, event_type, service, sum(count)::bigint AS count
FROM analytics.event_counts
GROUP BY 1, 2, 3;
COMMENT ON VIEW analytics.event_counts_daily IS 'Daily rollup of analytics.event_counts (UTC).';

CREATE VIEW analytics.events_per_type_hourly AS
SELECT bucket AS hour, event_type, sum(count)::bigint AS events
FROM analytics.event_counts_hourly
GROUP BY 1, 2;
COMMENT ON VIEW analytics.events_per_type_hourly IS 'Events per type per UTC hour.';

CREATE VIEW analytics.daily_active_users AS
SELECT date_trunc('day', "timestamp", 'UTC') AS day, count(DISTINCT user_id) AS active_users
FROM analytics.events
GROUP BY 1;
COMMENT ON VIEW analytics.daily_active_users IS
    'Distinct users with any event per UTC day (reads analytics.events; filter by day).';

CREATE VIEW analytics.registrations_vs_activations AS
SELECT bucket AS day,
       coalesce(sum(count) FILTER (WHERE event_type = 'user.registered'), 0)::bigint AS registrations,
       coalesce(sum(count) FILTER (WHERE event_type = 'user.activated'), 0)::bigint AS activations,
       coalesce(sum(count) FILTER (WHERE event_type = 'user.deactivated'), 0)::bigint AS deactivations
FROM analytics.event_counts_daily
GROUP BY 1;
COMMENT ON VIEW analytics.registrations_vs_activations IS
    'Registrations, activations and deactivations per UTC day.';
