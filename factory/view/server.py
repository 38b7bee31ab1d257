"""``factory view``: a local web page over an output folder (Starlette, served by uvicorn).

The page (``static/``: one HTML file, one script, one stylesheet; no build step) asks a small
JSON API for everything it shows; the API reads the folder through :mod:`factory.view.data`
and writes nothing but people's verdicts (``annotations/v<N>.jsonl``, beside the versions).
Every value from data reaches the page as JSON and is inserted as text there; the dataset card
is rendered here from markdown with raw HTML turned off.
"""

from __future__ import annotations

import inspect
import json
import socket
import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..annotations import PARTS, add_verdict, agreement, read_verdicts, rows_at, stratified_sample, verdict_counts
from ..errors import FactoryError
from .data import Folder, ViewError, clean, evolve_page

STATIC = Path(__file__).resolve().parent / "static"


def json_response(data, status: int = 200) -> Response:
    body = json.dumps(clean(data), ensure_ascii=False, default=str)
    return Response(body, status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


def api(handler):
    """A JSON endpoint whose errors are one line: ``{"error": ...}`` with a 4xx/5xx status; the
    server goes on serving whatever one page found wrong."""
    async def endpoint(request: Request) -> Response:
        try:
            if inspect.iscoroutinefunction(handler):
                return json_response(await handler(request))
            # polars work goes to a worker thread, so that a slow search never holds up other pages
            return json_response(await run_in_threadpool(handler, request))
        except ViewError as e:
            return json_response({"error": str(e)}, e.status)
        except FactoryError as e:
            return json_response({"error": str(e).splitlines()[0]}, 400)
        except Exception as e:  # a damaged file must cost one page, not the server
            return json_response({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}, 500)
    return endpoint


def _filters(request: Request) -> list[tuple[str, object]]:
    """``f=COL=VALUE`` parameters; VALUE as JSON (``"abc"``, ``7``, ``true``, ``null``), else the text itself."""
    out = []
    for item in request.query_params.getlist("f"):
        column, sep, text = item.partition("=")
        if not sep or not column:
            raise ViewError(f"filter {item!r}: expected COLUMN=VALUE")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out.append((column, value))
    return out


def _int(request: Request, name: str, default: int | None = None) -> int:
    text = request.query_params.get(name)
    if text is None:
        if default is None:
            raise ViewError(f"missing parameter {name!r}")
        return default
    try:
        return int(text)
    except ValueError:
        raise ViewError(f"{name}={text!r}: expected a whole number") from None


def render_card(text: str) -> dict:
    """The card's markdown as HTML (raw HTML in it is shown as text, never run) and its YAML header."""
    from markdown_it import MarkdownIt

    metadata = ""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            metadata, text = text[4:end], text[end + 4:]
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    return {"html": md.render(text), "metadata": metadata}


def create_app(root: str | Path, sample: int = 20) -> Starlette:
    """The viewer's web app over the output folder ``root``; ``sample``: rows per version offered to label."""
    folder = Folder(root, sample=sample)

    def version_of(request: Request):
        return folder.version(request.query_params.get("ds"), request.query_params.get("v"))

    def part_of(request: Request) -> str:
        part = request.query_params.get("part", "data")
        if part not in PARTS:
            raise ViewError(f"part {part!r}: expected data or rejected")
        return part

    def index(request: Request):
        return folder.index()

    def version(request: Request):
        return version_of(request).summary(folder)

    def query(request: Request) -> dict:
        return {"q": request.query_params.get("q") or None, "filters": _filters(request),
                "step": request.query_params.get("step") or None, "reason": request.query_params.get("reason") or None,
                "within": request.query_params.get("in") or None}

    def rows(request: Request):
        return version_of(request).page(part_of(request), _int(request, "offset", 0), _int(request, "limit", 50),
                                        **query(request))

    def count(request: Request):
        return version_of(request).count(part_of(request), **query(request))

    def row(request: Request):
        return version_of(request).row(part_of(request), _int(request, "index"))

    def sample(request: Request):
        v = version_of(request)
        items = stratified_sample(v.folder, folder.sample)
        found = {p: rows_at(v.folder, p, [i["index"] for i in items if i["part"] == p]) for p in PARTS}
        return {"n": folder.sample, "items": [
            {**item, "row": v.rows_out(item["part"], [{"_index": item["index"], **found[item["part"]][item["index"]]}])[0]}
            for item in items if item["index"] in found[item["part"]]]}

    async def verdict(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # A form posted by another site cannot set this type without the browser asking first.
            raise ViewError("a verdict is posted as JSON (Content-Type: application/json)", 415)
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            raise ViewError(f"a verdict from another site ({origin}) is refused", 403)
        try:
            body = await request.json()
        except ValueError:
            raise ViewError("the verdict is not valid JSON") from None
        return await run_in_threadpool(record_verdict, body)

    def record_verdict(body) -> dict:
        if not isinstance(body, dict):
            raise ViewError("the verdict must be a JSON object with ds, v, part, index, verdict, note")
        v = folder.version(body.get("ds"), body.get("v"))
        part = body.get("part")
        if part not in PARTS:
            raise ViewError(f"part {part!r}: expected data or rejected")
        index = body.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ViewError(f"index {index!r}: expected a row number")
        found = rows_at(v.folder, part, [index])
        if index not in found:
            raise ViewError(f"{v.ds}/v{v.manifest.get('version')}: {part} has no row {index}", 404)
        note = body.get("note") or ""
        if not isinstance(note, str) or len(note) > 10_000:
            raise ViewError("note: expected text of at most 10,000 characters")
        record = add_verdict(v.folder, part, index, str(body.get("verdict")), note, row=found[index])
        verdicts = read_verdicts(v.folder)
        return {"ok": True, "record": record, "verdicts": verdict_counts(verdicts),
                "agreement": agreement(v.folder, v.manifest, verdicts)}

    def agreement_of(request: Request):
        v = version_of(request)
        return agreement(v.folder, v.manifest)

    def diff(request: Request):
        from ..diff import diff as diff_versions

        ends = []
        for name in ("a", "b"):
            ref = request.query_params.get(name) or ""
            ds, sep, number = ref.rpartition("@")
            if not sep:
                raise ViewError(f"{name}={ref!r}: expected DATASET@N, such as quickstart@2")
            ends.append(folder.version(ds, number).folder)
        return diff_versions(ends[0], ends[1], examples=20)

    def card(request: Request):
        v = version_of(request)
        path = v.folder / "README.md"
        if not path.is_file():
            raise ViewError(f"{v.ds}/{v.folder.name} has no README.md (dataset card)", 404)
        return render_card(path.read_text(encoding="utf-8", errors="replace"))

    def evolve(request: Request):
        return evolve_page(folder, request.query_params.get("run") or ".")

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def not_found(request: Request):
        return json_response({"error": f"no such API: {request.url.path}"}, 404)

    routes = [
        Route("/", page),
        Route("/api/index", api(index)),
        Route("/api/version", api(version)),
        Route("/api/rows", api(rows)),
        Route("/api/count", api(count)),
        Route("/api/row", api(row)),
        Route("/api/sample", api(sample)),
        Route("/api/verdict", api(verdict), methods=["POST"]),
        Route("/api/agreement", api(agreement_of)),
        Route("/api/diff", api(diff)),
        Route("/api/card", api(card)),
        Route("/api/evolve", api(evolve)),
        Route("/api/{rest:path}", not_found),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 0, sample: int = 20) -> None:
    """Serves the viewer until interrupted; prints the URL first (a free port when ``port`` is 0)."""
    import uvicorn

    app = create_app(root, sample=sample)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, so that asyncio turns Nagle's algorithm off on each connection (else a small
    # answer can wait ~40 ms for the client's delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FactoryError(f"factory view: cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                           "(0 picks a free one)") from None
    sock.listen(128)  # before the URL is printed: a client may connect the moment it reads it
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"factory view: serving {Path(root)} at http://{shown}:{bound}/", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: {host} is reachable from other machines, and anyone who reaches it can read every row "
              "and add verdicts", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
