"""The Starlette app of `clipjax serve`: routes, the bearer token, errors as JSON.

    GET  /                 the search page (a login form when a token is set and missing)
    GET  /static/NAME      the page's script and style sheet (a fixed list, not a folder)
    POST /login            form field `token` → an HttpOnly, SameSite=Strict cookie
    GET  /healthz          {"ok": true}
    GET  /api/info         model, step, index size and dimensions, micro-batching counters
    POST /api/search       a query (see queries.py) → [{"id", "path", "score", "thumbnail"}]
    GET  /thumb/ID         the JPEG thumbnail of result ID
    GET  /image/ID         the file of result ID

Files are named by their row in the index only (see thumbnails.py). With a token,
every request needs `Authorization: Bearer TOKEN` or the login cookie. Served on
loopback, requests must name a loopback host (a DNS-rebinding page cannot reach
the API). A client error is a 4xx with {"error": message}; nothing returns a traceback.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import mimetypes
import time
import urllib.parse
from importlib import resources

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from clipjax.serve.queries import BadRequest, parse
from clipjax.serve.service import SearchService
from clipjax.serve.thumbnails import Thumbnails

COOKIE = "clipjax_token"
STATIC = {"page.js": "text/javascript", "page.css": "text/css"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}
LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>clipjax search: token</title></head><body>
<form method="post" action="/login"><label>Access token
<input type="password" name="token" id="token" autofocus></label>
<button type="submit" id="login">Open</button></form>{message}</body></html>"""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):  # [::1]:8000
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


class Guard:
    """ASGI middleware: security headers on every response; the token; the Host check."""

    def __init__(self, app, token: str | None, loopback_only: bool):
        self.app = app
        self.token = token.encode() if token else None
        self.loopback_only = loopback_only

    def _authorized(self, headers: Headers, cookies: dict) -> bool:
        if self.token is None:
            return True
        scheme, _, given = headers.get("authorization", "").partition(" ")
        candidates = [given.strip()] if scheme.lower() == "bearer" else []
        candidates.append(cookies.get(COOKIE, ""))
        return any(hmac.compare_digest(c.encode(), self.token) for c in candidates if c)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                raw += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": raw}
            await send(message)

        headers = Headers(scope=scope)
        if self.loopback_only and not is_loopback(_host_name(headers.get("host", ""))):
            response = _error(f"this server answers requests for localhost only, not for "
                              f"host {headers.get('host', '')!r}", 421)
            return await response(scope, receive, send_with_headers)
        request = Request(scope)
        path, method = scope["path"], scope["method"]
        if (path == "/login" and method == "POST") or self._authorized(headers, request.cookies):
            return await self.app(scope, receive, send_with_headers)
        if path == "/" and method in ("GET", "HEAD"):
            response = HTMLResponse(LOGIN_PAGE.format(message=""), 401)
        else:
            response = _error("missing or wrong token: send 'Authorization: Bearer TOKEN'",
                              401, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send_with_headers)


def _error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


def create_app(service: SearchService, thumbnails: Thumbnails, *, token: str | None = None,
               loopback_only: bool = True, max_body_bytes: int = 16 << 20) -> Starlette:
    page = resources.files("clipjax.serve").joinpath("static/page.html").read_text("utf-8")
    static = {name: resources.files("clipjax.serve").joinpath(f"static/{name}").read_bytes()
              for name in STATIC}

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            raise HTTPException(404, f"no such file: /static/{name}")
        return Response(static[name], media_type=STATIC[name])

    async def login(request: Request) -> Response:
        body = await _read_body(request, 4096)
        given = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
        if token is None or not hmac.compare_digest(given.encode(), token.encode()):
            return HTMLResponse(LOGIN_PAGE.format(message="<p>Wrong token.</p>"), 401)
        response = RedirectResponse("/", 303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def info(request: Request) -> Response:
        return JSONResponse({**service.info(), "thumbnails_made": thumbnails.made})

    async def search(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise BadRequest("send the query as JSON (Content-Type: application/json)", 415)
        body = await _read_body(request, max_body_bytes)
        query = parse(body, dim=service.dim, size=len(service.index))
        start = time.perf_counter()
        hits = await service.search(query)
        took = (time.perf_counter() - start) * 1e3
        revision = service.index.cache.revision[:8]
        results = [{"id": i, "path": h.path, "score": round(h.score, 6),
                    "thumbnail": f"/thumb/{i}?r={revision}"} for i, h in hits]
        return Response(json.dumps(results, ensure_ascii=False), media_type="application/json",
                        headers={"Server-Timing": f"search;dur={took:.2f}"})

    def thumb(request: Request) -> Response:  # sync: Starlette runs it on a thread pool
        data = thumbnails.get(request.path_params["row"])
        if data is None:
            raise HTTPException(404, "no such image in the index")
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=86400"})

    def image(request: Request) -> Response:
        real = thumbnails.file(request.path_params["row"])
        if real is None:
            raise HTTPException(404, "no such image in the index")
        kind = mimetypes.guess_type(real)[0] or "application/octet-stream"
        return FileResponse(real, media_type=kind if kind.startswith("image/") else
                            "application/octet-stream")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(str(exc.detail), exc.status_code, getattr(exc, "headers", None))

    async def bad_request(request: Request, exc: BadRequest) -> Response:
        return _error(str(exc), exc.status)

    async def internal_error(request: Request, exc: Exception) -> Response:
        return _error(f"internal error ({type(exc).__name__}); see the server's log", 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    routes = [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/static/{name}", static_file, methods=["GET", "HEAD"]),
        Route("/login", login, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/api/info", info, methods=["GET"]),
        Route("/api/search", search, methods=["POST"]),
        Route("/thumb/{row:int}", thumb, methods=["GET", "HEAD"]),
        Route("/image/{row:int}", image, methods=["GET", "HEAD"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        HTTPException: http_error, BadRequest: bad_request, Exception: internal_error})
    app.add_middleware(Guard, token=token, loopback_only=loopback_only)
    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body of {int(declared)} bytes; the limit is {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)
