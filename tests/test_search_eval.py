"""Near-duplicate retrieval on real photos with the real weights: the 200
shared ImageNet photos and 14 transformed copies of each, embedded by the
real job, indexed and searched by the real commands.

Prints recall@1 and @5 per transform, the precision/recall curve of pairs
against the cosine threshold, and dedup's precision and recall at its
default threshold (run with -s to see them; SEARCH_EVAL_REPORT=path.json
also writes them). docs/search.md quotes these figures.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from pipeline.search import SearchIndex
from pipeline.search.dedup import DEFAULT_THRESHOLD
from pipeline.search.dedup_beam import read_table
from pipeline.commands.search import dedup_main, index_main, query_main
from jobs import matrix, read_embeddings, run_job
from paths import SAMPLE, SHARED_MODEL, needs_shared
from search_copies import HARD, MILD, TRANSFORMS, source_and_transform, write_copies

pytestmark = needs_shared
REPORT: dict = {}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("copies")
    photos = sorted(p for p in SAMPLE.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    assert len(photos) == 200
    write_copies(photos, root / "images")
    out = root / "out"
    assert run_job("--input", str(root / "images"), "--output", str(out),
                   "--model_handle", str(SHARED_MODEL)) == 0
    assert index_main([str(out)]) == 0
    table = read_embeddings(out).select(["image_id", "feature_vector"])
    ids = table.column("image_id").to_pylist()
    vectors = matrix(table, "feature_vector").astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    yield root, out, ids, vectors
    path = os.environ.get("SEARCH_EVAL_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(REPORT, f, indent=2)


def test_each_copy_finds_its_original(embedded):
    _, out, ids, vectors = embedded
    assert len(ids) == 200 * (1 + len(TRANSFORMS))
    index = SearchIndex.open(str(out / "index"))
    labels = [source_and_transform(i) for i in ids]
    original_row = {s: r for r, (s, t) in enumerate(labels) if t == "original"}
    copies = [r for r, (_, t) in enumerate(labels) if t != "original"]
    # Search past the copy's siblings (other copies of the same photo are not
    # what is asked for): 15 rows per photo, so 5 + 15 always suffice.
    _, rows = index.search_rows(vectors[copies].astype(np.float32), 5 + 15)
    ranks = defaultdict(list)
    for r, found in zip(copies, rows):
        source, transform = labels[r]
        others = [x for x in found if x >= 0 and (labels[x][0] != source or x == original_row[source])]
        ranks[transform].append(others.index(original_row[source]) + 1
                                if original_row[source] in others else 99)
    table = {t: {"recall_at_1": float(np.mean(np.array(v) <= 1)),
                 "recall_at_5": float(np.mean(np.array(v) <= 5))}
             for t, v in ranks.items()}
    REPORT["retrieval"] = table
    print("\ntransform        recall@1  recall@5")
    for t in TRANSFORMS:
        print(f"{t:16s} {table[t]['recall_at_1']:8.3f}  {table[t]['recall_at_5']:8.3f}"
              f"{'  (hard, reported)' if t in HARD else ''}")
    low = {t: table[t]["recall_at_1"] for t in MILD if table[t]["recall_at_1"] < 0.97}
    assert not low, f"recall@1 under 0.97 for mild transforms: {low}"


def _pairs_truth(ids):
    labels = [source_and_transform(i) for i in ids]
    sources = np.array([s for s, _ in labels])
    transforms = np.array([t for _, t in labels])
    return labels, sources, transforms


def test_precision_recall_against_the_threshold(embedded):
    """The curve that sets DEFAULT_THRESHOLD (exact all-pairs similarities;
    3000 x 3000 is fine for an evaluation, never for the product)."""
    _, _, ids, vectors = embedded
    _, sources, transforms = _pairs_truth(ids)
    sims = vectors @ vectors.T
    iu = np.triu_indices(len(ids), 1)
    s = sims[iu]
    same = sources[iu[0]] == sources[iu[1]]
    # Recall is over (original, copy) pairs, per transform group.
    orig_pair = same & ((transforms[iu[0]] == "original") | (transforms[iu[1]] == "original"))
    other_t = np.where(transforms[iu[0]] == "original", transforms[iu[1]], transforms[iu[0]])
    mild = orig_pair & np.isin(other_t, MILD)
    curve = []
    for t in np.round(np.arange(0.50, 0.99, 0.02), 2):
        hit = s >= t
        curve.append({"threshold": float(t),
                      "precision": float(same[hit].mean()) if hit.any() else 1.0,
                      "recall_mild": float(hit[mild].mean()),
                      "recall_all": float(hit[orig_pair].mean()),
                      "false_pairs": int((hit & ~same).sum())})
    REPORT["curve"] = curve
    nearest_distinct = np.where(sources[:, None] == sources[None, :], -1, sims).max(axis=1)
    copy_sims = s[orig_pair & np.isin(other_t, MILD)]
    REPORT["distributions"] = {
        "closest_distinct_photo_p99": float(np.percentile(nearest_distinct, 99)),
        "closest_distinct_photo_max": float(nearest_distinct.max()),
        "mild_copy_to_original_p10": float(np.percentile(copy_sims, 10)),
        "mild_copy_to_original_p1": float(np.percentile(copy_sims, 1)),
    }
    print("\nthreshold  precision  recall(mild)  recall(all)  false pairs")
    for c in curve:
        print(f"{c['threshold']:9.2f}  {c['precision']:9.4f}  {c['recall_mild']:12.3f}"
              f"  {c['recall_all']:11.3f}  {c['false_pairs']:11d}")
    print(json.dumps(REPORT["distributions"], indent=1))
    at_default = [c for c in curve if abs(c["threshold"] - DEFAULT_THRESHOLD) < 1e-6]
    if at_default:  # the default sits where precision is still >= 0.99
        assert at_default[0]["precision"] >= 0.99


def test_dedup_at_its_default_threshold(embedded, tmp_path):
    _, out, ids, _ = embedded
    assert dedup_main([str(out), "--to", str(tmp_path)]) == 0
    pairs = read_table(str(tmp_path), "pairs").to_pylist()
    labels = dict(zip(ids, (source_and_transform(i) for i in ids)))
    correct = [labels[p["image_id_a"]][0] == labels[p["image_id_b"]][0] for p in pairs]
    precision = float(np.mean(correct)) if pairs else 0.0
    found = {frozenset((p["image_id_a"], p["image_id_b"])) for p in pairs}
    originals = {s: i for i, (s, t) in labels.items() if t == "original"}
    per_transform = defaultdict(list)
    for image_id, (source, transform) in labels.items():
        if transform != "original":
            per_transform[transform].append(frozenset((image_id, originals[source])) in found)
    recall = {t: float(np.mean(v)) for t, v in per_transform.items()}
    mild = float(np.mean([x for t in MILD for x in per_transform[t]]))
    everything = float(np.mean([x for v in per_transform.values() for x in v]))
    REPORT["dedup"] = {"threshold": DEFAULT_THRESHOLD, "pairs": len(pairs),
                       "pair_precision": precision, "recall_mild": mild,
                       "recall_all": everything, "recall_per_transform": recall}
    print(f"\ndedup at {DEFAULT_THRESHOLD}: {len(pairs)} pairs, precision {precision:.4f}, "
          f"recall of (original, copy) pairs: mild {mild:.3f}, all {everything:.3f}")
    print(json.dumps(recall, indent=1))
    assert precision >= 0.98


def test_query_command_finds_the_photo_of_a_new_copy(embedded, capsys):
    root, out, _, _ = embedded
    photos = sorted(p for p in SAMPLE.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))[::40]
    queries = []
    for path in photos:  # a copy the dataset has not seen: 70% size, JPEG q40
        with Image.open(path) as im:
            im = im.convert("RGB")
            im = im.resize((im.width * 7 // 10, im.height * 7 // 10), Image.LANCZOS)
            target = root / f"query_{path.stem}.jpg"
            im.save(target, quality=40)
            queries.append((path.stem, target))
    capsys.readouterr()
    assert query_main([str(out), "--image", *(str(q) for _, q in queries),
                       "--k", "3", "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for (stem, _), answer in zip(queries, answers):
        assert source_and_transform(answer["neighbors"][0]["image_id"])[0] == stem
        assert answer["neighbors"][0]["score"] > 0.8
