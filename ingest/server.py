"""`rawwave ingest`: the aiohttp app (page, WHIP, HTTP API, health) and its lifecycle.

Routes live here; their handlers live in `whip.py` and `http_api.py`. One error boundary: expected
refusals (`HttpError`) become JSON bodies, anything else is logged and answered with a JSON 500.
On SIGTERM readiness turns false, new sessions are refused, live peers get their end marker
(reason "shutdown"), accepted uploads finish pushing (within drain_timeout_s), then the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from ingest import http_api, whip
from ingest.state import INGEST_KEY, HttpError, Ingest, check_auth, check_origin, origin_allowed
from ingest.webrtc import ice_server
from rawwave.logs import get_logger
from rawwave.settings import Settings
from rawwave.streams import Streams

log = get_logger(__name__)

STATIC = Path(__file__).parent / "static"
GUARDED = ("/whip", "/v1/")  # paths behind the bearer token and the Origin allowlist
EXPOSED_HEADERS = "Location, X-Rawwave-Session"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (default: RAWWAVE_HOST)")
    parser.add_argument("--port", type=int, help="port (default: RAWWAVE_PORT)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    asyncio.run(serve(settings.model_copy(update=overrides)))
    return 0


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then drain and close."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("ingest listening", url=f"http://{settings.host}:{_bound_port(site)}")
    await stop.wait()
    log.info("ingest stopping")
    await app[INGEST_KEY].drain()
    await runner.cleanup()  # waits for in-flight requests: an upload accepted now still gets pushed
    await app[INGEST_KEY].finish_uploads()


def build_app(settings: Settings, streams: Streams | None = None) -> web.Application:
    app = web.Application(middlewares=[_error_boundary, _guard])
    app[INGEST_KEY] = Ingest(settings, streams or Streams.connect(settings))
    app.router.add_get("/", _page)
    app.router.add_static("/static", STATIC)
    app.router.add_get("/livez", _livez)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/v1/config", _config)
    app.router.add_post("/whip", whip.post_offer)
    app.router.add_delete("/whip/{peer}", whip.delete_resource)
    app.router.add_patch("/whip/{peer}", whip.patch_resource)
    app.router.add_post("/v1/sessions", http_api.create_session)
    app.router.add_get("/v1/sessions/{session}/events", http_api.session_events)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


# -- middleware ------------------------------------------------------------------------------------


@web.middleware
async def _error_boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HttpError as e:
        return _with_cors(request, e.response())
    except web.HTTPException as e:  # aiohttp's own 404/405: same JSON shape
        if e.status < 400:
            raise
        return HttpError(e.status, e.reason, headers=dict(e.headers)).response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("request failed", path=request.path, method=request.method)
        return HttpError(500, "internal error", "internal").response()


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token and Origin allowlist on signaling and the API; CORS for allowed origins."""
    if not request.path.startswith(GUARDED):
        return await handler(request)
    settings = request.app[INGEST_KEY].settings
    check_origin(request, settings)
    if request.method == "OPTIONS":
        return _with_cors(request, web.Response(status=204))
    check_auth(request, settings)
    return _with_cors(request, await handler(request))


def _with_cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    if response.prepared or not origin_allowed(request, request.app[INGEST_KEY].settings):
        return response
    response.headers["Access-Control-Allow-Origin"] = request.headers["Origin"]
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Last-Event-ID"
    response.headers["Access-Control-Allow-Methods"] = "POST, GET, DELETE, PATCH, OPTIONS"
    response.headers["Vary"] = "Origin"
    return response


# -- small handlers --------------------------------------------------------------------------------


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def _livez(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def _readyz(request: web.Request) -> web.Response:
    ready = await request.app[INGEST_KEY].ready()
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _config(request: web.Request) -> web.Response:
    """What the page needs to build its peer connection."""
    settings = request.app[INGEST_KEY].settings
    servers = [_browser_ice_server(url) for url in settings.ice_servers]
    return web.json_response({"ice_servers": servers, "auth": settings.auth_token is not None})


def _browser_ice_server(url: str) -> dict[str, str]:
    server = ice_server(url)
    entry = {"urls": str(server.urls)}
    if server.username:
        entry |= {"username": server.username, "credential": str(server.credential)}
    return entry


async def _on_shutdown(app: web.Application) -> None:
    await app[INGEST_KEY].drain()


async def _on_cleanup(app: web.Application) -> None:
    await app[INGEST_KEY].streams.close()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server  # aiohttp keeps the asyncio server here; port 0 means "pick one"
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0
