"""Writes a token file for `hadal score`: I32 [B, N] pseudo-random ids below a vocabulary
(`tokens.py OUT N VOCAB [B]`, B = 1 by default), as safetensors (written by hand: no
third-party package needed)."""
import json
import struct
import sys

out, n, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
b = int(sys.argv[4]) if len(sys.argv) > 4 else 1
x, ids = 4096, []
for _ in range(b * n):
    x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
    ids.append((x >> 33) % vocab)
data = struct.pack(f"<{b * n}i", *ids)
header = json.dumps({"tokens": {"dtype": "I32", "shape": [b, n], "data_offsets": [0, len(data)]}})
header += " " * (-len(header) % 8)
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header.encode() + data)
