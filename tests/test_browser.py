"""The rendered book in a real browser: build it, serve it on localhost, open every page in
headless Chromium, and check what a reader would see: math typeset by MathJax, every image
loaded, no console errors, and no request leaving localhost. Screenshots are kept as artifacts
in ``$EFFICIENTML_ARTIFACTS`` (default ``_build/test-artifacts``)/screenshots.

Chromium is Debian's ``chromium`` package; ``make test`` installs it when it is missing and it
can (as root, with apt-get). Where it cannot be had, the test is skipped and says why.
"""
from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = "https://github.com/test-owner/efficientml-book"   # for the launch buttons of the test build
websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (requirements.txt pins it)")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed here and could not be installed (make test runs "
                             "`apt-get install -y chromium` when it runs as root with Debian's package sources)")


def pages() -> list[str]:
    """Every page of the book, from _toc.yml, as paths of the built HTML files."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [f"{toc['root']}.html"] + [f"{c['file']}.html" for c in toc["chapters"]]


class Chromium:
    """Headless Chromium driven through the DevTools protocol (one page, one websocket)."""

    def __init__(self, user_data_dir: Path, width: int = 1300, height: int = 1800):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={user_data_dir}",
             f"--window-size={width},{height}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = user_data_dir / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not start (no DevToolsActivePort)")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        import urllib.request
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not any(e.get("method") == event for e in self.events):
            if time.time() > deadline:
                raise TimeoutError(f"no {event} within {timeout} s")
            self.events.append(json.loads(self.ws.recv()))

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        import signal
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole process group: browser, zygote, renderers
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(10)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The book built into a temporary folder and served on localhost: yields the base URL."""
    out = tmp_path_factory.mktemp("book")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_book.py"), "--out", str(out), "--repo-url", REPO],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    html = out / "_build" / "html"
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    chrome = Chromium(profile)
    yield chrome
    chrome.close()
    shutil.rmtree(profile, ignore_errors=True)  # a late-exiting helper process may still write there


CHECKS = """(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  await Promise.all(Array.from(document.images).map(i => i.complete ? null :
      new Promise(r => { i.onload = i.onerror = r; })));
  const math = Array.from(document.querySelectorAll('.math'));
  return {
    title: document.title,
    mathjax: !!(window.MathJax && MathJax.startup),
    math: math.length,
    typeset: math.filter(m => m.querySelector('mjx-container')).length,
    images: Array.from(document.images).map(i => ({src: i.src, width: i.naturalWidth})),
    figures: Array.from(document.querySelectorAll('figure')).map(f =>
        (f.querySelector('figcaption') || {textContent: ''}).textContent.trim()),
    buttons: Array.from(document.querySelectorAll('.article-header-buttons button, .article-header-buttons a'))
        .map(b => (b.getAttribute('title') || b.getAttribute('aria-label') || b.textContent || '').trim()),
    links: Array.from(document.querySelectorAll('.article-header-buttons a')).map(a => a.href),
    copybuttons: document.querySelectorAll('button.copybtn').length,
    code: document.querySelectorAll('div.highlight pre').length,
  };
})()"""


@pytest.mark.parametrize("page", pages())
def test_page_renders_offline(site, browser, page):
    browser.events.clear()
    browser.call("Page.navigate", url=site + page)
    browser.wait_for("Page.loadEventFired")
    r = browser.evaluate(CHECKS)
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
    artifacts = Path(os.environ.get("EFFICIENTML_ARTIFACTS", ROOT / "_build" / "test-artifacts")) / "screenshots"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / (page.replace("/", "_").replace(".html", ".png"))).write_bytes(base64.b64decode(shot["data"]))

    errors = [e["params"] for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"]["args"] for e in browser.events
               if e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error"]
    errors += [e["params"]["entry"] for e in browser.events
               if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    remote = sorted({e["params"]["request"]["url"] for e in browser.events
                     if e.get("method") == "Network.requestWillBeSent"
                     and not e["params"]["request"]["url"].startswith((site, "data:", "blob:", "about:"))})
    assert not errors, f"{page}: console errors {errors}"
    assert not remote, f"{page}: requests leave localhost (the book must read offline): {remote}"
    assert r["mathjax"] or not r["math"], f"{page}: MathJax did not load"
    assert r["typeset"] == r["math"], f"{page}: {r['math'] - r['typeset']} of {r['math']} formulas not typeset"
    broken = [i["src"] for i in r["images"] if i["width"] == 0]
    assert not broken, f"{page}: images that did not load: {broken}"
    if page.startswith("book/0"):  # a chapter: math, figures with captions, code with copy buttons
        assert r["math"] > 0 and r["figures"] and all(r["figures"]), f"{page}: figures without captions {r['figures']}"
        assert r["code"] > 0 and r["copybuttons"] >= r["code"], f"{page}: {r['code']} code cells, {r['copybuttons']} copy buttons"
        assert any("download" in b.lower() for b in r["buttons"]), f"{page}: no download button in {r['buttons']}"
        notebook = page.replace(".html", ".ipynb")
        assert f"https://mybinder.org/v2/gh/test-owner/efficientml-book/main?urlpath=lab/tree/{notebook}" in r["links"]
        assert f"https://colab.research.google.com/github/test-owner/efficientml-book/blob/main/{notebook}" in r["links"]
        assert any(link.endswith(f"_sources/{notebook}") for link in r["links"]), f"{page}: no .ipynb download"


PHONE = """(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const width = document.documentElement.clientWidth;
  const inScrollBox = el => {  // tables, code and wide formulas scroll inside their own box
    for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX;
      if (o === 'auto' || o === 'scroll') return true;
    }
    return false;
  };
  const out = [];
  for (const el of document.querySelectorAll('article *')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= width + 1 || el.closest('mjx-assistive-mml') || inScrollBox(el)) continue;
    out.push(`${el.tagName.toLowerCase()}.${el.className}: ${(el.textContent || '').trim().slice(0, 60)}`);
  }
  return {width, pageWidth: document.documentElement.scrollWidth, out: out.slice(0, 5)};
})()"""


@pytest.mark.parametrize("page", pages())
def test_page_fits_a_phone(site, browser, page):
    """At 420 px nothing sticks out of the page (cut off, or scrolling the whole page sideways):
    what is wider than the screen scrolls inside its own box (tables, code, display formulas)."""
    browser.call("Emulation.setDeviceMetricsOverride", width=420, height=900, deviceScaleFactor=1, mobile=True)
    try:
        browser.events.clear()
        browser.call("Page.navigate", url=site + page)
        browser.wait_for("Page.loadEventFired")
        r = browser.evaluate(PHONE)
    finally:
        browser.call("Emulation.clearDeviceMetricsOverride")
    assert r["width"] == 420
    assert not r["out"] and r["pageWidth"] <= r["width"], f"{page} at 420 px: wider than the screen: {r}"
