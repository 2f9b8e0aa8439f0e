"""An upstream system publishing transfer requests to Bridge.

    python producer.py --brokers 127.0.0.1:9092 --investor demo-inv-00001 \
        --fund-account demo-fa-growth --count 5

Prints the transfer ids it published, one per line. Follows the request
topic's conventions: key = transfer id, CloudEvents headers in binary mode,
Avro single-object payload, acks from every in-sync replica, idempotence on.

With --source and --source-secret (the secret `bridge sources add` printed)
each request is signed as that source, as a pipeline run with
--require-signed-requests demands: HMAC-SHA256 (Standard Webhooks) over
"<transfer id>.<unix seconds>.<payload>", in the headers bridge-source,
bridge-signature-timestamp and bridge-signature ("v1,<base64>").
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import random
import sys
import time
import uuid

from confluent_kafka import Producer

from bridge_avro import Codec


def signature_headers(source: str, secret: str, key: str, payload: bytes) -> list[tuple[str, bytes]]:
    """The headers that sign a request published under `key`."""
    secret_bytes = base64.b64decode(secret.removeprefix("whsec_"))
    timestamp = str(int(time.time()))
    signed = f"{key}.{timestamp}.".encode() + payload
    digest = hmac.new(secret_bytes, signed, hashlib.sha256).digest()
    return [
        ("bridge-source", source.encode()),
        ("bridge-signature-timestamp", timestamp.encode()),
        ("bridge-signature", b"v1," + base64.b64encode(digest)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--investor", action="append", required=True)
    parser.add_argument("--fund-account", required=True)
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--currency", default="EUR")
    parser.add_argument("--source", help="sign as this registered source (also the requests' source_system)")
    parser.add_argument("--source-secret", help="the source's whsec_ signing secret")
    parser.add_argument("--kafka-option", action="append", default=[], metavar="KEY=VALUE",
                        help="librdkafka settings for a secured cluster (security.protocol, sasl.mechanism, ...)")
    args = parser.parse_args()
    if bool(args.source) != bool(args.source_secret):
        parser.error("--source and --source-secret go together")
    source_system = args.source or "python-example"

    codec = Codec("transfer_requested.avsc")
    settings = {
        "bootstrap.servers": args.brokers,
        "acks": "all",
        "enable.idempotence": True,
    }
    settings.update(option.split("=", 1) for option in args.kafka_option)
    producer = Producer(settings)
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
            "source_system": source_system,
        }
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", str(uuid.uuid4()).encode()),
            ("ce_type", b"io.bridge.transfer.requested.v1"),
            ("ce_source", f"/upstream/{source_system}".encode()),
            ("ce_subject", transfer_id.encode()),
            ("ce_time", now.isoformat(timespec="milliseconds").replace("+00:00", "Z").encode()),
            ("content-type", b"application/avro"),
        ]
        payload = codec.encode(record)
        if args.source:
            headers += signature_headers(args.source, args.source_secret, transfer_id, payload)
        producer.produce(topic, key=transfer_id, value=payload, headers=headers, on_delivery=delivered)
        print(transfer_id, flush=True)
    remaining = producer.flush(30)
    if remaining or failures:
        print(f"{remaining} undelivered, failures: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
