"""JSON error answers. Bodies for auth failures say nothing about why."""

from __future__ import annotations

from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge


def error(status: int, message: str, **extra):
    response = jsonify({"error": message, **extra})
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            return error(413, f"body too large: the limit is {limit} bytes")
        return error(exc.code or 500, exc.name.lower())


def read_body() -> bytes:
    """The request body; 413 past MAX_CONTENT_LENGTH, chunked uploads included.

    A chunked body has no Content-Length to check up front: where the server
    terminates the stream (gunicorn does), read one byte past the limit to know.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None:
        if request.content_length > limit:
            raise RequestEntityTooLarge()
        return request.stream.read()
    if request.environ.get("wsgi.input_terminated"):
        body = request.input_stream.read(limit + 1)
        if len(body) > limit:
            raise RequestEntityTooLarge()
        return body
    return b""  # an unterminated stream of unknown length is never read
