"""The web app of ``tools/search.py serve``: a page and a JSON API over one index, its model loaded once.

FastAPI rather than gradio: two small dependencies (fastapi, uvicorn) instead of a UI framework, one plain
HTML page (search_page.html) and a JSON API that any client, and a test, can call. Only the index's items
are ever served, by their row number: a request never names a file path.
"""
from __future__ import annotations

import io
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from dataset.images import load_rgb
from dataset.scenes import read_item, thumbnail
from models import Retriever
from models.search_index import LoadedIndex, ranked, search

PAGE = Path(__file__).with_name("search_page.html")
MAX_TOP = 200


class RequestError(Exception):
    """A request the app refuses: ``status`` and a message the page shows as it is."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def encoded(image: Image.Image, kind: str) -> Response:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **({"quality": 90} if kind == "JPEG" else {}))
    return Response(buffer.getvalue(), media_type=f"image/{kind.lower()}")


def create_app(index: LoadedIndex, retriever: Retriever, default_top: int = 20) -> FastAPI:
    """The app: ``/`` (the page), ``/api/search?q=&top=``, ``POST /api/search_image``, ``/thumb/{item}`` and
    ``/item/{item}``; every error is ``{"error": message}`` with a 4xx status."""
    app = FastAPI(title="FISVL search", docs_url=None, redoc_url=None)
    page = PAGE.read_text(encoding="utf-8").replace("{{top}}", str(default_top))  # the page's initial top
    model_lock = threading.Lock()  # requests run in a thread pool; the model embeds one query at a time

    @app.exception_handler(RequestError)
    async def refused(_request: Any, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": err.message}, status_code=err.status)

    def checked_top(top: int | None) -> int:
        top = default_top if top is None else top
        if not 1 <= top <= MAX_TOP:
            raise RequestError(400, f"top must be in 1..{MAX_TOP}, not {top}")
        return top

    def answer(query: Any, embedding: Any, top: int, by_text: bool) -> dict[str, Any]:
        found = search(index, retriever, embedding.cpu(), top, by_text=by_text)[0]
        results = [{**record, "item": row} for record, (_, row) in zip(ranked(index, found), found)]
        return {"query": query, "results": results}

    def item_at(number: int) -> Image.Image:
        if not 0 <= number < len(index.items):
            raise RequestError(404, f"no item {number} in index {index.folder} (items 0..{len(index.items) - 1})")
        item = index.items[number]
        try:
            return read_item(item, index.decoding)
        except Exception as err:  # the file changed or went away since indexing
            where = "" if item.window is None else f" window {list(item.window)}"
            raise RequestError(404, f"cannot read item {number} ({item.path}{where}): {err}") from err

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/api/search")
    def search_text(q: str = "", top: int | None = None) -> dict[str, Any]:
        if not q.strip():
            raise RequestError(400, "empty query: type what the images should show")
        top = checked_top(top)
        with model_lock:
            return answer(q, retriever.encode_texts([q]), top, by_text=True)

    @app.post("/api/search_image")
    def search_image(image: UploadFile = File(...), top: int | None = None) -> dict[str, Any]:
        top = checked_top(top)
        name = image.filename or "upload"
        data = image.file.read()
        if not data:
            raise RequestError(400, f"the uploaded file {name!r} is empty")
        with tempfile.TemporaryDirectory() as folder:  # load_rgb decodes as the index did, 16-bit TIFFs too
            path = Path(folder) / f"upload{os.path.splitext(name)[1][:10]}"
            path.write_bytes(data)
            try:
                picture = load_rgb(path, index.decoding)
            except Exception as err:
                raise RequestError(400, f"cannot decode the uploaded file {name!r} as an image: {err}") from err
        with model_lock:
            return answer({"image": name}, retriever.encode_images([picture]), top, by_text=False)

    @app.get("/thumb/{number}")
    def thumb(number: int) -> Response:
        return encoded(thumbnail(item_at(number)), "JPEG")

    @app.get("/item/{number}")
    def full(number: int) -> Response:
        return encoded(item_at(number), "PNG")

    return app
