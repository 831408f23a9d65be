"""One self-contained HTML page to look at search results: each query image
with its nearest neighbours (thumbnails embedded as data URIs, cosine
similarity, top-1 label, a link to the file), then the largest duplicate
clusters side by side. Opens from disk, mails as one file, needs no server.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Optional, Sequence
from urllib.parse import quote

from pipeline.search.errors import SearchError, check_local_target
from pipeline.search.files import join, write_bytes
from pipeline.search.query import QueryResult, check_k, open_search

THUMB_PX = 168
DEFAULT_SAMPLE = 8
MAX_CLUSTERS = 6
MAX_CLUSTER_MEMBERS = 10


def thumbnail(uri: str, size: int = THUMB_PX) -> Optional[str]:
    """A JPEG data URI of the image, at most size x size; None if unreadable."""
    from PIL import Image, ImageOps

    from transforms.decode import ImageError, read_bytes
    try:
        data = read_bytes(uri, 64 * 1024 * 1024)
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size * 2, size * 2))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size), Image.LANCZOS)
            buffer = io.BytesIO()
            im.save(buffer, "JPEG", quality=82)
    except (ImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def link(uri: str) -> str:
    if uri.startswith("gs://"):
        return "https://storage.cloud.google.com/" + quote(uri[5:])
    if "://" in uri:
        return uri
    return "file://" + quote(uri)


def _score_class(score: float) -> str:
    return "hi" if score >= 0.9 else "mid" if score >= 0.75 else "lo"


class _Page:
    def __init__(self):
        self.thumbs = 0
        self.parts: list[str] = []

    def card(self, uri: str, title: str, label: str, score: Optional[float] = None,
             badge: Optional[str] = None, query: bool = False) -> str:
        src = thumbnail(uri) if uri else None
        if src:
            self.thumbs += 1
            image = f'<img class="thumb" src="{src}" alt="{html.escape(title)}">'
        else:
            image = '<div class="thumb missing">image unavailable</div>'
        chips = []
        if score is not None:
            chips.append(f'<span class="score {_score_class(score)}">{score:.3f}</span>')
        if query:
            chips.append('<span class="badge">query</span>')
        if badge:
            chips.append(f'<span class="badge">{html.escape(badge)}</span>')
        # A backslash is an ordinary character in POSIX names and object keys.
        name = title.rsplit("/", 1)[-1]
        href = f' href="{html.escape(link(uri))}"' if uri else ""
        return (f'<figure class="card{" query" if query else ""}">'
                f'<a{href} title="{html.escape(title)}">{image}</a>'
                f'<figcaption><div class="chips">{"".join(chips)}</div>'
                f'<div class="label">{html.escape(label or "")}</div>'
                f'<div class="name" title="{html.escape(title)}">{html.escape(name)}</div>'
                f"</figcaption></figure>")


CSS = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--muted:#6b7280;--line:#e5e7eb;--accent:#2563eb}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header{padding:20px 28px;background:#111827;color:#f9fafb}
header h1{margin:0 0 4px;font-size:20px}header p{margin:0;color:#cbd5e1;font-size:13px}
main{padding:8px 28px 40px}h2{font-size:16px;margin:26px 0 10px;color:#374151}
.row{display:flex;gap:10px;align-items:stretch;background:var(--card);border:1px solid var(--line);
border-radius:10px;padding:10px;margin:0 0 12px;overflow-x:auto}
.arrow{align-self:center;color:var(--muted);font-size:22px;padding:0 2px}
.card{margin:0;width:176px;flex:0 0 176px;border-radius:8px;overflow:hidden;background:#fafafa;
border:1px solid var(--line)}.card.query{border:2px solid var(--accent);background:#eff6ff}
.card a{display:block;text-decoration:none}
.thumb{display:block;width:100%;height:150px;object-fit:cover;background:#e5e7eb}
.thumb.missing{display:flex;align-items:center;justify-content:center;color:var(--muted);font-size:12px}
figcaption{padding:6px 8px 8px}.chips{display:flex;gap:6px;min-height:20px}
.score{font-weight:600;font-variant-numeric:tabular-nums;padding:1px 7px;border-radius:999px;font-size:12px}
.score.hi{background:#dcfce7;color:#166534}.score.mid{background:#fef9c3;color:#854d0e}
.score.lo{background:#f3f4f6;color:#4b5563}
.badge{padding:1px 7px;border-radius:999px;font-size:12px;background:#e0e7ff;color:#3730a3}
.label{margin-top:4px;font-weight:500;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.name{color:var(--muted);font-size:11px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.error{color:#b91c1c;align-self:center}.note{color:var(--muted)}
"""

# Marks each image's decoded width on the element once the page has loaded,
# so a headless browser's DOM dump shows what actually rendered.
# Marks a page this command wrote: only such a file is replaced without
# --overwrite, so a mistyped --to never clobbers someone's document.
GENERATOR = '<meta name="generator" content="mobilenet-embed gallery">'

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.thumb'), ok = 0;
  imgs.forEach(function (im) { im.setAttribute('data-natural-width', im.naturalWidth);
    if (im.naturalWidth > 0) ok++; });
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-images-decoded', ok);
});
"""


def write_gallery(output: str, to: str, images: Optional[Sequence[str]] = None,
                  sample: Optional[int] = None, k: int = 8,
                  index_dir: Optional[str] = None,
                  duplicates_dir: Optional[str] = None,
                  overwrite: bool = False) -> dict:
    k = check_k(k)
    check_target(to, overwrite)
    if sample is not None and sample < 1:
        raise SearchError(f"--sample must be at least 1, got {sample}")
    searcher = open_search(output, index_dir)
    dataset = searcher.dataset
    if images:
        results: list[QueryResult] = searcher.by_images(list(images), k)
        failed = [r for r in results if r.error]
        if failed:
            # The exit-code table: a query image that cannot be read is exit 2,
            # one line; no page is written that would look like a success.
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise SearchError(f"{failed[0].error}{more}; nothing was written to {to}")
    else:
        results = searcher.by_ids(dataset.sample_ids(sample or DEFAULT_SAMPLE), k)
    clusters = _read_clusters(duplicates_dir or join(output, "duplicates"))
    wanted = {n.image_id for r in results for n in r.neighbors}
    wanted |= {r.query for r in results if not images}
    wanted |= {i for members in clusters for i, _ in members}
    info = dataset.rows(list(wanted), ["uri", "top5_labels", "top5_probabilities"])

    def label(image_id: str) -> str:
        row = info.get(image_id)
        if not row or not row.get("top5_labels"):
            return ""
        return f"{row['top5_labels'][0]} ({row['top5_probabilities'][0]:.0%})"

    page = _Page()
    body = []
    meta = dataset.metadata.model
    index_infos = searcher.index.infos
    body.append(
        f"<header><h1>Nearest neighbours &middot; {html.escape(dataset.dataset.shown)}</h1>"
        f"<p>{searcher.index.ntotal} images &middot; {html.escape(meta.model)} "
        f"({html.escape(meta.model_source)}) &middot; index {html.escape(index_infos['index_key'])}, "
        f"recall@10 {index_infos.get('recall_at_10', 0):.3f} &middot; scores are cosine "
        "similarities</p></header><main>")
    body.append(f"<h2>Queries and their {k} nearest neighbours</h2>")
    for r in results:
        if images:
            query_card = page.card(r.query, r.query, "query image", query=True)
        else:
            row = info.get(r.query, {})
            query_card = page.card(row.get("uri", ""), r.query, label(r.query), query=True)
        if r.error:
            cells = [f'<div class="error">{html.escape(r.error)}</div>']
        else:
            cells = [page.card(info.get(n.image_id, {}).get("uri", n.uri), n.image_id,
                               label(n.image_id), score=n.score) for n in r.neighbors]
        body.append(f'<section class="row">{query_card}<span class="arrow">&rarr;</span>'
                    f'{"".join(cells)}</section>')
    body.append("<h2>Largest duplicate clusters</h2>")
    if not clusters:
        body.append('<p class="note">No duplicate clusters: run <code>mobilenet-embed dedup '
                    "OUT</code> first, or none were found.</p>")
    for members in clusters[:MAX_CLUSTERS]:
        cells = [page.card(info.get(i, {}).get("uri", ""), i, label(i),
                           badge="representative" if rep else None)
                 for i, rep in members[:MAX_CLUSTER_MEMBERS]]
        more = len(members) - MAX_CLUSTER_MEMBERS
        if more > 0:
            cells.append(f'<div class="note" style="align-self:center">+{more} more</div>')
        body.append(f'<section class="row">{"".join(cells)}</section>')
    body.append("</main>")
    document = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
                f"{GENERATOR}"
                f"<title>mobilenet-embed gallery</title><style>{CSS}</style>"
                f"<script>{SCRIPT}</script></head><body>{''.join(body)}</body></html>")
    try:
        write_bytes(to, document.encode("utf-8"))
    except OSError as e:
        raise SearchError(f"cannot write the gallery to {to}: {e.strerror or e}") from None
    return {"queries": len(results), "clusters": min(len(clusters), MAX_CLUSTERS),
            "thumbnails": page.thumbs,
            "failed_queries": sum(1 for r in results if r.error)}


def check_target(to: str, overwrite: bool = False) -> None:
    """Refuse, before any work, a --to that cannot or should not be written:
    a folder, a path under a file, an unwritable folder, or an existing file
    this command did not write (unless overwrite)."""
    import os

    from transforms.uris import is_local
    if not to or to.endswith("/"):
        raise SearchError(f"--to must name an HTML file, got {to!r}")
    if not is_local(to):
        return  # object stores: an object appears whole, nothing to clobber by type
    check_local_target(to, is_file=True)
    if os.path.exists(to) and not overwrite:
        try:
            with open(to, "rb") as f:
                head = f.read(4096)
        except OSError as e:
            raise SearchError(f"--to {to} cannot be read: {e.strerror}") from None
        if GENERATOR.encode() not in head:
            raise SearchError(f"--to {to} exists and is not a gallery page this command "
                              "wrote; pass --overwrite to replace it")


def _read_clusters(folder: str) -> list[list[tuple[str, bool]]]:
    """Clusters of a dedup run, largest first: [(image_id, is_representative)]."""
    from pipeline.search.dedup_beam import read_table
    table = read_table(folder, "clusters")
    groups: dict[int, list[tuple[str, bool]]] = {}
    for cid, image_id, rep in zip(*(table.column(c).to_pylist() for c in (
            "cluster_id", "image_id", "is_representative"))):
        groups.setdefault(cid, []).append((image_id, bool(rep)))
    ordered = sorted(groups.values(), key=lambda m: (-len(m), min(m)))
    return [sorted(m, key=lambda x: (not x[1], x[0])) for m in ordered]
