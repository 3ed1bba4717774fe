"""DCP `Metadata` <-> JSON, an exact round trip without pickle.

torch.distributed.checkpoint pickles its `Metadata`; checkpoints here are never unpickled, so the
metadata is written as JSON by this codec instead. Every dataclass it knows is checked field by
field against the installed torch: a field or value type it does not know fails at save time
(`DcpMetadataError`) rather than being dropped. Python values in `planner_data` are tagged so that
tuples, `torch.Size` and non-string dict keys come back as they were.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
    TensorStorageMetadata,
)

FORMAT_NAME = "steadyvla-dcp-metadata"
FORMAT_VERSION = 1

# Fixed tables (names looked up on the torch module, never evaluated); names this torch lacks are skipped.
_DTYPE_NAMES = (
    "float32", "float64", "float16", "bfloat16", "complex32", "complex64", "complex128", "bool",
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
)
_LAYOUT_NAMES = ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged")
_MEMORY_FORMAT_NAMES = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")


def _table(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(torch, name) for name in names if hasattr(torch, name)}


DTYPES = _table(_DTYPE_NAMES)
LAYOUTS = _table(_LAYOUT_NAMES)
MEMORY_FORMATS = _table(_MEMORY_FORMAT_NAMES)

# The fields this codec writes, per dataclass; the installed torch must have exactly these.
_KNOWN_FIELDS: dict[type, set[str]] = {
    Metadata: {"state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"},
    TensorProperties: {"dtype", "layout", "requires_grad", "memory_format", "pin_memory"},
    TensorStorageMetadata: {"properties", "size", "chunks"},
    ChunkStorageMetadata: {"offsets", "sizes"},
    BytesStorageMetadata: set(),
    StorageMeta: {"checkpoint_id", "save_id", "load_id", "modules"},
    MetadataIndex: {"fqn", "offset", "index"},
    _StorageInfo: {"relative_path", "offset", "length", "transform_descriptors"},
}


class DcpMetadataError(ValueError):
    """DCP metadata that cannot be written to, or read from, JSON."""


def _check_fields(obj: Any, where: str) -> None:
    cls = type(obj)
    known = _KNOWN_FIELDS.get(cls)
    if known is None:
        raise DcpMetadataError(f"{where}: cannot serialise a {cls.__module__}.{cls.__qualname__} "
                               f"(known: {sorted(c.__name__ for c in _KNOWN_FIELDS)})")
    have = {f.name for f in dataclasses.fields(cls)} | set(vars(obj))
    if have != known:
        raise DcpMetadataError(f"{where}: {cls.__name__} of this torch ({torch.__version__}) has fields "
                               f"{sorted(have)}, the JSON codec knows {sorted(known)}")


def _name_of(value: Any, table: dict[str, Any], what: str, where: str) -> str:
    for name, member in table.items():
        if value == member:
            return name
    raise DcpMetadataError(f"{where}: {what} {value!r} is not one of {sorted(table)}")


def _member(name: Any, table: dict[str, Any], what: str, where: str) -> Any:
    if not isinstance(name, str) or name not in table:
        raise DcpMetadataError(f"{where}: {what} {name!r} is not one of {sorted(table)}")
    return table[name]


def _ints(values: Any, where: str) -> list[int]:
    out = list(values)
    if not all(type(v) is int for v in out):
        raise DcpMetadataError(f"{where}: expected a list of ints, got {values!r}")
    return out


def _strs(values: Any, where: str) -> list[str]:
    out = list(values)
    if not all(type(v) is str for v in out):
        raise DcpMetadataError(f"{where}: expected a list of str, got {values!r}")
    return out


def encode_value(value: Any, where: str) -> Any:
    """A plain Python value as JSON: lists stay arrays, anything else that JSON would blur is tagged."""
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if type(value) is list:
        return [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type(value) is tuple:
        return {"tuple": [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if type(value) is torch.Size:
        return {"size": list(value)}
    if type(value) is dict:
        return {"dict": [[encode_value(k, f"{where} key"), encode_value(v, f"{where}[{k!r}]")]
                         for k, v in value.items()]}
    raise DcpMetadataError(f"{where}: cannot serialise a value of type {type(value).__qualname__}: {value!r}")


def decode_value(data: Any, where: str) -> Any:
    """Inverse of `encode_value`."""
    if data is None or type(data) in (bool, int, str, float):
        return data
    if type(data) is list:
        return [decode_value(v, where) for v in data]
    if type(data) is dict and len(data) == 1:
        ((tag, body),) = data.items()
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "tuple" and type(body) is list:
            return tuple(decode_value(v, where) for v in body)
        if tag == "size" and type(body) is list:
            return torch.Size(_ints(body, where))
        if tag == "dict" and type(body) is list and all(type(kv) is list and len(kv) == 2 for kv in body):
            return {decode_value(k, where): decode_value(v, where) for k, v in body}
    raise DcpMetadataError(f"{where}: not an encoded value: {data!r}")


def _encode_storage(md: Any, where: str) -> dict[str, Any]:
    _check_fields(md, where)
    if type(md) is BytesStorageMetadata:
        return {"type": "bytes"}
    props = md.properties
    _check_fields(props, f"{where}.properties")
    for chunk in md.chunks:
        _check_fields(chunk, f"{where}.chunks")
    return {
        "type": "tensor",
        "properties": {
            "dtype": _name_of(props.dtype, DTYPES, "dtype", where),
            "layout": _name_of(props.layout, LAYOUTS, "layout", where),
            "requires_grad": bool(props.requires_grad),
            "memory_format": _name_of(props.memory_format, MEMORY_FORMATS, "memory_format", where),
            "pin_memory": bool(props.pin_memory),
        },
        "size": _ints(md.size, f"{where}.size"),
        "chunks": [{"offsets": _ints(c.offsets, f"{where}.chunks"), "sizes": _ints(c.sizes, f"{where}.chunks")}
                   for c in md.chunks],
    }


def _decode_storage(data: dict[str, Any], where: str) -> Any:
    if data["type"] == "bytes":
        return BytesStorageMetadata()
    if data["type"] != "tensor":
        raise DcpMetadataError(f"{where}: storage type {data['type']!r} is not 'tensor' or 'bytes'")
    p = data["properties"]
    props = TensorProperties(
        dtype=_member(p["dtype"], DTYPES, "dtype", where), layout=_member(p["layout"], LAYOUTS, "layout", where),
        requires_grad=bool(p["requires_grad"]),
        memory_format=_member(p["memory_format"], MEMORY_FORMATS, "memory_format", where),
        pin_memory=bool(p["pin_memory"]))
    chunks = [ChunkStorageMetadata(offsets=torch.Size(_ints(c["offsets"], where)),
                                   sizes=torch.Size(_ints(c["sizes"], where))) for c in data["chunks"]]
    return TensorStorageMetadata(properties=props, size=torch.Size(_ints(data["size"], where)), chunks=chunks)


def _encode_path_like(value: Any, where: str) -> Any:
    if value is None or type(value) is str:
        return value
    if isinstance(value, os.PathLike):
        return {"path": os.fspath(value)}
    raise DcpMetadataError(f"{where}: expected a str or path, got {type(value).__qualname__}")


def _encode_storage_data(storage_data: Any) -> Any:
    if storage_data is None:
        return None
    if type(storage_data) is not dict:
        raise DcpMetadataError(f"storage_data: expected a dict, got {type(storage_data).__qualname__}")
    entries = []
    for index, info in storage_data.items():
        where = f"storage_data[{getattr(index, 'fqn', index)!r}]"
        _check_fields(index, where)
        _check_fields(info, where)
        descriptors = info.transform_descriptors
        entries.append({
            "index": {"fqn": index.fqn, "offset": None if index.offset is None else _ints(index.offset, where),
                      "index": index.index},
            "info": {"relative_path": info.relative_path, "offset": info.offset, "length": info.length,
                     "transform_descriptors": None if descriptors is None else _strs(descriptors, where)},
        })
    return entries


def _decode_storage_data(entries: Any) -> Any:
    if entries is None:
        return None
    out: dict[MetadataIndex, _StorageInfo] = {}
    for e in entries:
        i, info = e["index"], e["info"]
        out[MetadataIndex(fqn=i["fqn"], offset=i["offset"], index=i["index"])] = _StorageInfo(
            relative_path=info["relative_path"], offset=info["offset"], length=info["length"],
            transform_descriptors=info["transform_descriptors"])
    return out


def metadata_to_json(md: Metadata) -> dict[str, Any]:
    """The whole `Metadata` as a JSON-able dict; raises DcpMetadataError for anything it cannot keep."""
    _check_fields(md, "Metadata")
    sm = md.storage_meta
    if sm is not None:
        _check_fields(sm, "storage_meta")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "version": md.version,
        "state_dict_metadata": [[fqn, _encode_storage(v, f"state_dict_metadata[{fqn!r}]")]
                                for fqn, v in md.state_dict_metadata.items()],
        "planner_data": encode_value(md.planner_data, "planner_data"),
        "storage_data": _encode_storage_data(md.storage_data),
        "storage_meta": None if sm is None else {
            "checkpoint_id": _encode_path_like(sm.checkpoint_id, "storage_meta.checkpoint_id"),
            "save_id": sm.save_id, "load_id": sm.load_id, "modules": _strs(sm.modules, "storage_meta.modules")},
    }


def metadata_from_json(data: Any, source: Path) -> Metadata:
    """Inverse of `metadata_to_json`; any malformed content raises DcpMetadataError naming `source`."""
    try:
        if data.get("format") != FORMAT_NAME or data.get("format_version") != FORMAT_VERSION:
            raise DcpMetadataError(f"format {data.get('format')!r} version {data.get('format_version')!r}, "
                                   f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}")
        sm = data["storage_meta"]
        storage_meta = None if sm is None else StorageMeta(
            checkpoint_id=Path(sm["checkpoint_id"]["path"]) if type(sm["checkpoint_id"]) is dict
            else sm["checkpoint_id"], save_id=sm["save_id"], load_id=sm["load_id"], modules=list(sm["modules"]))
        return Metadata(
            state_dict_metadata={fqn: _decode_storage(v, f"state_dict_metadata[{fqn!r}]")
                                 for fqn, v in data["state_dict_metadata"]},
            planner_data=decode_value(data["planner_data"], "planner_data"),
            storage_data=_decode_storage_data(data["storage_data"]),
            storage_meta=storage_meta,
            version=data["version"],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DcpMetadataError(f"{source}: DCP metadata is not a valid steadyvla JSON metadata file "
                               f"({type(exc).__name__}: {exc})") from exc
