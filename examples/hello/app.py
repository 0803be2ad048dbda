"""The smallest useful mlserve app: say hello, and describe an uploaded file."""

import hashlib

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def hello():
    return jsonify(message="hello from mlserve", usage="curl -F file=@some.file <this endpoint>")


@app.post("/")
def describe():
    upload = request.files.get("file")
    if upload is None:
        return jsonify(error="send a file as the form field 'file'"), 400
    data = upload.read()
    return jsonify(filename=upload.filename, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=5000)
