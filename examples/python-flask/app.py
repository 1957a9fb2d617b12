"""Flynn's Python example: a Flask app that answers GET / (run by gunicorn, see Procfile)."""

import platform

from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello() -> tuple[str, int, dict[str, str]]:
    return (
        f"Hello from Python {platform.python_version()} on Flynn!\n",
        200,
        {"Content-Type": "text/plain"},
    )
