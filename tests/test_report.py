"""report.html: written by every build, self-contained, and what a real browser shows of it
(headless Chromium, as the CI machine installs it): the layers, each target's choices, the
verification table and one error plot per verified layer and target, the footprint, and every
source with its line numbers."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from gncodegen.cli import main

from conftest import EXAMPLES

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH")


def _browser(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    result = CliRunner().invoke(main, ["build", str(EXAMPLES / "multi_layer.yaml"), "-o",
                                       str(out), "--target", "c,cortex-m4"])
    assert result.exit_code == 0, result.output
    return out


def test_the_report_is_listed_and_fetches_nothing(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert "report.html" in manifest["files"]
    text = (built / "report.html").read_text()
    assert not re.search(r"""(src|href)=["'](https?:)?//""", text)   # no network
    assert "<script" not in text


@needs_browser
def test_a_browser_shows_every_part(built):
    dom = _browser("--dump-dom", (built / "report.html").as_uri())
    assert dom.returncode == 0, dom.stderr
    page = dom.stdout
    manifest = json.loads((built / "manifest.json").read_text())
    layers = manifest["layers"]
    assert "<title>gncodegen report: multi_layer.yaml</title>" in page
    for name in layers:
        assert f'id="layer-{name}"' in page
    # each target's choices, as `gncodegen show` gives them
    assert "<h3>c: " in page and "<h3>cortex-m4: " in page
    assert "runs kernel" in page or "rows kernel" in page
    # the verification table: a row per report, all passing
    reports = manifest["verification"]
    table = page[page.index('<table class="verification">'):]
    table = table[:table.index("</table>")]
    assert table.count('class="pass"') == len(reports) and "FAIL" not in table
    # one plot per report, a bar per case, the tolerance line in each
    plots = re.findall(r'<svg class="errors".*?</svg>', page, re.S)
    assert len(plots) == len(reports)
    for svg, report in zip(plots, reports):
        assert svg.count('<rect class="bar') == len(report["cases"])
        assert 'class="tolerance"' in svg and "over" not in svg
    # the footprint of each layer on the core
    foot = page[page.index('<table class="footprint">'):]
    assert all(f"<td>{name}</td><td>cortex-m4</td>" in foot for name in layers)
    # every source with its line numbers
    for name in manifest["files"]:
        if name == "report.html":
            continue
        assert f'id="file-{name}"' in page, name
    c_name = f"{layers[0]}.c"
    lines = (built / c_name).read_text().count("\n")
    block = page[page.index(f'id="file-{c_name}"'):]
    block = block[:block.index("</details>")]
    numbers = re.findall(r'<span class="ln">(\d+)</span>', block)
    assert numbers == [str(i) for i in range(1, lines + 1)]
    first = (built / c_name).read_text().splitlines()[0]
    assert html.escape(first, quote=False) in block


@needs_browser
def test_the_browser_draws_it(built, tmp_path):
    shot = tmp_path / "report.png"
    done = _browser(f"--screenshot={shot}", "--window-size=1200,1600",
                    (built / "report.html").as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000   # a page, not a blank


def test_a_build_without_verification_says_so(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(EXAMPLES / "matlab_gn.yaml"), "-o",
                                       str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "Not verified (built with --no-verify)." in (out / "report.html").read_text()
