"""TFRecord files without TensorFlow: record framing, reading one record back, Example parsing.

A TFRecord file is a sequence of length-prefixed, CRC-checked payloads; an RLDS payload is a
serialized `tf.train.Example` (or `SequenceExample`), parsed here with the protobuf classes that
the `tfrecord` package ships.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from steadyvla.optional import require


def _example_pb2() -> Any:
    return require("tfrecord.example_pb2", extra="rlds", purpose="reading RLDS (tfrecord + protobuf)")


# ---------------------------------------------------------------- TFRecord framing


def _masked_crc(data: bytes) -> int:
    import crc32c  # installed with tfrecord; only needed when verifying

    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def iter_tfrecord(path: Path, verify_crc: bool = False) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset of the payload, payload) for every record of a TFRecord file.

    Framing: u64 length, u32 masked crc32c of the length, payload, u32 masked crc32c of payload.
    """
    with open(path, "rb", buffering=1 << 20) as f:
        pos = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ValueError(f"{path}: truncated record header at byte {pos}")
            (length,) = struct.unpack("<Q", head[:8])
            payload, tail = f.read(length), f.read(4)
            if len(payload) < length or len(tail) < 4:
                raise ValueError(f"{path}: truncated record at byte {pos}: expected {length} bytes")
            if verify_crc and (
                struct.unpack("<I", head[8:])[0] != _masked_crc(head[:8])
                or struct.unpack("<I", tail)[0] != _masked_crc(payload)
            ):
                raise ValueError(f"{path}: CRC mismatch in the record at byte {pos}")
            yield pos + 12, payload
            pos += 16 + length


def read_record(path: Path, offset: int, length: int) -> bytes:
    """Read one record payload at a known byte offset (from `iter_tfrecord`)."""
    with open(path, "rb") as f:
        f.seek(offset)
        payload = f.read(length)
    if len(payload) != length:
        raise ValueError(
            f"{path}: record at byte {offset} is truncated (file changed since indexing?)"
        )
    return payload


# ---------------------------------------------------------------- one record


class Record:
    """A parsed episode record (Example, or SequenceExample with per-step feature lists)."""

    def __init__(self, payload: bytes) -> None:
        proto = _example_pb2().SequenceExample.FromString(payload)  # an Example parses as this too
        self._context = proto.context.feature
        self._lists = proto.feature_lists.feature_list

    def has(self, key: str) -> bool:
        return key in self._context or key in self._lists

    def values(self, key: str) -> Sequence[Any]:
        """The flat list of values of `key`, concatenated over steps for feature lists."""
        if key in self._context:
            return _feature_values(self._context[key])
        if key in self._lists:
            return [v for f in self._lists[key].feature for v in _feature_values(f)]
        raise KeyError(key)


def _feature_values(feature: Any) -> Sequence[Any]:
    kind = feature.WhichOneof("kind")
    return getattr(feature, kind).value if kind else []

