#!/usr/bin/env python
"""Check a probekit report directory: files, data, self-containment, and a real browser render.

    python scripts/check_report.py REPORT_DIR [--require-browser] [--no-browser]
                                              [--chromium PATH] [--wait SECONDS] [--max-mb MB]

Static checks need only the standard library. The browser check drives headless Chromium over
the Chrome DevTools Protocol with the `websockets` package (pip install websockets); it fails on
any page exception, console error, log error, network request that is not file:/data:/blob:/
about:, or chart container left without an <svg>/<canvas>, and it uses the run selector once
(hide a run, show it again) under the same watch. Without Chromium (or websockets) the
browser check is reported as skipped, unless --require-browser (CI) makes that an error.
Exit status: 0 all good, 1 problems found (one line each on stdout).
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

URL_RE = re.compile(r"https?://[^\s\"'<>)]+|//[a-z0-9.-]+\.[a-z]{2,}/", re.I)
ALLOWED_SCHEMES = ("file:", "data:", "blob:", "about:")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio",
]  # fmt: skip


class _Scripts(HTMLParser):
    """Collect <script> tags (attributes + text) and other remote-resource attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str], str]] = []
        self.remote: list[str] = []
        self._cur: dict[str, str] | None = None
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self._cur, self._buf = a, []
        # Remote stylesheets, images, iframes would also make the page depend on the network.
        for key in ("src", "href"):
            val = a.get(key, "")
            if tag in ("link", "img", "iframe", "embed", "object", "source") and (
                val.lower().startswith(("http:", "https:", "//"))
            ):
                self.remote.append(f"<{tag} {key}={val}>")

    def handle_data(self, data: str) -> None:
        if self._cur is not None:
            self._buf.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._cur is not None:
            self.scripts.append((self._cur, "".join(self._buf)))
            self._cur = None


def static_checks(d: Path) -> list[str]:
    problems: list[str] = []
    index, rep_path = d / "index.html", d / "report.json"
    for f in (index, rep_path):
        if not f.is_file():
            problems.append(f"missing file: {f}")
    if problems:
        return problems
    try:
        rep = json.loads(rep_path.read_text())
    except json.JSONDecodeError as e:
        return [f"report.json is not JSON: {e}"]
    charts = rep.get("charts", [])
    if not charts:
        problems.append("report.json lists no charts")
    for c in charts:
        name = c.get("name", "?")
        if not c.get("n_rows", 0) > 0:
            problems.append(f"chart {name}: no data rows")
        png = c.get("png")
        if png and not ((d / png).is_file() and (d / png).stat().st_size > 0):
            problems.append(f"chart {name}: missing PNG {png}")
    page = index.read_text(encoding="utf-8")
    p = _Scripts()
    p.feed(page)
    for attrs, text in p.scripts:
        src = attrs.get("src")
        if src is not None:
            if src.lower().startswith(("http:", "https:", "//")):
                problems.append(f"remote script source: {src}")
            elif not src.lower().startswith(("data:", "blob:")) and not (d / src).is_file():
                problems.append(f"script source not in the report directory: {src}")
        # The inlined vega bundle holds a few non-fetched URL strings (XML namespaces, docs
        # links); the browser check catches real requests. Every other script must be clean.
        if attrs.get("id") != "vega-bundle":
            for m in URL_RE.findall(text):
                problems.append(f"URL in a script tag: {m}")
    problems += [f"remote resource: {r}" for r in p.remote]
    n_div = page.count('class="probekit-chart"')
    if n_div != len(charts):
        problems.append(f"page has {n_div} chart containers, report.json lists {len(charts)}")
    if page.count('id="vega-bundle"') > 1:
        problems.append("the vega bundle is inlined more than once")
    return problems


def report_bytes(d: Path) -> int:
    """Bytes of the page and everything it links beside it (PNGs), not report.json."""
    return sum(f.stat().st_size for f in d.iterdir() if f.suffix in (".html", ".png"))


def find_chromium(explicit: str | None) -> str | None:
    if explicit:
        return explicit if Path(explicit).exists() else None
    for c in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = c if Path(c).is_absolute() and Path(c).exists() else shutil.which(c)
        if path:
            return path
    return None


class _CDP:
    """Minimal Chrome DevTools Protocol client over one browser websocket (flat sessions)."""

    def __init__(self, ws) -> None:  # noqa: ANN001 (websockets ClientConnection)
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 30,
    ) -> dict:
        self.next_id += 1
        msg: dict = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            m = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error'].get('message')}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def pump(self, seconds: float) -> None:
        """Collect events for `seconds`."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                break

    def wait_for(self, method: str, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while not any(e.get("method") == method for e in self.events):
            left = end - time.monotonic()
            if left <= 0:
                return False
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                return False
        return True


def _devtools_url(proc: subprocess.Popen, timeout: float) -> str:
    # Chromium prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr;
    # read it on a thread so a silent browser cannot hang us.
    q: queue.Queue[str] = queue.Queue()

    def reader() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            q.put(line)

    threading.Thread(target=reader, daemon=True).start()
    end = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < end:
        try:
            line = q.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line.strip())
        m = re.search(r"DevTools listening on (ws://\S+)", line)
        if m:
            return m.group(1)
    tail = " | ".join(seen[-3:])
    raise RuntimeError(f"chromium gave no DevTools URL within {timeout:.0f}s ({tail})")


def _describe_exception(p: dict) -> str:
    d = p.get("exceptionDetails", {})
    exc = d.get("exception", {})
    return exc.get("description") or d.get("text", "exception")


def browser_checks(index: Path, chromium: str, wait: float) -> list[str]:
    problems: list[str] = []
    profile = tempfile.mkdtemp(prefix="probekit-chromium-")
    cmd = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        from websockets.sync.client import connect

        with connect(_devtools_url(proc, 30), max_size=None, open_timeout=20) as ws:
            problems += _drive(_CDP(ws), index, wait)
    except Exception as e:  # a broken browser session is a problem to report, not a traceback
        problems.append(f"browser check failed: {type(e).__name__}: {e}"[:300])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return problems


def _drive(cdp: _CDP, index: Path, wait: float) -> list[str]:
    problems: list[str] = []
    target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    sess = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        cdp.send(f"{domain}.enable", session=sess)
    cdp.events.clear()  # only what the report page does counts
    cdp.send("Page.navigate", {"url": index.resolve().as_uri()}, session=sess)
    if not cdp.wait_for("Page.loadEventFired", 60):
        problems.append("browser: page did not finish loading within 60 s")
    cdp.pump(wait)  # let vega-embed render (it is asynchronous)
    # Use the run selector once (hide the first run, show it again): the charts' `shown`
    # parameter must update every view without an error.
    toggle = (
        "(function(){var b=document.querySelector('#run-select input');"
        "if(!b)return 0;b.click();setTimeout(function(){b.click();},300);return 1;})()"
    )
    cdp.send("Runtime.evaluate", {"expression": toggle, "returnByValue": True}, session=sess)
    cdp.pump(min(wait, 1.5))
    for e in cdp.events:
        m, p = e.get("method"), e.get("params", {})
        if e.get("sessionId") not in (None, sess):
            continue
        if m == "Runtime.exceptionThrown":
            problems.append(f"browser exception: {_describe_exception(p).splitlines()[0]}"[:300])
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            text = " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
            )
            problems.append(f"browser console error: {text}"[:300])
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            ent = p["entry"]
            problems.append(f"browser log error: {ent.get('text')} {ent.get('url', '')}"[:300])
        elif m == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if not url.lower().startswith(ALLOWED_SCHEMES):
                problems.append(f"browser network request: {url}"[:300])
    expr = (
        "JSON.stringify({n: document.querySelectorAll('.probekit-chart').length,"
        " empty: Array.from(document.querySelectorAll('.probekit-chart'))"
        ".filter(e => !e.querySelector('svg, canvas')).map(e => e.id)})"
    )
    res = cdp.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=sess)
    info = json.loads(res.get("result", {}).get("value", "{}"))
    if not info.get("n"):
        problems.append("browser: no chart containers on the page")
    problems += [
        f"browser: chart container {c} has no <svg>/<canvas>" for c in info.get("empty", [])
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report_dir", type=Path)
    ap.add_argument(
        "--require-browser",
        action="store_true",
        help="fail when chromium or websockets is missing (CI)",
    )
    ap.add_argument("--no-browser", action="store_true", help="static checks only")
    ap.add_argument("--chromium", help="browser binary (default: /usr/bin/chromium or PATH)")
    ap.add_argument("--wait", type=float, default=2.0, help="seconds to wait after load")
    ap.add_argument(
        "--max-mb",
        type=float,
        help="fail when index.html plus the PNGs exceed this many MB (10^6 bytes)",
    )
    a = ap.parse_args(argv)
    d: Path = a.report_dir
    if not d.is_dir():
        print(f"error: report directory not found: {d}")
        return 1
    problems = static_checks(d)
    size = report_bytes(d)
    if a.max_mb is not None and size > a.max_mb * 1e6:
        problems.append(f"page and PNGs weigh {size / 1e6:.2f} MB, over --max-mb {a.max_mb:g}")
    if not a.no_browser and not problems:
        chromium = find_chromium(a.chromium)
        try:
            import websockets.sync.client  # noqa: F401
        except ImportError:
            missing = "python package websockets (pip install websockets)"
        else:
            missing = None if chromium else "chromium (apt-get install chromium)"
        if missing:
            msg = f"browser check skipped: no {missing}"
            if a.require_browser:
                problems.append(msg.replace("skipped", "required"))
            else:
                print(msg)
        else:
            problems += browser_checks(d / "index.html", chromium, a.wait)
    for p in problems:
        print(p)
    if not problems:
        print(f"ok: {d} ({size / 1e6:.2f} MB page and PNGs)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
