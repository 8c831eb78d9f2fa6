"""Open a page in headless Chromium (Debian's package) through the DevTools protocol, as a reader
would, and say what went wrong: used by tests/runtime/test_site.py.

``Chromium()`` starts ``chromium --headless --remote-debugging-port=0`` and talks to one tab over
its WebSocket (the registry package ``websocket-client``). ``open(url, allowed=base)`` loads a page,
waits for MathJax to finish typesetting, and reports:

- every console error, uncaught exception and browser log error (a 404 is one);
- every request to an address that does not start with ``allowed`` (the site must need no network);
- every equation MathJax could not typeset (its ``merror`` / ``data-mjx-error`` nodes), and any
  ``arithmatex`` element left without a typeset ``mjx-container``;
- every image that did not load (``naturalWidth == 0``).

``serve(folder)`` serves a built site on 127.0.0.1 (a free port) for the length of a ``with``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHECK = r"""
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const math = [...document.querySelectorAll('.arithmatex')];
  const untypeset = math.filter(e => !e.querySelector('mjx-container'));
  const errors = [...document.querySelectorAll('[data-mjx-error], [data-mml-node="merror"], mjx-merror')];
  const images = [...document.querySelectorAll('article img')];
  for (const img of images) { if (!img.complete) { await new Promise(r => { img.onload = img.onerror = r; }); } }
  return {
    equations: math.length - untypeset.length,
    untypeset: untypeset.slice(0, 5).map(e => e.textContent.slice(0, 80)),
    math_errors: errors.slice(0, 5).map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 120)),
    images: images.length,
    broken_images: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    mathjax: !!(window.MathJax && MathJax.version),
  };
})()
"""


@dataclass
class Report:
    url: str
    equations: int = 0
    images: int = 0
    problems: list[str] = field(default_factory=list)


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no chromium on PATH: apt-get install chromium")


class Chromium:
    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 30):
        self.width, self.height, self.timeout = width, height, timeout

    def __enter__(self) -> "Chromium":
        import websocket  # websocket-client, from the [docs] extra

        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)  # a renderer still exiting may write to it
        self.process = subprocess.Popen(
            [chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-default-apps", "--mute-audio", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile.name}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = self._devtools_port()
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=self.timeout,
                                              suppress_origin=True)
        self.next_id, self.events = 0, []
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self.call(method)
        self.call("Network.setCacheDisabled", cacheDisabled=True)
        return self

    def _devtools_port(self) -> int:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            line = self.process.stderr.readline()
            if "DevTools listening on ws://" in line:
                threading.Thread(target=self.process.stderr.read, daemon=True).start()   # keep draining
                return int(line.split("ws://127.0.0.1:")[1].split("/")[0])
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError("chromium did not open its DevTools port")

    def __exit__(self, *exc):
        with contextlib.suppress(Exception):
            self.ws.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.profile.cleanup()

    def call(self, method: str, **params):
        """Send one DevTools command and return its result; events that arrive meanwhile are kept."""
        self.next_id += 1
        mine = self.next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == mine:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, method: str) -> dict:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            for i, e in enumerate(self.events):
                if e["method"] == method:
                    return self.events.pop(i)
            message = json.loads(self.ws.recv())
            if "method" in message:
                self.events.append(message)
        raise TimeoutError(f"no {method} within {self.timeout} s")

    def open(self, url: str, allowed: str) -> Report:
        report = Report(url)
        self.events = []
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        result = self.call("Runtime.evaluate", expression=CHECK, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            report.problems.append(f"the check itself failed: {result['exceptionDetails']}")
            return report
        found = result["result"]["value"]
        time.sleep(0.2)                                   # late console messages and requests
        self.call("Runtime.evaluate", expression="0")     # collects the events that came meanwhile
        report.equations, report.images = found["equations"], found["images"]
        if found["equations"] and not found["mathjax"]:
            report.problems.append("MathJax did not load")
        report.problems += [f"equation not typeset: {t!r}" for t in found["untypeset"]]
        report.problems += [f"math rendering error: {t!r}" for t in found["math_errors"]]
        report.problems += [f"image did not load: {src}" for src in found["broken_images"]]
        for e in self.events:
            method, p = e["method"], e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                report.problems.append(f"console error: {text[:200]}")
            elif method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                report.problems.append(f"uncaught exception: {d.get('exception', {}).get('description', d.get('text'))}"[:300])
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                report.problems.append(f"browser error: {p['entry']['text'][:200]} {p['entry'].get('url', '')}")
            elif method == "Network.requestWillBeSent":
                target = p["request"]["url"]
                if not target.startswith((allowed, "data:", "blob:", "about:")):
                    report.problems.append(f"request off this site: {target}")
        return report

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """A PNG of the page now open: the whole page, or the first screen."""
        params = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": self.width, "height": size["height"], "scale": 1})
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.contextmanager
def serve(folder: Path):
    """``http://127.0.0.1:PORT`` serving ``folder`` while the block runs."""
    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
