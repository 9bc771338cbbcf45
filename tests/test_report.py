"""The HTML report (snakemake --report): clean captions (no docutils "System Message"), every figure
category of the run, the workflow description panel, and a real headless Chromium that renders it
without console errors. Under CI=true a missing browser fails the test (CI installs Debian's
chromium, see .ci/run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_workflow import full_run

pytestmark = pytest.mark.slow

DATASET = "MNIST"
CATEGORIES = [
    f"{DATASET} samples and nearest training images",
    f"{DATASET} trajectories",
    f"{DATASET} grids",
    f"{DATASET} machine comparison",
    f"{DATASET} patch-mosaic provenance",
    "Summary",
]
# runs first in the page: every console.error, uncaught error and rejected promise is collected
# and written into the DOM, which Chromium's --dump-dom prints
CONSOLE_HOOK = """<script>
window.__elsErrors = [];
const __elsError = console.error.bind(console);
console.error = (...args) => { window.__elsErrors.push(args.map(String).join(" ")); __elsError(...args); };
window.addEventListener("error", (e) => window.__elsErrors.push("error: " + e.message));
window.addEventListener("unhandledrejection", (e) => window.__elsErrors.push("rejection: " + e.reason));
window.addEventListener("load", () => setTimeout(() => {
  const out = document.createElement("pre");
  out.id = "els-console-errors";
  out.textContent = JSON.stringify(window.__elsErrors);
  document.body.appendChild(out);
}, 1500));
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The report of the full tiny run (every figure kind: trajectories, provenance, comparison)."""
    workdir, _, _ = full_run(tmp_path_factory)
    return workdir / "results" / "report.html"


def test_the_report_has_no_docutils_warnings_and_every_category(report):
    html = report.read_text()
    assert "System Message" not in html
    assert "Duplicate explicit target name" not in html
    for category in CATEGORIES:
        assert f'"{category}"' in html or f"'{category}'" in html, category
    # the workflow description panel (Snakefile `report:`) says what the run is
    assert "This report holds the figures of one run" in html
    # (the panel's HTML sits in a JavaScript string: its line breaks are written as \n)
    assert re.search(r"machines bbels;(\s|\\n)+classes 0, 1;(\s|\\n)+seeds 0, 1;", html)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_report_renders_in_headless_chromium(report, tmp_path):
    browser = chromium()
    if browser is None:
        message = "no chromium on PATH (Debian: apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    page = tmp_path / "report.html"
    html = report.read_text()
    head = html.index("<head>") + len("<head>")
    page.write_text(html[:head] + CONSOLE_HOOK + html[head:])
    common = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--virtual-time-budget=10000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / "shot.png"
    for args in ([f"--screenshot={shot}"], ["--dump-dom"]):
        result = subprocess.run(
            [*common, *args, page.as_uri()], capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stderr[-3000:]
    dom = result.stdout
    errors = re.search(r'<pre id="els-console-errors">(.*?)</pre>', dom, re.S)
    assert errors, "the page never finished loading (no console record in the DOM)"
    assert json.loads(errors[1].replace("&quot;", '"')) == []
    assert "Uncaught" not in result.stderr
    for category in CATEGORIES:
        assert category in dom, category  # the menu the app rendered
    image = np.asarray(Image.open(shot).convert("RGB"))
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 50, "the screenshot is blank"
    # both the menu (left) and the workflow panel (middle) are drawn: ink on the white page in
    # each (the page is mostly white, so a share of the whole screenshot says little)
    ink = (image != image[0, 0]).any(axis=2)
    width = ink.shape[1]
    for name, part in (
        ("menu", ink[:, : width // 3]),
        ("panel", ink[:, width // 3 : 3 * width // 4]),
    ):
        assert part.mean() > 0.01, f"the {name} is empty in the screenshot ({part.mean():.3f})"
