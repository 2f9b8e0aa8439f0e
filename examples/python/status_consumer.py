"""A downstream system following transfers on Bridge's status topic.

    python status_consumer.py --brokers 127.0.0.1:9092 --group my-service \
        --wait-for ids.txt --timeout 120

Decodes every status event with schemas/transfer_status_changed.avsc and
prints it as JSON. With --wait-for (a file of transfer ids, one per line) it
exits 0 once each of them has reached an end state, 1 on timeout. Events
may arrive more than once (at-least-once delivery); `event_id` identifies
one status change, so a consumer keeps the ids it has handled.
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, KafkaError

from bridge_avro import Codec

END_STATES = {"completed", "rejected", "failed", "reversed", "manual_review"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--group", required=True)
    parser.add_argument("--wait-for")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()

    waiting = set()
    if args.wait_for:
        with open(args.wait_for, encoding="utf-8") as handle:
            waiting = {line.strip() for line in handle if line.strip()}
    codec = Codec("transfer_status_changed.avsc")
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "broker.address.family": "v4",
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
        }
    )
    consumer.subscribe([f"{args.topic_prefix}bridge.transfers.status.v1"])
    seen_events = set()
    finished = {}
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                if message.error().code() != KafkaError._PARTITION_EOF:
                    print(f"consumer error: {message.error()}", file=sys.stderr)
                continue
            event = codec.decode(message.value())
            if event["event_id"] in seen_events:
                continue
            seen_events.add(event["event_id"])
            print(json.dumps(event, default=str), flush=True)
            if event["state"] in END_STATES:
                finished[event["transfer_id"]] = event["state"]
            if waiting and waiting <= finished.keys():
                states = {}
                for transfer_id in waiting:
                    states[finished[transfer_id]] = states.get(finished[transfer_id], 0) + 1
                print(f"all {len(waiting)} transfers finished: {states}", file=sys.stderr)
                return 0
    finally:
        consumer.close()
    if waiting:
        print(f"{len(waiting - finished.keys())} of {len(waiting)} transfers not finished", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
