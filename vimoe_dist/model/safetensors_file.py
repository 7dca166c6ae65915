"""What is wrong with a safetensors file, read from its header alone, in words that name the tensor.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian N, then N bytes of JSON mapping each
tensor's name to its dtype, shape and `data_offsets` [begin, end) into the byte buffer that follows the header.
The safetensors library refuses a bad file with its own terms ("MetadataIncompleteBuffer", "HeaderTooLarge") and no
tensor name; this check runs first and says which tensor a truncated file cut off, or that the header size is
impossible, reading at most the header (capped at the library's own 100 MB limit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MAX_HEADER = 100_000_000  # the safetensors library's own cap on the header size


def safetensors_problem(path: str | Path) -> str:
    """Why `path` is not a whole safetensors file ("" when its header and sizes add up)."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"is {size} bytes long, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or n > size - 8:
                return f"declares a header of {n:,} bytes in a file of {size:,} bytes (truncated or not safetensors)"
            raw = f.read(n)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "has a header that is not JSON (not a safetensors file?)"
    if not isinstance(header, dict):
        return "has a header that is not a JSON object"
    data = size - 8 - n
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"has no valid data_offsets for tensor {name}"
        tensors.append((offsets[1], offsets[0], name))
    for end, begin, name in sorted(tensors):
        if not 0 <= begin <= end:
            return f"gives tensor {name} the byte range [{begin}, {end})"
        if end > data:
            return f"is truncated: tensor {name} needs bytes up to {end:,} of the data, the file holds {data:,}"
    return ""
