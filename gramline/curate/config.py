"""The curation config schema, `CurateConfig`, one section per step.

The preset values (`tiny`, the default for CPU/CI, and `large`) live in `gramline.presets`
(`PRESETS["curate"]`); a run resolves schema defaults ← preset ← `--config FILE` ← `--set key=value`
with `gramline.config.load_stage_config(CurateConfig, "curate", ...)`. The method behind the
clustering and sampling sections: Vo et al. 2024, "Automatic data curation for self-supervised
learning" (arXiv 2405.15613); behind the dedup section: DINOv2 (Oquab et al. 2023, arXiv 2304.07193)
and docs/curate.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gramline.config import Strict
from gramline.curate.sources import DEFAULT_PATH_COLUMNS


class IngestConfig(Strict):
    folder_labels: bool = False       # label = first sub-directory under a folder or S3 prefix
    path_columns: list[str] = Field(default_factory=lambda: list(DEFAULT_PATH_COLUMNS))  # tried in order
    label_column: str = "label"
    caption_column: str = "caption"
    workers: int = 0                  # load+validate threads; 0 = one per CPU core
    chunk_size: int = 1024            # items per resumable work chunk


class ImagesConfig(Strict):
    """Validation of every image (gramline.curate.validate)."""

    min_side: int = 32
    max_pixels: int = 50_000_000      # decompression-bomb guard (Pillow's own limit is ~89M/179M)
    max_side: int | None = None       # downscale larger images to this longer side (None = keep)
    jpeg_quality: int = 95            # when a JPEG input must be re-encoded (rotation, CMYK, resize)
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited on this


class DedupConfig(Strict):
    exact: bool = True                # identical decoded pixels
    near: bool = True
    threshold: float = 0.91           # cosine of the copy descriptor (see gramline.curate.dedup)
    decontam_threshold: float = 0.88  # looser, for train-vs-eval (DINOv2, appendix A, also loosens it)
    view_grid: int = 3                # grid x grid sub-views per image for crop robustness
    view_scale: float = 0.9
    backend: Literal["auto", "faiss", "torch"] = "auto"
    # indexed vectors from which "auto"/"faiss" search a streamed, bounded-memory faiss IVF-SQ8 index
    # (exact, all in RAM, below; docs/curate.md "Memory model")
    ivf_min_size: int = Field(default=20_000, ge=1)
    nprobe: int = Field(default=16, ge=1)
    rescore_margin: float = Field(default=0.02, ge=0.0, le=1.0)  # IVF candidates this far below a
                                                                 # threshold are re-scored exactly


class EmbedConfig(Strict):
    """`backbone`: "layout" (colour layout on an 8x8 grid; no network, works offline), "timm:<name>"
    (with `weights` a local file, or `pretrained` to let timm download), or "model:<dir>" (a
    gramline Model artifact)."""

    backbone: str = "layout"
    weights: str | None = None
    pretrained: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)
    img_size: int = 224
    batch_size: int = 64
    threads: int = 0                  # torch threads; 0 = torch's default
    device: str = "auto"              # auto: the GPU when the task has one (bf16), else the CPU; cpu; cuda[:N]
    # reduce: the reduce embeds the train pool left after dedup, on its one task; partitions: every
    # partition embeds its valid images after ingest (duplicates too), spread over the fan-out
    where: Literal["reduce", "partitions"] = "reduce"
    workers: int = Field(default=0, ge=0)  # threads decoding and resizing images for the network; 0 = one per CPU


class ClusterConfig(Strict):
    """Hierarchical k-means with resampling (gramline.curate.cluster). The exact method costs n·k
    distances per Lloyd iteration, and k grows with n (hours at 1M points on a CPU); the knobs below
    trade exactness for speed (docs/curate.md, "Clustering at scale"):

    - `method`: "exact" k-means at every level; "approximate" splits a level's points into groups
      of about `clusters_per_group` clusters with a coarse k-means, runs k-means in each group, then
      gives every point the nearest centroid of its `nprobe` nearest groups (more probes: closer to
      exact); "auto" is approximate at levels with at least `approximate_min_clusters` clusters when
      no CUDA GPU is there (on a GPU exact distances are cheap), exact otherwise.
    - `sample_per_centroid`: Lloyd's iterations run on a random sample of this many points per
      cluster, then every point is assigned once; 0 = on all points. On blob-like data the points
      outside the sample drift to the most-averaged centroids (uneven clusters), hence off by default.
    """

    levels: list[int] = Field(default_factory=list)  # counts lowest→highest; [] = auto from below
    points_per_leaf: int = 20         # auto: level 1 gets n / points_per_leaf clusters
    branching: int = 5                # auto: each level above has 1/branching as many
    n_levels: int = 2
    n_iter: int = 20
    n_init: int = 3                   # k-means runs per fit, the lowest inertia wins
    resampling_steps: list[int] = Field(default_factory=lambda: [1, 5])  # per level (1 = plain); or one value
    sample_sizes: list[int] = Field(default_factory=list)  # per level; [] = half the mean cluster size
    resample_strategy: Literal["closest", "random"] = "closest"
    backend: Literal["auto", "faiss", "torch"] = "auto"  # auto: torch on a CUDA GPU, else faiss
    method: Literal["auto", "exact", "approximate"] = "auto"
    clusters_per_group: int = Field(default=50, ge=1)  # approximate: clusters per coarse group
    nprobe: int = Field(default=4, ge=1)  # approximate: groups searched per point
    sample_per_centroid: int = 0      # 0 = Lloyd on all points; else >= 4 (see above)
    approximate_min_clusters: int = Field(default=1000, ge=1)  # auto: approximate from this many clusters

    @field_validator("sample_per_centroid")
    @classmethod
    def _sample(cls, value: int) -> int:
        if value != 0 and value < 4:
            raise ValueError("must be 0 (all points) or >= 4 points per cluster")
        return value


class BalanceConfig(Strict):
    target: float = 0.8               # <= 1: fraction of the train pool; > 1: number of images
    strategy: Literal["random", "closest"] = "random"


class SplitConfig(Strict):
    eval_fraction: float = 0.1
    eval_max: int | None = None
    stratify: bool = True             # by label, when the collection has labels


class OutputConfig(Strict):
    shards_uri: str | None = None     # s3://bucket/prefix: shards go there, the artifact keeps index+manifest
    max_count: int = 1000
    max_bytes: int = 256 << 20
    report_clusters: int = 8          # thumbnail grids in report.html
    report_thumbs: int = 12
    keep_work: bool = False           # keep the work directory after success (debugging)


class PartitionConfig(Strict):
    """How ingest + validate is cut into partitions (gramline.curate.partition): `items` per
    partition, or else `count` partitions of equal size; a set of tar shards by `shards` per partition. `work_root`: a persistent directory
    (e.g. on a PVC) where partition outputs are kept by plan id, so that a re-run of the pipeline
    skips the partitions already complete; None = only the run's own artifacts."""

    items: int = Field(default=0, ge=0)   # items per partition; 0 = use `count`
    count: int = Field(default=1, ge=1)   # partitions when `items` is 0
    shards: int = Field(default=16, ge=1)  # whole tar shards per partition of a shard set (not read to plan)
    # At most this many partitions: the reduce reads the list of every partition's output from its
    # KFP executor input, one argument that Linux caps at 128 KiB (~450 bytes a partition). With
    # `items`, a collection that would need more partitions gets larger ones (the plan says so).
    max_count: int = Field(default=200, ge=1)
    work_root: str | None = None

    @model_validator(mode="after")
    def _one_way(self) -> PartitionConfig:
        if self.items and self.count != 1:
            raise ValueError(f"set partition.items ({self.items}) or partition.count ({self.count}), not both")
        if self.count > self.max_count:
            raise ValueError(f"partition.count={self.count} is above partition.max_count={self.max_count} (the "
                             "reduce task gets every partition's output in one 128 KiB argument)")
        if self.work_root is not None and ("://" in self.work_root or not self.work_root.strip()):
            raise ValueError(f"partition.work_root={self.work_root!r} must be a local directory path")
        return self


class CurateConfig(Strict):
    preset: str = "custom"
    seed: int = 0
    ingest: IngestConfig = IngestConfig()
    images: ImagesConfig = ImagesConfig()
    dedup: DedupConfig = DedupConfig()
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    balance: BalanceConfig = BalanceConfig()
    split: SplitConfig = SplitConfig()
    output: OutputConfig = OutputConfig()
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _consistent(self) -> CurateConfig:
        if not 0.0 <= self.split.eval_fraction < 1.0:
            raise ValueError(f"split.eval_fraction={self.split.eval_fraction} must be in [0, 1)")
        if self.balance.target <= 0:
            raise ValueError(f"balance.target={self.balance.target} must be > 0 (a fraction <= 1 or a count)")
        for name in ("threshold", "decontam_threshold"):
            value = getattr(self.dedup, name)
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"dedup.{name}={value} is a cosine and must be in [-1, 1]")
        if self.dedup.view_grid < 0 or not 0.5 <= self.dedup.view_scale <= 1.0:
            raise ValueError("dedup.view_grid must be >= 0 and dedup.view_scale in [0.5, 1]")
        v = self.images
        if v.min_side < 1 or v.max_pixels < 1 or (v.max_side is not None and v.max_side < v.min_side):
            raise ValueError("images needs min_side >= 1, max_pixels >= 1 and max_side >= min_side")
        if not 1 <= v.jpeg_quality <= 100:
            raise ValueError(f"images.jpeg_quality={v.jpeg_quality} must be in [1, 100]")
        c = self.cluster
        if min(c.n_levels, c.points_per_leaf, c.branching, c.n_iter, c.n_init) < 1:
            raise ValueError("cluster needs n_levels, points_per_leaf, branching, n_iter and n_init >= 1")
        n_levels = len(c.levels) or c.n_levels
        if any(k < 1 for k in c.levels):
            raise ValueError(f"cluster.levels={c.levels} must all be >= 1")
        if len(c.resampling_steps) not in (1, n_levels) or any(s < 1 for s in c.resampling_steps):
            raise ValueError(f"cluster.resampling_steps={c.resampling_steps} needs one value >= 1 or one per "
                             f"level ({n_levels})")
        if c.sample_sizes and len(c.sample_sizes) != n_levels:
            raise ValueError(f"cluster.sample_sizes={c.sample_sizes} needs one value per level ({n_levels})")
        if self.ingest.chunk_size < 1 or self.ingest.workers < 0:
            raise ValueError("ingest.chunk_size must be >= 1 and ingest.workers >= 0")
        b = self.embed.backbone
        if not (b == "layout" or b.startswith(("timm:", "model:"))):
            raise ValueError(f"embed.backbone={b!r} must be 'layout', 'timm:<name>' or 'model:<dir>'")
        uri = self.output.shards_uri
        if uri is not None and not (uri.startswith("s3://") and len(uri) > len("s3://")):
            raise ValueError(f"output.shards_uri={uri!r} must be an s3://bucket/prefix URI")
        return self

