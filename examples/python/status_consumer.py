"""A downstream system following transfers on Bridge's status topic.

    python status_consumer.py --brokers 127.0.0.1:9092 --group my-service \
        --wait-for ids.txt --timeout 120

Decodes every status event with schemas/transfer_status_changed.avsc and
prints it as JSON. Bridge writes the Avro single-object encoding, or, when it
is given a schema registry, Confluent's wire format: pass the same registry
with --schema-registry and the events are read with confluent-kafka's stock
AvroDeserializer (the registry's writer schema, resolved against ours):

    python status_consumer.py --brokers 127.0.0.1:29092 --group my-service \
        --schema-registry http://127.0.0.1:8085

--kafka-option key=value passes librdkafka settings (security.protocol,
sasl.mechanism, ssl.ca.location, ...) for a secured cluster. With --wait-for (a file of transfer ids, one per line) it
exits 0 once each of them has reached an end state, 1 on timeout. Events
may arrive more than once (at-least-once delivery); `event_id` identifies
one status change, so a consumer keeps the ids it has handled.
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, KafkaError

from bridge_avro import Codec, schema_path

END_STATES = {"completed", "rejected", "failed", "reversed", "manual_review"}


def decoder(args):
    """A function from a message to its event, for the framing Bridge writes."""
    if not args.schema_registry:
        codec = Codec("transfer_status_changed.avsc")
        return lambda message: codec.decode(message.value())
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    conf = {"url": args.schema_registry}
    if args.schema_registry_auth:
        conf["basic.auth.user.info"] = args.schema_registry_auth
    if args.schema_registry_ca:
        conf["ssl.ca.location"] = args.schema_registry_ca
    with open(schema_path("transfer_status_changed.avsc"), encoding="utf-8") as handle:
        reader_schema = handle.read()
    deserializer = AvroDeserializer(SchemaRegistryClient(conf), reader_schema)
    return lambda message: deserializer(
        message.value(), SerializationContext(message.topic(), MessageField.VALUE)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--group", required=True)
    parser.add_argument("--wait-for")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--schema-registry", help="the registry Bridge writes with (Confluent's wire format)")
    parser.add_argument("--schema-registry-auth", help="USER:PASSWORD for the registry's basic authentication")
    parser.add_argument("--schema-registry-ca", help="PEM file of the CA of the registry's certificate")
    parser.add_argument("--kafka-option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    waiting = set()
    if args.wait_for:
        with open(args.wait_for, encoding="utf-8") as handle:
            waiting = {line.strip() for line in handle if line.strip()}
    decode = decoder(args)
    settings = {
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,
    }
    settings.update(option.split("=", 1) for option in args.kafka_option)
    consumer = Consumer(settings)
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
            event = decode(message)
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
