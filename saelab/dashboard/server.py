"""The HTTP side of `saelab serve` (Starlette on uvicorn): a dashboard site plus the live endpoints its pages call
when they are opened from this server (saelab.dashboard.live computes the answers).

    GET  /api/info          the SAE and the limits (a page that gets it shows the live panels)
    POST /api/activations   {"text", "latent"}                                  -> LiveSAE.activations
    POST /api/steer         {"latent", "mode", "alpha", "prompt", "max_new_tokens", "reference"} -> LiveSAE.steer
    POST /api/labels        {"latent", "label", "notes"}                        -> every label
    GET  /data/labels.js    the SAE's labels.json as the site's labels file, read fresh on every request
    GET  /, /index.html, /feature.html, /assets/app.js, /assets/style.css
                            this saelab's templates, not the site's copies, so a site built by an older
                            version gets the live panels this server answers
    GET  /...               the static site's files (data, plotly)

Model work runs in Starlette's thread pool, so pages, data files and /api/info are served while a completion
generates. A bad request gets status 400 and {"error": one sentence}.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from saelab.dashboard.live import LiveSAE
from saelab.errors import SaelabError

# The fields each POST endpoint reads from its JSON body, with their defaults (None: required).
FIELDS = {
    "activations": {"text": None, "latent": None},
    "steer": {"latent": None, "mode": "add", "alpha": None, "prompt": None, "max_new_tokens": 24, "reference": ""},
    "labels": {"latent": None, "label": "", "notes": ""},
}


def _site_summary(site: Path) -> dict[str, Any]:
    """The summary a built site holds (data/summary.js), or a SaelabError saying how to build the site."""
    from saelab.dashboard.site import read_data_file

    if not (site / "index.html").is_file():
        raise SaelabError(
            f"No dashboard in {site}: build it first with `saelab dashboard --sae SAE --cache CACHE` (it writes "
            "<sae>/dashboard), or point --dashboard at the folder one was written to."
        )
    return read_data_file(site / "data/summary.js")


def create_app(live: LiveSAE, site: str | Path) -> Starlette:
    """The app serving `site` (a folder `saelab dashboard` wrote for live.sae) with the live endpoints."""
    from saelab.dashboard.site import ASSETS, PAGES, labels_script, templates_dir

    site = Path(site)
    summary = _site_summary(site)
    if summary.get("d_sae") != live.sae.d_sae or summary.get("hook") != live.hook:
        raise SaelabError(
            f"The dashboard in {site} was built for an SAE with {summary.get('d_sae')} latents at "
            f"{summary.get('hook')}, not this one ({live.sae.d_sae} at {live.hook}); rebuild it or pass its own SAE."
        )

    def answer(name: str, method):
        async def endpoint(request: Request) -> Response:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                return JSONResponse({"error": "The request body is not JSON."}, status_code=400)
            if not isinstance(body, dict):
                return JSONResponse({"error": "The request body is not a JSON object."}, status_code=400)
            missing = [key for key, default in FIELDS[name].items() if default is None and key not in body]
            if missing:
                return JSONResponse({"error": f"The request lacks {', '.join(missing)}."}, status_code=400)
            arguments = {key: body.get(key, default) for key, default in FIELDS[name].items()}
            try:
                return JSONResponse(await run_in_threadpool(method, **arguments))
            except SaelabError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)

        return endpoint

    async def info(request: Request) -> Response:
        return JSONResponse({**live.info(), "sae": summary.get("sae")})

    async def labels_file(request: Request) -> Response:
        return Response(labels_script(live.labels()), media_type="text/javascript; charset=utf-8")

    async def tokens_file(request: Request) -> Response:
        if (site / "data/tokens.js").is_file():
            return FileResponse(site / "data/tokens.js", media_type="text/javascript; charset=utf-8")
        return Response("window.SAELAB_TOKENS = null;\n", media_type="text/javascript; charset=utf-8")  # older site

    templates = templates_dir()

    def template(path: Path):
        async def endpoint(request: Request) -> Response:
            return FileResponse(path)

        return endpoint

    routes = [
        Route("/api/info", info),
        Route("/api/activations", answer("activations", live.activations), methods=["POST"]),
        Route("/api/steer", answer("steer", live.steer), methods=["POST"]),
        Route("/api/labels", answer("labels", live.set_label), methods=["POST"]),
        Route("/data/labels.js", labels_file),
        Route("/data/tokens.js", tokens_file),
        Route("/", template(templates / "index.html")),
        *(Route(f"/{name}", template(templates / name)) for name in PAGES),
        *(Route(f"/assets/{name}", template(templates / name)) for name in ASSETS),
        Mount("/", StaticFiles(directory=site)),
    ]
    return Starlette(routes=routes)


class LocalServer:
    """An app on host:port under uvicorn. The socket is bound at construction, so `url` is known (port 0: a free
    port) before serving. run() serves until Ctrl-C or SIGTERM (main thread); start() serves from a thread until
    stop()."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 8000):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise SaelabError(f"Cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host.")
        self.socket.listen(128)  # connections wait in the backlog until uvicorn accepts them
        bound_host, bound_port = self.socket.getsockname()[:2]
        self.url = f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self) -> LocalServer:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join()
        self.socket.close()
