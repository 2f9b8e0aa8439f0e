"""Bridge's wire format, from the .avsc files in schemas/ alone.

Payloads use the Avro specification's single-object encoding: the marker
C3 01, the 8-byte little-endian CRC-64-AVRO (Rabin) fingerprint of the
writer schema's canonical form, then the Avro binary datum. Nothing here
comes from Bridge's own code: only the schema files and the spec.
"""

import io
import json
import pathlib
import struct

import fastavro
from fastavro.schema import to_parsing_canonical_form

SCHEMAS = pathlib.Path(__file__).resolve().parents[2] / "schemas"
MAGIC = b"\xc3\x01"

_EMPTY = 0xC15D213AA4D7A795


def _table():
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _table()


def rabin_fingerprint(text: str) -> int:
    """CRC-64-AVRO, as the Avro specification gives it."""
    fp = _EMPTY
    for byte in text.encode("utf-8"):
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def schema_path(file_name: str) -> pathlib.Path:
    return SCHEMAS / file_name


class Codec:
    def __init__(self, file_name: str):
        with open(SCHEMAS / file_name, encoding="utf-8") as handle:
            self.schema = fastavro.parse_schema(json.load(handle))
        canonical = to_parsing_canonical_form(self.schema)
        self.header = MAGIC + struct.pack("<Q", rabin_fingerprint(canonical))

    def encode(self, record: dict) -> bytes:
        out = io.BytesIO()
        out.write(self.header)
        fastavro.schemaless_writer(out, self.schema, record)
        return out.getvalue()

    def decode(self, payload: bytes) -> dict:
        if payload[:10] != self.header:
            raise ValueError(f"not a {self.schema['name']} record: header {payload[:10].hex()}")
        return fastavro.schemaless_reader(io.BytesIO(payload[10:]), self.schema)
