"""The Dataset artifact's layout: file names and the index schema, shared by writer and reader.

    <dataset>/manifest.json           written last: a dataset without it is incomplete
    <dataset>/index.parquet           one row per sample (INDEX_SCHEMA)
    <dataset>/stats.json              per-split counts, image bytes and label histogram
    <dataset>/shards/<split>-NNNNNN.tar

Shards are WebDataset tar files (https://github.com/webdataset/webdataset): the members of one
sample share a key, `<key>.png` or `<key>.jpg`, `<key>.json`, optional `<key>.seg.png` and
`<key>.txt`, and follow each other in the tar.
"""

from __future__ import annotations

import pyarrow as pa

INDEX = "index.parquet"
STATS = "stats.json"
SHARDS_DIR = "shards"
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("source", pa.string()),
    ("sha256", pa.string()), ("size", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
    ("label", pa.int32()), ("cluster", pa.string()), ("duplicate_of", pa.string()), ("caption", pa.string()),
])
