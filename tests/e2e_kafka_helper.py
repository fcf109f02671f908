"""Kafka side of the e2e replay test (tests/e2e_k8s.py), with confluent-kafka.

  e2e_kafka_helper.py prepare BROKERS TOPIC GROUP PARTITIONS RECORDS
      create TOPIC, produce RECORDS records, commit GROUP's offsets at the end of every
      partition (assign + commit, no group membership left behind)
  e2e_kafka_helper.py committed BROKERS TOPIC GROUP
      print GROUP's committed offset per partition as JSON ({"0": 10, ...}; -1 = none)
"""

import json
import sys

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def partitions(consumer: Consumer, topic: str) -> list[int]:
    md = consumer.list_topics(topic, timeout=10)
    return sorted(md.topics[topic].partitions)


def prepare(brokers: str, topic: str, group: str, n_parts: int, records: int) -> None:
    admin = AdminClient({"bootstrap.servers": brokers})
    for f in admin.create_topics([NewTopic(topic, n_parts, 1)]).values():
        f.result(timeout=30)
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    # The end of each partition from the delivery reports (not from ListOffsets, which some
    # Kafka-compatible brokers answer differently).
    ends: dict[int, int] = {}

    def delivered(err, msg):
        if err is None:
            ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for i in range(records):
        producer.produce(topic, key=str(i), value=json.dumps({"n": i}), partition=i % n_parts,
                         on_delivery=delivered)
    if producer.flush(30) != 0 or sum(1 for _ in ends) != n_parts:
        raise SystemExit(f"records not delivered: {ends}")
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": group,
                         "enable.auto.commit": False})
    offsets = [TopicPartition(topic, p, end) for p, end in sorted(ends.items())]
    consumer.commit(offsets=offsets, asynchronous=False)
    consumer.close()


def committed(brokers: str, topic: str, group: str) -> None:
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": group,
                         "enable.auto.commit": False})
    tps = [TopicPartition(topic, p) for p in partitions(consumer, topic)]
    out = {str(tp.partition): tp.offset for tp in consumer.committed(tps, timeout=10)}
    consumer.close()
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "prepare":
        prepare(args[0], args[1], args[2], int(args[3]), int(args[4]))
    elif cmd == "committed":
        committed(*args)
    else:
        raise SystemExit(__doc__)
