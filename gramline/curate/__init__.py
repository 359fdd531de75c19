"""Image-collection curation: ingest, validate, deduplicate, split, embed, cluster-balance, shard.

The entry point is `gramline.curate.pipeline.curate`; the curate stage
(`python -m gramline.stages.curate`) is its command line. One module per step; the method follows
Vo et al. 2024, "Automatic data curation for self-supervised learning" (arXiv 2405.15613), and the
deduplication and decontamination of DINOv2 (Oquab et al. 2023, arXiv 2304.07193).
"""
