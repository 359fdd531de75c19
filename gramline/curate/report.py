"""`report.html`: the curation summary (funnel, quarantine reasons, cluster sizes before and after
balancing) with a thumbnail grid per large top-level cluster."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image


def thumbnail_uri(data: bytes, side: int = 96) -> str:
    """A small JPEG of the encoded image as a data: URI, to inline in the page."""
    with Image.open(io.BytesIO(data)) as opened:
        thumb = opened.convert("RGB")
    thumb.thumbnail((side, side))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _bars(title: str, sizes: Sequence[int]) -> str:
    """An inline bar chart of cluster sizes (largest first)."""
    top = max(sizes) if sizes else 1
    bars = "".join(
        f'<div class="bar" title="{n}" style="height:{max(1, round(80 * n / top))}px"></div>' for n in sizes
    )
    return f"<h3>{html.escape(title)}</h3><div class=\"bars\">{bars}</div>"


def render_html(stats: Mapping[str, Any], grids: Sequence[tuple[str, int, int, Sequence[str]]]) -> str:
    """The summary page: funnel, quarantine reasons, cluster-size charts, one thumbnail grid per
    top cluster. `grids`: (cluster id, size before balancing, size after, thumbnail data URIs)."""
    funnel = stats.get("funnel", {})
    quarantine = stats.get("quarantine", {})
    clusters = stats.get("clusters", {})
    before = clusters.get("top_level_sizes_before", [])
    after = clusters.get("top_level_sizes_after", [])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>gramline curate report</title><style>",
        "body{font-family:sans-serif;margin:2em;color:#222} table{border-collapse:collapse;margin:1em 0}",
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left} .bars{display:flex;align-items:flex-end;",
        "gap:1px;height:84px;border-bottom:1px solid #888} .bar{width:6px;background:#4a7bd0}",
        ".grid{display:flex;flex-wrap:wrap;gap:4px} .grid img{width:96px;height:96px;object-fit:cover}",
        "</style></head><body><h1>Curation report</h1>",
        "<h2>Funnel</h2>", _table(list(funnel.items())),
        "<h2>Quarantine</h2>", _table(list(quarantine.items()) or [("none", 0)]),
        "<h2>Cluster sizes (top level, largest first)</h2>",
        _bars(f"before balancing: {len(before)} clusters", sorted(before, reverse=True)),
        _bars(f"after balancing: {sum(1 for n in after if n)} clusters", sorted(after, reverse=True)),
        _table([(k, v) for k, v in clusters.get("summary_before", {}).items()]),
        _table([(k, v) for k, v in clusters.get("summary_after", {}).items()]),
        "<h2>Largest top-level clusters</h2>",
    ]
    for cluster_id, size_before, size_after, thumbs in grids:
        parts.append(f"<h3>cluster {html.escape(cluster_id)}: {size_before} images, {size_after} kept</h3>")
        parts.append("<div class='grid'>" + "".join(f"<img src='{uri}' alt=''>" for uri in thumbs) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
