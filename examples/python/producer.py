"""An upstream system publishing transfer requests to Bridge.

    python producer.py --brokers 127.0.0.1:9092 --investor demo-inv-00001 \
        --fund-account demo-fa-growth --count 5

Prints the transfer ids it published, one per line. Follows the request
topic's conventions: key = transfer id, CloudEvents headers in binary mode,
Avro single-object payload, acks from every in-sync replica, idempotence on.
"""

import argparse
import datetime
import random
import sys
import uuid

from confluent_kafka import Producer

from bridge_avro import Codec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--investor", action="append", required=True)
    parser.add_argument("--fund-account", required=True)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--currency", default="EUR")
    args = parser.parse_args()

    codec = Codec("transfer_requested.avsc")
    producer = Producer(
        {
            "bootstrap.servers": args.brokers,
            "broker.address.family": "v4",
            "acks": "all",
            "enable.idempotence": True,
        }
    )
    topic = f"{args.topic_prefix}bridge.transfers.requested.v1"
    failures = []

    def delivered(error, message):
        if error is not None:
            failures.append(error)

    for index in range(args.count):
        transfer_id = str(uuid.uuid4())
        now = datetime.datetime.now(datetime.timezone.utc)
        record = {
            "transfer_id": transfer_id,
            "investor_account_id": args.investor[index % len(args.investor)],
            "fund_account_id": args.fund_account,
            # Money is integer minor units: 1,000.00 to 2,000.00.
            "amount_minor": random.randint(1_000_00, 2_000_00),
            "currency": args.currency,
            "requested_at": int(now.timestamp() * 1000),
            "reference": f"python-example-{index}",
            "source_system": "python-example",
        }
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", str(uuid.uuid4()).encode()),
            ("ce_type", b"io.bridge.transfer.requested.v1"),
            ("ce_source", b"/upstream/python-example"),
            ("ce_subject", transfer_id.encode()),
            ("ce_time", now.isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()),
            ("content-type", b"application/avro"),
        ]
        producer.produce(topic, key=transfer_id, value=codec.encode(record), headers=headers, on_delivery=delivered)
        print(transfer_id, flush=True)
    remaining = producer.flush(30)
    if remaining or failures:
        print(f"{remaining} undelivered, failures: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
