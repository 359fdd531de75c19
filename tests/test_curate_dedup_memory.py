"""Peak memory of near-dedup against the collection size (docs/curate.md, "Memory model").

Descriptor files are written directly, as ingest writes them (one float16 [1024, 10, 384] `.desc.npy`
per chunk: random unit views, every 8th image a noisy copy of the one before), so that no image is
decoded. The near-dedup step then runs in a fresh interpreter per size (RSS is clean there), on
the bounded path (`ivf_min_size` 1: the streamed IVF-SQ8 index and exact re-scoring of its
candidates). Peak RSS is the kernel's high-water mark (VmHWM). Holding every descriptor, as a whole-collection search would, costs 7680 bytes per
image: 4x the images would be ~4x the memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from gramline.curate.dedup import DESCRIPTOR_DIM

CHUNK, VIEWS = 1024, 10
SMALL_CHUNKS, LARGE_CHUNKS = 8, 32  # 8192 and 32768 images
DESCRIPTOR_BYTES = VIEWS * DESCRIPTOR_DIM * 2  # float16, per image

STEP = """
import json, sys
from pathlib import Path

import faiss  # noqa: F401  (imports belong to the baseline)
import numpy as np

from gramline.curate.dedup import ViewChunks, near_duplicates



def peak_rss() -> int:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


paths = sorted(Path(sys.argv[1]).glob("chunk-*.desc.npy"))[: int(sys.argv[2])]
base = peak_rss()
result = near_duplicates(ViewChunks([(p, None) for p in paths]), 0.91, ivf_min_size=1, nprobe=1)
peak = peak_rss()
labels = result.component
copies = np.arange(1, len(labels), 8)
joined = labels[copies] == labels[copies - 1]
wrong = len(labels) - int(joined.sum()) - len(np.unique(labels))  # merges beyond the planted pairs
print(json.dumps({"images": len(labels), "increase": peak - base, "found": float(joined.mean()),
                  "wrong_merges": wrong}))
"""


def _write_descriptors(root: Path, n_chunks: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(n_chunks):
        views = rng.standard_normal((CHUNK, VIEWS, DESCRIPTOR_DIM), dtype=np.float32)
        views[1::8] = views[0::8] + 0.05 * rng.standard_normal(views[1::8].shape, dtype=np.float32)
        views /= np.linalg.norm(views, axis=2, keepdims=True)
        np.save(root / f"chunk-{c:06d}.desc.npy", views.astype(np.float16))


def _near_dedup_peak(root: Path, n_chunks: int) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP, str(root), str(n_chunks)], capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_near_dedup_peak_rss_increase_under_2x_for_4x_images(tmp_path: Path) -> None:
    _write_descriptors(tmp_path, LARGE_CHUNKS)
    small = _near_dedup_peak(tmp_path, SMALL_CHUNKS)
    large = _near_dedup_peak(tmp_path, LARGE_CHUNKS)
    assert (small["images"], large["images"]) == (SMALL_CHUNKS * CHUNK, LARGE_CHUNKS * CHUNK)
    for run in (small, large):  # the search works: the planted copies are found, nothing else is
        assert run["found"] >= 0.95 and run["wrong_merges"] == 0, run
    assert large["increase"] < 2 * small["increase"], (small, large)
    # each added image costs well under its descriptor bytes: they are never all held
    per_image = (large["increase"] - small["increase"]) / (large["images"] - small["images"])
    assert per_image < DESCRIPTOR_BYTES / 4, (per_image, small, large)


if __name__ == "__main__":  # the table in docs/curate.md: python tests/test_curate_dedup_memory.py 1 8 32 80
    import tempfile

    sizes = [int(a) for a in sys.argv[1:]] or [SMALL_CHUNKS, LARGE_CHUNKS]
    with tempfile.TemporaryDirectory() as tmp:
        _write_descriptors(Path(tmp), max(sizes))
        for n_chunks in sizes:
            print(json.dumps(_near_dedup_peak(Path(tmp), n_chunks)), flush=True)
