"""The web pages of ``instructkit serve``: chat, ranking and runs, with the JSON they read.

Pages and assets are plain files under ``instructkit/serve/static/`` (no CDN, no build step),
served with a Content-Security-Policy that allows this origin only. Routes:

* ``GET /`` and ``GET /chat``: chat page, streaming from ``/v1/chat/completions``;
* ``GET /rank``, ``GET /label/next``, ``POST /label/rank``, ``GET /label/progress``: ranking
  page over a :class:`~instructkit.serve.labels.LabelStore` (404 without ``--label-store``);
* ``GET /runs``, ``GET /runs/list``, ``GET /runs/file/{path}``: run folders under ``--runs``,
  their summary numbers, and their files (read-only, inside the folder, a few types only);
* ``GET /docs`` and ``GET /redoc`` (from :func:`docs_router`): the API's documentation, Swagger UI
  and ReDoc, with their scripts from the ``fastapi-offline`` package rather than FastAPI's CDN, so
  the pages work on a machine without internet.

With an API key the JSON routes need ``Authorization: Bearer KEY`` like ``/v1/*``; run files
(opened by links, which cannot send headers) also accept the key in the cookie the pages set.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import fastapi_offline
from fastapi import APIRouter, Depends, Query, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from instructkit.serve.labels import Conflict, LabelStore, NotFound

STATIC = Path(__file__).parent / "static"
ASSET_TYPES = {".css": "text/css", ".js": "text/javascript", ".html": "text/html", ".svg": "image/svg+xml"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
# A run's own files are the user's, but they are shown in this origin: the sandbox gives any
# script in them an opaque origin, so it cannot read the API key the pages keep.
RUN_FILE_HEADERS = {
    "Content-Security-Policy": "sandbox allow-scripts",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
RUN_FILE_TYPES = {
    ".html": "text/html",
    ".json": "application/json",
    ".jsonl": "text/plain",
    ".yaml": "text/plain",
    ".txt": "text/plain",
    ".csv": "text/plain",
    ".md": "text/plain",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".jpg": "image/jpeg",
}
RUN_SKIP_DIRS = {"checkpoints", "final", "__pycache__"}
RUN_DEPTH = 3
STEP_CHECKPOINT = re.compile(r"step-\d+")
MAX_RUNS = 500
KEY_COOKIE = "instructkit_api_key"
# Swagger UI and ReDoc run an inline start-up script and set inline styles; everything they load
# must still come from this origin, so a future asset that reaches for a CDN fails here, visibly.
DOCS_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
DOCS_STATIC = Path(fastapi_offline.__file__).parent / "static"  # Swagger UI 5 and ReDoc 2, as FastAPI's CDN has
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


class RankSubmission(BaseModel):
    """One answer from the ranking page: an order of the responses (best first) with tie marks,
    or a skip. ``submission_id`` is made by the page once per answer and resent on retries."""

    model_config = ConfigDict(extra="forbid")

    submission_id: str = Field(min_length=1, max_length=128)
    prompt_id: int = Field(ge=0, lt=2**63)  # SQLite's integer range
    annotator: str = Field(min_length=1, max_length=64)
    order: list[int] | None = None
    tied: list[bool] | None = None
    skip: bool = False


def make_router(
    *, label_store: str | Path | None = None, runs_dir: str | Path | None = None, api_key: str | None = None
) -> APIRouter:
    """The pages' routes; ``label_store`` is opened (and checked) now."""
    store = LabelStore(label_store) if label_store is not None else None
    runs_root = Path(runs_dir) if runs_dir is not None else None
    router = APIRouter()

    def authorized(request: Request) -> None:
        if api_key is not None and not _key_matches(_bearer(request), api_key):
            raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")

    def authorized_or_cookie(request: Request) -> None:
        if api_key is not None and not (
            _key_matches(_bearer(request), api_key)
            or _key_matches(unquote(request.cookies.get(KEY_COOKIE, "")) or None, api_key)
        ):
            raise HTTPException(401, "missing or wrong API key (enter it on the runs page)")

    def the_store() -> LabelStore:
        if store is None:
            raise HTTPException(404, "no label store is served (start the server with --label-store STORE.sqlite)")
        return store

    # 1. Pages and their assets.
    for path, page in (("/", "chat.html"), ("/chat", "chat.html"), ("/rank", "rank.html"), ("/runs", "runs.html")):
        router.add_api_route(path, _page_route(page), methods=["GET"], include_in_schema=False)

    @router.get("/static/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        file = STATIC / name
        if "/" in name or name.startswith(".") or file.suffix not in ASSET_TYPES or not file.is_file():
            raise HTTPException(404, f"no asset {name!r}")
        return FileResponse(file, media_type=ASSET_TYPES[file.suffix], headers=PAGE_HEADERS)

    # 2. Ranking.
    @router.get("/label/next", dependencies=[Depends(authorized)])
    def label_next(annotator: str = Query(min_length=1, max_length=64)) -> dict:
        return the_store().next_prompt(annotator)

    @router.get("/label/progress", dependencies=[Depends(authorized)])
    def label_progress(annotator: str | None = Query(default=None, max_length=64)) -> dict:
        return the_store().progress(annotator)

    @router.post("/label/rank", dependencies=[Depends(authorized)])
    def label_rank(body: RankSubmission) -> JSONResponse:
        labels = the_store()
        try:
            done = labels.submit(
                submission_id=body.submission_id,
                prompt_id=body.prompt_id,
                annotator=body.annotator,
                order=body.order,
                tied=body.tied,
                skip=body.skip,
            )
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        return JSONResponse(
            {"ranking": done.ranking, "duplicate": done.duplicate, "progress": labels.progress(body.annotator)},
            status_code=200 if done.duplicate else 201,
        )

    # 3. Runs.
    @router.get("/runs/list", dependencies=[Depends(authorized)])
    def runs_list() -> dict:
        if runs_root is None:
            return {"runs_dir": None, "runs": []}
        return {"runs_dir": str(runs_root), "runs": list_runs(runs_root)}

    @router.get("/runs/file/{path:path}", dependencies=[Depends(authorized_or_cookie)], include_in_schema=False)
    def run_file(path: str) -> FileResponse:
        file = safe_run_file(runs_root, path) if runs_root is not None else None
        if file is None:
            raise HTTPException(404, f"no run file {path!r}")
        return FileResponse(file, media_type=RUN_FILE_TYPES[file.suffix.lower()], headers=RUN_FILE_HEADERS)

    return router


def docs_router(title: str, openapi_url: str) -> APIRouter:
    """``/docs`` (Swagger UI) and ``/redoc`` over the schema at ``openapi_url``, their assets under
    ``/static/docs/``; the app must be made with ``docs_url=None, redoc_url=None``."""
    router = APIRouter()

    def url(request: Request, path: str) -> str:
        return request.scope.get("root_path", "") + path  # behind a proxy that mounts the app under a prefix

    @router.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=url(request, openapi_url),
            title=f"{title} - Swagger UI",
            swagger_js_url=url(request, "/static/docs/swagger-ui-bundle.js"),
            swagger_css_url=url(request, "/static/docs/swagger-ui.css"),
            swagger_favicon_url=url(request, "/static/docs/favicon.png"),
            # Swagger UI's default sends the schema's URL to validator.swagger.io for a badge.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers.update(DOCS_HEADERS)
        return page

    @router.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=url(request, openapi_url),
            title=f"{title} - ReDoc",
            redoc_js_url=url(request, "/static/docs/redoc.standalone.js"),
            redoc_favicon_url=url(request, "/static/docs/favicon.png"),
            with_google_fonts=False,
        )
        page.headers.update(DOCS_HEADERS)
        return page

    @router.get("/static/docs/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        if name not in DOCS_ASSETS:
            raise HTTPException(404, f"no documentation asset {name!r}")
        return FileResponse(DOCS_STATIC / name, media_type=DOCS_ASSETS[name], headers=PAGE_HEADERS)

    return router


def _page_route(name: str):
    def page() -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html", headers=PAGE_HEADERS)

    page.__name__ = f"page_{Path(name).stem}"
    return page


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


def _key_matches(given: str | None, api_key: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), api_key.encode())


# ----------------------------------------------------------------------------------------------
# Run folders


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Runs under ``root`` (up to 3 deep), newest first: relative path, status, the summary's
    top-level numbers, and which files can be opened.

    A run is a folder with a ``summary.json`` (finished) or a ``checkpoints/step-N`` checkpoint
    (under way, or stopped where it can resume). A stage that failed before its first checkpoint
    leaves only ``config.yaml``, and ``atomic_dir`` leaves ``NAME.tmp-*`` folders while it writes
    (or after a crash): neither has results to show, so neither is listed."""
    if not root.is_dir():
        return []
    runs = []
    for folder in _run_folders(root, RUN_DEPTH):
        summary_file = folder / "summary.json"
        summary: dict[str, Any] = {}
        if summary_file.is_file():
            try:
                loaded = json.loads(summary_file.read_text(encoding="utf-8"))
                summary = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                summary = {}
        numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rel = folder.relative_to(root).as_posix()
        files = [
            name
            for name in ("report.html", "summary.json", "config.yaml", "metrics.jsonl")
            if (folder / name).is_file()
        ]
        stamp = max((folder / f).stat().st_mtime for f in files) if files else folder.stat().st_mtime
        runs.append(
            {
                "path": rel,
                "stage": summary.get("stage") or ("recipe" if "recipe" in summary else None),
                "finished": summary_file.is_file(),
                "numbers": numbers,
                "files": files,
                "modified": stamp,
            }
        )
    runs.sort(key=lambda r: -r["modified"])
    return runs[:MAX_RUNS]


def _run_folders(folder: Path, depth: int):
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return
    for child in children:
        if child.name.startswith(".") or child.name in RUN_SKIP_DIRS or _is_temporary(child.name):
            continue
        if (child / "summary.json").is_file() or _has_checkpoint(child / "checkpoints"):
            yield child
        if depth > 1:
            yield from _run_folders(child, depth - 1)


def _is_temporary(name: str) -> bool:
    """A folder ``instructkit.fileio.atomic_dir`` is writing (``NAME.tmp-XXXX``), or left by a crash."""
    return ".tmp-" in name


def _has_checkpoint(checkpoints: Path) -> bool:
    # instructkit.runs.RunDir.has_progress asks the same, but parses every step-* name as a
    # number and so raises on a step-000010.tmp-XXXX (a checkpoint still being written, or cut off).
    try:
        return any(p.is_dir() and STEP_CHECKPOINT.fullmatch(p.name) for p in checkpoints.iterdir())
    except OSError:
        return False


def safe_run_file(root: Path, path: str) -> Path | None:
    """``root/path`` when it is a file of a served type inside ``root`` (after resolving ``..``
    and links) whose every part is visible (no dot-files); else None."""
    parts = Path(path).parts
    if not parts or Path(path).is_absolute() or any(p.startswith(".") for p in parts):
        return None
    base = root.resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base) or not target.is_file() or target.suffix.lower() not in RUN_FILE_TYPES:
        return None
    return target
