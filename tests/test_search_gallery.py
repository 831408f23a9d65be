"""The gallery page, opened in a real headless Chromium: every thumbnail
decodes (naturalWidth > 0 after load) and the screenshot is not blank.

Chromium comes from Debian's `chromium` package (apt-get install -y
chromium); the binary is found as $CHROMIUM, else `chromium`,
`chromium-browser`, `google-chrome` on PATH. Without one the test skips.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.commands.search import dedup_main, gallery_main, index_main
from corpus import file_permissions_enforced
from jobs import run_job, sample_photos


def chromium() -> str | None:
    candidates = [os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    for name in filter(None, candidates):
        found = shutil.which(name)
        if found:
            return found
    return None


needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="no Chromium binary ($CHROMIUM, chromium, chromium-browser, "
    "google-chrome); install Debian's package: apt-get install -y chromium")

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "horse.png", "camera.png"]


def browser(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(sample_photos() / name, photos / name)
    shutil.copy(sample_photos() / "coffee.png", photos / "coffee_again.png")
    out = root / "out"
    assert run_job("--input", str(photos), "--output", str(out), "--model_source", "random") == 0
    assert index_main([str(out)]) == 0
    assert dedup_main([str(out), "--threshold", "0.9999"]) == 0
    html_path = root / "page.html"
    assert gallery_main([str(out), "--sample", "3", "--k", "4", "--to", str(html_path)]) == 0
    return root, html_path


def test_the_page_is_self_contained(page):
    _, html_path = page
    text = html_path.read_text()
    sources = re.findall(r'<img class="thumb" src="([^"]+)"', text)
    # 3 queries x (1 + 4 neighbours), and the coffee cluster of two.
    assert len(sources) == 3 * 5 + 2
    assert all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "representative" in text


@needs_chromium
def test_chromium_decodes_every_thumbnail(page):
    _, html_path = page
    result = browser("--dump-dom", html_path.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == 17 and min(widths) > 0
    assert 'data-images-decoded="17"' in dom


@needs_chromium
def test_chromium_screenshot_is_not_blank(page):
    root, html_path = page
    shot = root / "page.png"
    result = browser("--window-size=1280,1000", f"--screenshot={shot}", html_path.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1000, 1280)
    assert pixels.std() > 30  # photos, not an empty page
    distinct = len(np.unique(pixels.reshape(-1, 3)[::7].astype(np.uint8), axis=0))
    assert distinct > 2000


# --- where the page goes: never a silent clobber, always one line ----------------

def test_a_second_gallery_replaces_its_own_page(page, capsys):
    root, html_path = page
    before = html_path.read_text()
    assert gallery_main([str(root / "out"), "--sample", "2", "--k", "3", "--to", str(html_path)]) == 0
    after = html_path.read_text()
    assert after != before and len(re.findall(r'<img class="thumb"', after)) == 2 * 4 + 2


@pytest.mark.parametrize("case", ["foreign_file", "folder", "under_a_file", "read_only_folder"])
def test_a_bad_target_is_one_line_and_nothing_is_touched(page, tmp_path, capsys, case):
    root, _ = page
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>my own notes</html>")
    locked = tmp_path / "locked"
    locked.mkdir()
    to = {"foreign_file": foreign, "folder": tmp_path,
          "under_a_file": foreign / "page.html", "read_only_folder": locked / "page.html"}[case]
    capsys.readouterr()
    if case == "read_only_folder":
        locked.chmod(0o500)
        with file_permissions_enforced() as enforced:
            if not enforced:
                pytest.skip("cannot drop root's permission override here")
            code = gallery_main([str(root / "out"), "--sample", "1", "--to", str(to)])
        locked.chmod(0o700)
    else:
        code = gallery_main([str(root / "out"), "--sample", "1", "--to", str(to)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(to) in err and "\n" not in err, err
    assert foreign.read_text() == "<html>my own notes</html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "notes.html"]


def test_overwrite_replaces_a_foreign_file(page, tmp_path):
    root, _ = page
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>my own notes</html>")
    assert gallery_main([str(root / "out"), "--sample", "1", "--k", "2", "--to", str(foreign),
                         "--overwrite"]) == 0
    assert 'name="generator" content="mobilenet-embed gallery"' in foreign.read_text()


def test_short_names_keep_backslashes(page):
    from pipeline.search.gallery import _Page
    card = _Page().card("", "shop\\2024/red\\shoe.jpg", "label")
    assert '<div class="name" title="shop\\2024/red\\shoe.jpg">red\\shoe.jpg</div>' in card


def test_a_query_image_that_cannot_be_read_is_exit_2_in_one_line(page, tmp_path, capsys):
    # issue 25 (7): the README's exit-code table says 2, not a page showing
    # the error inside it.
    root, _ = page
    to = tmp_path / "page.html"
    capsys.readouterr()
    code = gallery_main([str(root / "out"), "--image", "/nonexistent.jpg", "--to", str(to)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "/nonexistent.jpg" in err and "\n" not in err, err
    assert not to.exists()


def test_the_stale_notice_says_what_to_do_when_rows_were_removed(page, tmp_path):
    # Minor (issue 25): "run index to add them" was said for removed rows too.
    from pipeline.search import open_search
    root, _ = page
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    parts = sorted((out / "embeddings").glob("*.parquet"))
    assert parts
    import pyarrow.parquet as pq
    table = pq.read_table(parts[0])
    pq.write_table(table.slice(0, table.num_rows - 1), parts[0])
    stale = open_search(str(out)).stale
    assert stale and "removed" in stale and "add them" not in stale, stale
