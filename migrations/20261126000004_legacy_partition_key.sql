-- The legacy partition (the table as it was before partitioning) kept its old unique index on
-- (kafka_topic, kafka_partition, kafka_offset), stricter than the table's key, which includes
-- "timestamp". With it, a new event that reuses an old offset (a topic deleted and created
-- again, a broker that lost its log) would be skipped as a duplicate instead of stored. The
-- table-wide key (kafka_topic, kafka_partition, kafka_offset, "timestamp") still applies there.
DROP INDEX IF EXISTS analytics.events_legacy_kafka_coordinates_key;
