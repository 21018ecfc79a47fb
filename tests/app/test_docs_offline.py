"""/docs and /redoc work offline: every asset comes from the service itself.

Two levels: the HTML's every ``src``/``href`` is same-origin (parsed, no browser), and a headless
Chromium loads both pages from a real uvicorn server while every request to another host is
blocked and recorded; the test fails if any was attempted and checks the operations rendered.

Chromium is a system package (Debian: ``apt-get update && apt-get install -y chromium``) driven by
the ``playwright`` Python package (the ``dev`` extra). When either is missing the test fails and
says how to install it: a docs page that silently stops working offline must not pass as skipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

CHROMIUM = os.environ.get("MMFUSION_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
OPERATIONS = ("/v1/classify", "/v1/embed", "/v1/search")
DOC_PAGES = ("/docs", "/redoc")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "spec-url", "data", "action", "poster") and value is not None:
                self.urls.append((tag, name, value))


def referenced_urls(html: str) -> list[tuple[str, str, str]]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


@pytest.fixture(scope="module")
def docs_app(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, TestClient]]:
    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(bundle=tiny_bundle, index_path=tmp_path_factory.mktemp("docs") / "index",
                        intra_op_threads=1, decode_threads=1)
    app = create_app(settings)
    with TestClient(app) as c:
        yield app, c


@pytest.mark.parametrize("page", [*DOC_PAGES, "/docs/oauth2-redirect"])
def test_doc_pages_reference_only_same_origin_assets(docs_app: tuple[FastAPI, TestClient], page: str) -> None:
    _, client = docs_app
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = referenced_urls(r.text)
    if page != "/docs/oauth2-redirect":
        assert urls, "the page references no assets at all: the parser or the page changed"
    for tag, attr, url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"{page}: <{tag} {attr}={url!r}> is not same-origin"
        if attr in ("src", "href") and url.startswith("/"):
            assert client.get(url).status_code == 200, f"{page}: {url} is not served"
    assert "fonts.googleapis" not in r.text and "cdn.jsdelivr" not in r.text and "unpkg.com" not in r.text


@pytest.mark.parametrize("page", DOC_PAGES)
def test_doc_pages_forbid_other_origins_with_a_content_security_policy(docs_app: tuple[FastAPI, TestClient],
                                                                      page: str) -> None:
    _, client = docs_app
    csp = client.get(page).headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in (part.strip() for part in csp.split(";")) if d}
    for directive in ("default-src", "script-src", "style-src", "img-src", "font-src", "connect-src"):
        sources = directives[directive]
        assert "'self'" in sources
        assert all(s in ("'self'", "'unsafe-inline'", "data:", "blob:") for s in sources), (directive, sources)
    assert "content-security-policy" not in client.get("/livez").headers  # JSON responses do not need it


def _playwright_and_chromium():  # type: ignore[no-untyped-def]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package 'playwright' is missing: install the dev extra "
                    "(.venv/bin/pip install -c constraints.txt -e '.[dev]')")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `apt-get update && apt-get install -y chromium` "
                    "(or set MMFUSION_CHROMIUM to its path). The offline-docs test needs a real browser.")
    return sync_playwright


def test_docs_render_in_headless_chromium_without_contacting_any_other_host(tiny_bundle: Path, tmp_path: Path
                                                                            ) -> None:
    from tests.app.test_uvicorn_process import start_server

    sync_playwright = _playwright_and_chromium()
    # Keys configured: the documentation must still be reachable without one.
    proc, url = start_server(tiny_bundle, tmp_path / "index", {"MMFUSION_API_KEYS": "docs-test-key-0123456789"})
    blocked: list[str] = []
    failed: list[str] = []
    refused: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()

                def route(r) -> None:  # type: ignore[no-untyped-def]
                    if urlsplit(r.request.url).hostname in LOCAL_HOSTS:
                        r.continue_()
                    else:
                        blocked.append(r.request.url)
                        r.abort()

                page.route("**/*", route)
                page.on("response", lambda resp: failed.append(f"{resp.status} {resp.url}")
                        if resp.status >= 400 else None)
                page.on("console", lambda msg: refused.append(msg.text)
                        if "Content Security Policy" in msg.text else None)
                for doc in DOC_PAGES:
                    page.goto(f"{url}{doc}", wait_until="networkidle", timeout=60_000)
                    for op in OPERATIONS:
                        page.get_by_text(op, exact=True).first.wait_for(state="attached", timeout=30_000)
                    rendered = page.inner_text("body")
                    for op in OPERATIONS:
                        assert op in rendered, f"{doc}: {op} is not in the rendered page"
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert not blocked, f"the docs tried to reach other hosts: {blocked}"
    assert not failed, f"same-origin requests failed: {failed}"
    if refused:  # informative: what the Content-Security-Policy stopped before it left the browser
        print("CSP refused:", *refused, sep="\n  ")
