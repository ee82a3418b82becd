"""Tensor names and shapes of safetensors files, read from their JSON headers (no torch import, no weights read).

A safetensors file starts with an 8-byte little-endian header length and a JSON header mapping every tensor
name to its dtype, shape and offsets; that is all config validation and the adapter checks need.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} of one .safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header length)")
        (size,) = struct.unpack("<Q", head)
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def model_weight_shapes(model_dir: Path) -> dict[str, list[int]] | None:
    """{parameter name: shape} of a local model folder's safetensors weights; None when there are none to read
    (a hub id, or weights in another format)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for f in files:
        shapes.update(tensor_shapes(f))
    return shapes
