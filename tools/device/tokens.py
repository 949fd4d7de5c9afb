"""Writes a token file for `hadal score`: I32 [1, N] pseudo-random ids below a vocabulary, as
safetensors (written by hand: no third-party package needed)."""
import json
import struct
import sys

out, n, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x, ids = 4096, []
for _ in range(n):
    x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
    ids.append((x >> 33) % vocab)
data = struct.pack(f"<{n}i", *ids)
header = json.dumps({"tokens": {"dtype": "I32", "shape": [1, n], "data_offsets": [0, len(data)]}})
header += " " * (-len(header) % 8)
with open(out, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header.encode() + data)
