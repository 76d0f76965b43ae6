"""Drive a real headless Chromium through its DevTools protocol: open a page, click, screenshot.

Used to check the generated viewer and dashboard pages as a person sees them (the tests), and to turn
a page into a PNG. Needs a Chromium binary (Debian's ``chromium``; never downloaded here) and the
``websocket-client`` package. Every JavaScript exception, console error and alert/confirm dialog the
page raises is recorded in :attr:`HeadlessChromium.errors` / :attr:`HeadlessChromium.dialogs`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["find_chromium", "HeadlessChromium", "BrowserError"]

# Flags known to run on machines with a closed network: without the background-networking ones
# Chromium keeps trying (and failing) to reach Google's services.
_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
    "--remote-allow-origins=*", "--allow-file-access-from-files",
]


def _content_type(url: str) -> str:
    path = url.split("?")[0]
    for ending, kind in ((".js", "text/javascript"), (".mjs", "text/javascript"), (".css", "text/css"),
                         (".json", "application/json"), (".html", "text/html")):
        if path.endswith(ending):
            return kind
    return "application/octet-stream"


class BrowserError(RuntimeError):
    """Chromium could not be started or a DevTools command failed."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary: ``$CHROMIUM`` if set, else the first one on PATH, else None."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class HeadlessChromium:
    """One headless Chromium with one page; use as a context manager.

    >>> with HeadlessChromium(width=1200, height=800) as browser:
    ...     browser.open("graph.html")
    ...     browser.screenshot("graph.png")
    """

    def __init__(self, width: int = 1280, height: int = 860, binary: str | None = None,
                 timeout: float = 60.0) -> None:
        self.width, self.height, self.timeout = width, height, timeout
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise BrowserError("No Chromium found on PATH; install Debian's `chromium` package or set $CHROMIUM.")
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._next_id = 0
        self._process: subprocess.Popen | None = None
        self._profile: Path | None = None
        self._socket = None
        self._routes: dict[str, Path | bytes] = {}
        self.requests: list[str] = []  # every URL the page asked for while routes were set

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> HeadlessChromium:
        try:
            import websocket  # websocket-client
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise BrowserError("Driving Chromium needs `pip install websocket-client`.") from error
        self._profile = profile = Path(tempfile.mkdtemp(prefix="featcircuits-chromium-"))
        self._process = subprocess.Popen(
            [self.binary, *_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port = self._wait_for_port(profile / "DevToolsActivePort")
        page_url = self._page_websocket(port)
        self._socket = websocket.create_connection(page_url, timeout=self.timeout, suppress_origin=True)
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.resize(self.width, self.height)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._profile is not None:
            # Chromium's helper processes can still be writing the profile for a moment after the main
            # process exits: retry briefly, then leave whatever remains in the temp dir rather than fail.
            for _ in range(20):
                try:
                    shutil.rmtree(self._profile)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def _wait_for_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrowserError(f"{self.binary} exited with status {self._process.returncode} at start.")
            if port_file.exists():
                first_line = port_file.read_text().split("\n", 1)[0].strip()
                if first_line.isdigit():
                    return int(first_line)
            time.sleep(0.05)
        raise BrowserError(f"{self.binary} did not open its DevTools port within {self.timeout} s.")

    def _page_websocket(self, port: int) -> str:
        from urllib.request import urlopen

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as response:
                targets = json.load(response)
            pages = [target for target in targets if target.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.05)
        raise BrowserError("Chromium opened no page target.")

    # -- protocol -------------------------------------------------------------------------------

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result; events that arrive meanwhile are recorded."""
        self._next_id += 1
        message_id = self._next_id
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise BrowserError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            self._record(message)

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method is None:
            return
        self._events.append(message)
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text", "")
            self.errors.append(f"exception: {description}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(arg.get("value", arg.get("description", "")))
                                                      for arg in params.get("args", [])))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.errors.append(f"log: {params['entry'].get('text', '')}")
        elif method == "Fetch.requestPaused":
            self._answer_request(params)
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(params.get("message", ""))
            # Dismiss it, or the page would block every later command.
            self._next_id += 1
            self._socket.send(json.dumps({"id": self._next_id, "method": "Page.handleJavaScriptDialog",
                                          "params": {"accept": False}}))

    def route(self, routes: dict[str, str | os.PathLike | bytes]) -> None:
        """Answer the page's requests for these URLs (exact, or a prefix ending in ``/``) with a local file or
        bytes, so that a page written to fetch scripts from the web runs with no network. Every other
        request goes out as usual (and fails where the machine has no network)."""
        self._routes = {url: value if isinstance(value, bytes) else Path(value) for url, value in routes.items()}
        self.send("Fetch.enable", patterns=[{"urlPattern": "*", "requestStage": "Request"}])

    def _answer_request(self, params: dict[str, Any]) -> None:
        url = params.get("request", {}).get("url", "")
        self.requests.append(url)
        body = self._routes.get(url)
        if body is None:
            prefix = next((p for p in self._routes if p.endswith("/") and url.startswith(p)), None)
            if prefix is not None and isinstance(self._routes[prefix], Path):
                body = self._routes[prefix] / url[len(prefix):].split("?")[0]  # type: ignore[operator]
        self._next_id += 1
        if body is None:
            self._socket.send(json.dumps({"id": self._next_id, "method": "Fetch.continueRequest",
                                          "params": {"requestId": params["requestId"]}}))
            return
        content = body if isinstance(body, bytes) else body.read_bytes() if body.is_file() else None
        answer = {"requestId": params["requestId"], "responseCode": 200 if content is not None else 404,
                  "responseHeaders": [{"name": "Content-Type", "value": _content_type(url)},
                                      {"name": "Access-Control-Allow-Origin", "value": "*"}],
                  "body": base64.b64encode(content or b"").decode()}
        self._socket.send(json.dumps({"id": self._next_id, "method": "Fetch.fulfillRequest", "params": answer}))

    def _wait_for_event(self, method: str) -> None:
        if any(event["method"] == method for event in self._events):
            return
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv())
            self._record(message)
            if message.get("method") == method:
                return
        raise BrowserError(f"Timed out waiting for {method}.")

    # -- what a person does ---------------------------------------------------------------------

    def open(self, path_or_url: str | os.PathLike, ready_expression: str = "window.__fcReady === true") -> None:
        """Load a page and wait for its load event and for ``ready_expression`` to be true."""
        url = str(path_or_url)
        if "://" not in url:
            url = Path(url).resolve().as_uri()
        self._events.clear()
        self.send("Page.navigate", url=url)
        self._wait_for_event("Page.loadEventFired")
        deadline = time.monotonic() + self.timeout
        while not self.evaluate(f"Boolean({ready_expression})"):
            if time.monotonic() > deadline:
                raise BrowserError(f"The page never became ready ({ready_expression}); errors: {self.errors}")
            time.sleep(0.05)

    def resize(self, width: int, height: int) -> None:
        """Change the viewport size (CSS pixels)."""
        self.width, self.height = int(width), int(height)
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page (JSON-serialisable results only)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression!r} raised {details.get('exception', {}).get('description', details)}")
        return result.get("result", {}).get("value")

    def _center_of(self, selector: str) -> tuple[float, float]:
        box = self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); if (!el) return null;"
            " el.scrollIntoView({block: 'center', inline: 'center'});"
            " const r = el.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if box is None:
            raise BrowserError(f"No element matches {selector!r}.")
        return float(box[0]), float(box[1])

    def hover(self, selector: str) -> None:
        """Move the mouse onto the centre of the first element matching ``selector``."""
        x, y = self._center_of(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def click(self, selector: str, shift: bool = False) -> None:
        """A real left click (move, press, release) at the centre of the first matching element, with the
        shift key held when ``shift``."""
        x, y = self._center_of(selector)
        modifiers = 8 if shift else 0  # the DevTools protocol's bit for shift
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, modifiers=modifiers)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1,
                      modifiers=modifiers)

    def screenshot(self, path: str | os.PathLike, full_page: bool = True) -> Path:
        """Write a PNG of the page (the whole scrollable page when ``full_page``)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": max(size[0], 1), "height": max(size[1], 1), "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
