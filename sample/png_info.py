"""Generation settings inside the PNG, as AUTOMATIC1111's web UI writes them.

A1111 stores one `tEXt` chunk with keyword `parameters` (ComfyUI, InvokeAI, civitai and the A1111
"PNG Info" tab read it back):

    an image of a sks with a crack
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 12345, Size: 512x512, Model hash: 6ce0161689, Model: concept

Line 1: the prompt (may span lines); then "Negative prompt: ..." (omitted when empty); the last
line is "key: value" pairs joined by ", " (a value holding "," or ":" is JSON-quoted, as A1111
does). The model hash is A1111's "new" short hash: the first 10 hex digits of the file's SHA-256.

A PNG chunk is: 4-byte big-endian length, 4-byte type, data, CRC-32 of type + data; `tEXt` data is
keyword, NUL, Latin-1 text. Text outside Latin-1 goes into an `iTXt` chunk (UTF-8), as PIL writes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEYWORD = "parameters"

# Our sampler names -> the names A1111 shows (and other tools parse back).
A1111_SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "dpmpp": "DPM++ 2M", "dpmpp_karras": "DPM++ 2M Karras",
                       "euler_a": "Euler a", "unipc": "UniPC"}


def model_hash(path: str | os.PathLike) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256 (a folder: of its
    files' hashes in name order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:10]


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or "\n" in text) else text


def a1111_parameters(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    """The `parameters` text: prompt, optional negative prompt, then the settings line."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) back from a `parameters` text (settings as strings)."""
    lines = text.split("\n")
    settings_line = lines.pop() if lines and ": " in lines[-1] and lines[-1].startswith("Steps: ") else ""
    negative_at = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")), None)
    if negative_at is None:
        prompt, negative = "\n".join(lines), ""
    else:
        prompt = "\n".join(lines[:negative_at])
        negative = "\n".join(lines[negative_at:])[len("Negative prompt: "):]
    settings: dict[str, str] = {}
    rest = settings_line
    while rest:
        key, _, rest = rest.partition(": ")
        if rest.startswith('"'):
            value, end = json.JSONDecoder().raw_decode(rest)
            rest = rest[end:]
        else:
            value, _, rest = rest.partition(", ")
            rest = ", " + rest if rest else ""
        settings[key] = str(value)
        rest = rest[2:] if rest.startswith(", ") else rest
    return prompt, negative, settings


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def add_text_chunk(png: bytes, text: str, keyword: str = KEYWORD) -> bytes:
    """The PNG bytes with one text chunk (`tEXt`, or `iTXt` for non-Latin-1 text) before IEND."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("add_text_chunk: not PNG data")
    try:
        chunk = _chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: keyword, NUL, compression flag 0, method 0, language "", NUL, NUL, UTF-8
        chunk = _chunk(b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))
    end = png.rfind(b"IEND") - 4  # the IEND chunk starts with its 4-byte length
    if end < len(PNG_SIGNATURE):
        raise ValueError("add_text_chunk: PNG data without an IEND chunk")
    return png[:end] + chunk + png[end:]


def read_text_chunks(path: str | os.PathLike) -> dict[str, str]:
    """Every tEXt / iTXt (uncompressed) chunk of a PNG file as keyword -> text."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    found, pos = {}, len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I", data[pos:pos + 4])[0], data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            keyword, _, text = body.partition(b"\0")
            found[keyword.decode("latin-1")] = text.decode("latin-1")
        elif kind == b"iTXt":
            keyword, _, rest = body.partition(b"\0")
            if rest[:1] == b"\0":  # not compressed
                _language, _, rest = rest[2:].partition(b"\0")
                _translated, _, text = rest.partition(b"\0")
                found[keyword.decode("latin-1")] = text.decode("utf-8")
        pos += 12 + length
    return found
