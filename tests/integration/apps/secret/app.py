"""A test app that answers the value of the environment variable named by ?name=NAME (null when unset)."""

import json
import os
from urllib.parse import parse_qs


def app(environ, start_response):
    name = parse_qs(environ.get("QUERY_STRING", "")).get("name", [""])[0]
    data = json.dumps({"job": os.environ.get("MLSERVE_JOB"), "name": name, "value": os.environ.get(name)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
