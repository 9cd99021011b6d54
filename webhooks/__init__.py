"""The edge: verify, parse, decide, enqueue, answer fast. No work in a request.

`create_app()` is the Flask application factory (gunicorn: `webhooks:create_app()`).
Nothing connects to anything at import time.
"""

from webhooks.app import create_app

__all__ = ["create_app"]
