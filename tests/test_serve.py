"""`clipjax serve` over real HTTP: the page in a real Chromium (Playwright), the JSON API,
micro-batching, thumbnails, and each security rule of the issue.

One server (the real CLI in a subprocess, a tiny random CLIP) serves every test of
this module. Its index holds scikit-image's photos, Fashion-MNIST test images written
as PNG, and a symlink that points out of the collection.
"""

import base64
import http.client
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib

import jax
import numpy as np
import pytest
from apps_data import tiny_config, write_photos
from PIL import Image

from clipjax import checkpoint, models
from clipjax.cli import main

TOKEN = "test-token-0123456789"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = os.environ.get("CLIPJAX_TEST_ARTIFACTS", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "test-artifacts"))


def _write_fashion_mnist(folder: str, count: int = 10) -> list[str]:
    from clipjax.data import idx

    if not os.path.exists(os.path.join(idx.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        return []
    images, labels = idx.load_split(idx.FASHION_MNIST_DIR, "test")
    os.makedirs(folder, exist_ok=True)
    out = []
    for c in range(count):  # the first test image of each class
        i = int(np.flatnonzero(labels == c)[0])
        path = os.path.join(folder, f"{c}_{idx.FASHION_MNIST_CLASSES[c].replace(' ', '_')}.png")
        Image.fromarray(images[i]).save(path)
        out.append(os.path.abspath(path))
    return out


class Server:
    def __init__(self, root):
        self.root = root
        collection = root / "photos"
        self.photos = write_photos(str(collection))
        self.photos += _write_fashion_mnist(str(collection / "fashion"))
        outside = root / "private"
        outside.mkdir()
        secret = outside / "secret.png"
        Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(secret)
        self.symlink = str(collection / "escape.png")
        os.symlink(secret, self.symlink)
        self.workdir = str(root / "model")
        config = tiny_config()
        checkpoint.save_params(self.workdir, models.init_params(config.model, jax.random.key(0)),
                               config)
        self.index = str(root / "index")
        assert main(["embed", "--model", self.workdir, "--images", str(collection),
                     "--out", self.index, "--no-progress", "--dtype", "float32"]) == 0
        from clipjax.apps.embedding_cache import EmbeddingCache

        self.cache = EmbeddingCache.open(self.index)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipjax", "serve", "--index", self.index, "--port", "0",
             "--max-batch", "16", "--max-upload-mb", "1", "--max-pixels", "4000000"],
            env={**os.environ, "CLIPJAX_SERVE_TOKEN": TOKEN}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.log = []
        line = ""
        deadline = time.monotonic() + 120
        while "http://" not in line:
            line = self.proc.stdout.readline()
            self.log.append(line)
            if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("clipjax serve did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        address = line.split("http://", 1)[1].split("/", 1)[0]
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.url = f"http://{address}"

    def request(self, method, path, body=None, headers=None, token=TOKEN):
        """(status, headers, body bytes) of one request, the path sent exactly as given."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), data

    def search(self, query, **headers):
        status, _, data = self.request("POST", "/api/search", query, headers)
        return status, json.loads(data)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(server):
    import clipjax

    return clipjax.load(server.workdir)


def _top_path(model, cache, text):
    sims = cache.vectors() @ model.encode_texts([text])[0]
    order = np.argsort(-sims)
    return cache.paths[order[0]], float(sims[order[0]] - sims[order[1]])


# ------------------------------------------------------------------ the API


def test_api_search_info_health_and_thumbnails(server, model):
    status, _, body = server.request("GET", "/healthz")
    assert status == 200 and json.loads(body) == {"ok": True}
    status, _, body = server.request("GET", "/api/info")
    info = json.loads(body)
    assert status == 200 and info["size"] == len(server.cache) and info["dim"] == 32
    assert info["model"] == server.workdir and info["step"] == 0 and info["index"] == "exact"

    # Text: the server's ranking is the model's own (numpy brute force over the cache).
    status, hits = server.search({"text": "a cat", "k": 5})
    assert status == 200 and len(hits) == 5
    sims = server.cache.vectors() @ model.encode_texts(["a cat"])[0]
    want = np.argsort(-sims)[:5]
    assert [h["id"] for h in hits] == want.tolist()
    assert [h["path"] for h in hits] == [server.cache.paths[i] for i in want]
    np.testing.assert_allclose([h["score"] for h in hits], sims[want], atol=1e-4)

    # Image (base64), embedding and "more like this" find the photo itself first.
    photo = server.photos[3]
    row = server.cache.paths.index(photo)
    b64 = base64.b64encode(open(photo, "rb").read()).decode()
    for query in ({"image": b64}, {"image": "data:image/png;base64," + b64},
                  {"embedding": server.cache.vectors()[row].tolist()}, {"like": row}):
        status, hits = server.search({**query, "k": 3})
        assert status == 200 and hits[0]["path"] == photo and hits[0]["score"] > 0.99, query
    # The threshold drops the hits below it.
    status, hits = server.search({"like": row, "k": 50, "threshold": 0.999})
    assert status == 200 and [h["path"] for h in hits] == [photo]

    # A thumbnail is a JPEG made once, then served from the cache (memory and disk).
    made = json.loads(server.request("GET", "/api/info")[2])["thumbnails_made"]
    for _ in range(2):
        status, headers, data = server.request("GET", f"/thumb/{row}")
        assert status == 200 and headers["content-type"] == "image/jpeg"
        assert max(Image.open(__import__("io").BytesIO(data)).size) <= 256
    after = json.loads(server.request("GET", "/api/info")[2])["thumbnails_made"]
    assert after == made + 1
    assert any(f.endswith(".jpg") for _, _, fs in os.walk(os.path.join(server.index,
                                                                        "thumbnails")) for f in fs)
    status, headers, data = server.request("GET", f"/image/{row}")
    assert status == 200 and data == open(photo, "rb").read()


def test_concurrent_text_queries_are_batched_and_each_gets_its_own_answer(server, model):
    texts = [f"photo number {i}" for i in range(32)]
    results = [None] * len(texts)
    before = json.loads(server.request("GET", "/api/info")[2])["micro_batching"]

    def ask(i):
        results[i] = server.search({"text": texts[i], "k": 3})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = json.loads(server.request("GET", "/api/info")[2])["micro_batching"]
    assert after["queries"] - before["queries"] == len(texts)
    assert after["batches"] - before["batches"] < len(texts)  # some were embedded together
    assert after["largest_batch"] > 1
    want = server.cache.vectors() @ model.encode_texts(texts).T
    for i, (status, hits) in enumerate(results):
        assert status == 200
        np.testing.assert_allclose([h["score"] for h in hits],
                                   np.sort(want[:, i])[::-1][:3], atol=1e-4)


# ------------------------------------------------------------------ security


def test_non_loopback_host_needs_a_token(server, capsys, monkeypatch):
    monkeypatch.delenv("CLIPJAX_SERVE_TOKEN", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        assert main(["serve", "--index", server.index, "--host", host]) == 1
        err = capsys.readouterr().err
        assert "clipjax serve: error:" in err and "--token" in err and "loopback" in err
    assert main(["serve", "--index", server.index, "--token", "short"]) == 1
    assert "at least 8" in capsys.readouterr().err
    # A busy port fails at once, before the model loads.
    assert main(["serve", "--index", server.index, "--port", str(server.port)]) == 1
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_every_request_needs_the_token(server):
    for method, path in (("GET", "/healthz"), ("GET", "/api/info"), ("GET", "/thumb/0"),
                         ("GET", "/image/0"), ("GET", "/static/page.js"), ("GET", "/")):
        for token in (None, "wrong-token-0123456789"):
            status, headers, body = server.request(method, path, token=token)
            assert status == 401, (method, path, token)
            assert b"<form" in body if path == "/" else json.loads(body)["error"]
    status, _, body = server.request("POST", "/api/search", {"text": "x"}, token=None)
    assert status == 401 and "token" in json.loads(body)["error"]
    # The login form sets an HttpOnly cookie that then works alone.
    status, _, _ = server.request("POST", "/login", b"token=nope", token=None,
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 401
    status, headers, _ = server.request(
        "POST", "/login", f"token={TOKEN}".encode(), token=None,
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    cookie = headers["set-cookie"]
    assert status == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie
    status, _, _ = server.request("GET", "/api/info", token=None,
                                  headers={"Cookie": cookie.split(";")[0]})
    assert status == 200


def test_only_indexed_files_are_served(server):
    ok = server.cache.paths.index(server.photos[0])
    assert server.request("GET", f"/thumb/{ok}")[0] == 200
    escape = server.cache.paths.index(server.symlink)  # indexed, but it points outside
    probes = [
        f"/thumb/{escape}", f"/image/{escape}",
        "/thumb/../../../../etc/passwd", "/image/../../../../etc/passwd",
        "/thumb/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/image/%2Fetc%2Fpasswd",
        "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/image//etc/passwd", "/image/~/.ssh/id_rsa",
        "/thumb/-1", f"/thumb/{len(server.cache)}", "/thumb/99999999999999999999", "/thumb/1e3",
        "/image/0%00.png", "/static/../app.py", "/static/..%2Fapp.py", "/static/page.html",
        "/static/%2e%2e%2fapp.py", "/static/..%5Capp.py", "/etc/passwd", "/%2Fetc%2Fpasswd",
        "/image?path=/etc/passwd", "/" + server.photos[0], "/image/" + server.photos[0],
    ]
    secret = open(os.path.realpath(server.symlink), "rb").read()
    for path in probes:
        status, _, body = server.request("GET", path)
        assert status == 404, (path, status)
        assert b"root:" not in body and secret not in body and b"Traceback" not in body
    # A file swapped for a symlink after indexing is refused too.
    victim = server.photos[-1]
    moved = victim + ".moved"
    os.rename(victim, moved)
    try:
        os.symlink(os.path.realpath(server.symlink), victim)
        row = server.cache.paths.index(victim)
        assert server.request("GET", f"/image/{row}")[0] == 404
    finally:
        os.remove(victim)
        os.rename(moved, victim)


def _bomb_png(width, height) -> bytes:
    """A PNG whose header declares width x height pixels (the data is tiny and short)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_bad_input_gets_a_4xx_with_a_message(server):
    truncated = open(server.photos[0], "rb").read()[:200]
    cases = [
        (b"{not json", "application/json", 400, "not JSON"),
        (b"\xff\xfe", "application/json", 400, "not JSON"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (b'{"text": "a", "image": "aGk="}', "application/json", 400, "exactly one"),
        (b"{}", "application/json", 400, "exactly one"),
        (b'{"txt": "a"}', "application/json", 400, "unknown field"),
        (b'{"text": ""}', "application/json", 400, "empty"),
        (b'{"text": 5}', "application/json", 400, "string"),
        (b'{"text": "a", "k": 0}', "application/json", 400, "k must"),
        (b'{"text": "a", "k": "3"}', "application/json", 400, "k must"),
        (b'{"text": "a", "threshold": 2}', "application/json", 400, "threshold"),
        (b'{"image": "***"}', "application/json", 400, "base64"),
        (json.dumps({"image": base64.b64encode(b"hello, not an image").decode()}).encode(),
         "application/json", 422, "not an image"),
        (json.dumps({"image": base64.b64encode(truncated).decode()}).encode(),
         "application/json", 422, "image"),
        (json.dumps({"image": base64.b64encode(_bomb_png(5000, 5000)).decode()}).encode(),
         "application/json", 422, "decompression bomb"),
        (json.dumps({"image": base64.b64encode(_bomb_png(60000, 60000)).decode()}).encode(),
         "application/json", 422, "decompression bomb"),
        (json.dumps({"embedding": [0.1] * 31}).encode(), "application/json", 422,
         "32 dimensions"),
        (json.dumps({"embedding": [0.0] * 32}).encode(), "application/json", 422, "zeros"),
        (b'{"embedding": [NaN' + b", 1" * 31 + b"]}", "application/json", 422, "non-finite"),
        (b'{"embedding": [1e999' + b", 1" * 31 + b"]}", "application/json", 422, "non-finite"),
        (b'{"embedding": "abc"}', "application/json", 400, "list of numbers"),
        (b'{"like": 10000}', "application/json", 404, "no image"),
        (b'{"like": "0"}', "application/json", 400, "integer id"),
        (b'{"text": "a"}', "text/plain", 415, "application/json"),
        (b"x" * (2 << 20), "application/json", 413, "limit"),
    ]
    for body, kind, want, words in cases:
        status, _, data = server.request("POST", "/api/search", body, {"Content-Type": kind})
        error = json.loads(data)["error"]
        assert status == want and words in error, (body[:60], status, error)
        assert "Traceback" not in error
    # An upload over the limit sent in chunks (no Content-Length) is cut off as well.
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/api/search", body=iter([b"x" * (256 << 10)] * 8),
                 headers={"Authorization": f"Bearer {TOKEN}",
                          "Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]
    conn.close()
    status, _, data = server.request("GET", "/api/search")
    assert status == 405 and json.loads(data)["error"]
    status, _, data = server.request("GET", "/api/nothing")
    assert status == 404 and json.loads(data)["error"]
    # Requests naming another host are refused (a DNS-rebinding page cannot reach the API).
    status, _, data = server.request("GET", "/api/info", headers={"Host": "evil.example"})
    assert status == 421 and "localhost" in json.loads(data)["error"]
    assert server.proc.poll() is None  # still serving
    assert "Traceback" not in "".join(server.log)


# ------------------------------------------------------------------ the page, in Chromium


def _wait_for_thumbnails(page, n, refused, timeout=30):
    """Until the first n result images are decoded, but for the `refused` path's, which
    must fail (evaluate is allowed by the page's CSP, which blocks the string eval of
    wait_for_function)."""
    script = ("([n, refused]) => [...document.querySelectorAll('.result img')].slice(0, n)"
              ".every(i => i.complete && (i.closest('.result').dataset.path === refused ?"
              " i.naturalWidth === 0 : i.naturalWidth > 0))")
    deadline = time.monotonic() + timeout
    while not page.evaluate(script, [n, refused]):
        assert time.monotonic() < deadline, "thumbnails did not load"
        time.sleep(0.1)


def _expect_status(expect, page, label):
    """Until the page says it shows the results for `label` (not "searching ...")."""
    expect(page.locator("#status")).to_have_text(
        re.compile(r"^\d+ results? for " + re.escape(label) + " in"))


def test_the_page_in_chromium(server, model):
    if not os.path.exists(CHROMIUM) and not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    expect = sync_api.expect

    # A query whose top hit is clearly ahead of the second (the model is random: the
    # expected image is the model's own top hit, computed here outside the server).
    text, (expected, _) = max(
        ((t, _top_path(model, server.cache, t)) for t in
         ("a cat", "an astronaut", "a rocket launch", "coins on a table", "a sneaker",
          "a horse", "a cup of coffee", "the moon")), key=lambda kv: kv[1][1])
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM)
                                    else shutil.which("chromium"), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.fill("#token", TOKEN)  # the login form (the server has a token)
            page.click("#login")
            page.wait_for_selector("#query")
            expect(page.locator("#info")).to_contain_text(f"{len(server.cache)} images")

            page.fill("#k", "12")
            page.fill("#query", text)
            page.press("#query", "Enter")
            expect(page.locator("#status")).to_have_text(re.compile("^12 results"))
            first = page.locator(".result").first
            assert first.get_attribute("data-path") == expected
            _wait_for_thumbnails(page, 4, server.symlink)

            photo = server.photos[5]  # upload: the photo finds itself first
            page.set_input_files("#file", photo)
            _expect_status(expect, page, "images like " + os.path.basename(photo))
            assert page.locator(".result").first.get_attribute("data-path") == photo
            assert float(page.locator(".result .score").first.text_content()) > 0.99

            third = page.locator(".result").nth(2)  # more like this: that image comes first
            target = third.get_attribute("data-path")
            third.locator("button.more").click()
            _expect_status(expect, page, "images like " + target)
            assert page.locator(".result").first.get_attribute("data-path") == target

            page.fill("#threshold", "0.999")  # the score threshold
            page.locator(".result").first.locator("button.more").click()
            expect(page.locator("#status")).to_have_text(re.compile("^1 result for"))
            page.fill("#threshold", "")
            page.fill("#query", text)
            page.press("#query", "Enter")
            expect(page.locator("#status")).to_have_text(re.compile("^12 results"))
            _wait_for_thumbnails(page, 8, server.symlink)
            os.makedirs(ARTIFACTS, exist_ok=True)
            shot = os.path.join(ARTIFACTS, "serve_page.png")
            page.screenshot(path=shot, full_page=True)
            assert Image.open(shot).size[0] >= 1200
            assert not errors, errors
        finally:
            browser.close()


def test_short_queries_run_on_fewer_positions_with_the_same_embedding(monkeypatch):
    import jax
    from apps_data import tiny_model

    from clipjax.inference import ClipModel
    from clipjax.serve.service import SearchService

    base = tiny_model(seed=1)  # on one device, as a CPU server runs: no padding rows
    model = ClipModel.from_params(base.config, base.params, devices=jax.local_devices()[:1])
    service = SearchService(model, None, text_lengths=(4, 8))
    assert service.text_lengths == [4, 8, 16]
    texts = ["cat", "a photo of a cat", "a b c d e f g h i j k l m n o p q r s t u v"]
    for group in ([texts[0]], texts[:2], texts):
        np.testing.assert_allclose(service.encode_texts(group), model.encode_texts(group),
                                   atol=1e-5)
    ids = np.asarray(model.tokenize(texts[:1]))
    assert int(ids.argmax()) + 1 <= 4  # "cat" fits the shortest length
    shapes = []  # one long text does not put the short ones on the long length
    real = model.encode_texts
    monkeypatch.setattr(model, "encode_texts", lambda ids: shapes.append(ids.shape) or real(ids))
    service.encode_texts(texts)
    assert sorted(shapes) == [(1, 4), (1, 8), (1, 16)]
    shapes.clear()  # three texts pad to a batch of 4: "cat" fills the padding row
    group = ["a photo of a cat", "a photo of a dog", "a photo of a cow", "cat"]
    np.testing.assert_allclose(service.encode_texts(group), real(group), atol=1e-5)
    assert shapes == [(4, 8)]
