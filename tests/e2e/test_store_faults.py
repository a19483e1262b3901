"""Object-store faults against real S3 API servers on loopback (moto), never a mocked s3fs.

- transient 5xx answers and dropped connections, injected by a small threaded HTTP proxy in front
  of moto: retried with exponential backoff, then the call succeeds; past the bound it fails with
  a StoreError naming the URL;
- the endpoint going away mid-write and coming back on the same port: the write is retried and
  the artifact completes; a real moto server killed mid-write and restarted (its state lost):
  the write fails clearly, no manifest is left, a rerun succeeds;
- no manifest is ever partial or corrupt, whatever faults hit a write;
- wrong credentials against a moto server that enforces IAM auth: a fast, clear StoreError (or
  CorpusError) naming the URL, not retried, and never echoing the secret.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import training.storage as storage
from tests.conftest import S3_ENV, S3Server, free_port
from training.storage import ObjectStore, RetryPolicy, StoreError, is_transient
from tests.training.manifest_check import verify_manifest

pytestmark = pytest.mark.timeout(120)

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "expect", "content-length"}


# -- the fault-injecting proxy ------------------------------------------------------------------------
class FaultProxy:
    """Forwards HTTP/1.1 requests to an upstream S3 server, failing some of them on purpose.

    fail_first: the first N (matching) requests get `status` with an S3 XML error `code`;
    fail_every: then every k-th request does; drop_first: the first N requests get no answer at all
    (the connection is closed, as a dying server does). `stop()` closes the listening socket and
    every open connection; `start()` listens again on the same port.
    """

    def __init__(self, upstream_port: int, port: int | None = None):
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.fail_first = 0
        self.fail_every = 0
        self.drop_first = 0
        self.status, self.code = 503, "ServiceUnavailable"
        self.match = lambda method, path: True
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status answered; 0 = dropped)
        self._count = 0
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()

    @property
    def failed(self) -> int:
        return sum(1 for _, _, s in self.seen if s == self.status or s == 0)

    def decide(self, method: str, path: str) -> str:
        with self.lock:
            if not self.match(method, path):
                return "forward"
            self._count += 1
            n = self._count
            if n <= self.drop_first:
                return "drop"
            if n <= self.drop_first + self.fail_first:
                return "fail"
            if self.fail_every and n % self.fail_every == 0:
                return "fail"
            return "forward"

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                with proxy.lock:
                    proxy._conns.add(self.connection)

            def finish(self):
                with proxy.lock:
                    proxy._conns.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(out)
                        out.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _any(self):
                body = self._body()
                action = proxy.decide(self.command, self.path)
                if action == "drop":
                    proxy.seen.append((self.command, self.path, 0))
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if action == "fail":
                    proxy.seen.append((self.command, self.path, proxy.status))
                    err = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{proxy.code}</Code>'
                           f"<Message>injected fault</Message><RequestId>{uuid.uuid4().hex}</RequestId></Error>").encode()
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(err)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(err)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in HOP_BY_HOP:
                            conn.putheader(k, v)
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    proxy.seen.append((self.command, self.path, resp.status))
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_BY_HOP and k.lower() not in ("server", "date"):
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                        self.end_headers()
                    else:
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        """The endpoint goes away: no listener, and every open connection is cut."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self.lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def proxy(s3_server, s3_bucket, monkeypatch):
    """A FaultProxy in front of the session's moto server; the AWS endpoint points at the proxy."""
    p = FaultProxy(s3_server.port)
    p.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    yield p
    p.stop()


@pytest.fixture
def sleeps(monkeypatch):
    """The store's backoff sleeps, recorded (and actually slept, shortened 10x)."""
    recorded: list[float] = []

    def fake(seconds):
        recorded.append(seconds)
        time.sleep(seconds / 10)

    monkeypatch.setattr(storage, "_sleep", fake)
    return recorded


def _direct(bucket: str, endpoint: str) -> ObjectStore:
    """The same bucket straight on the server, bypassing the proxy (the ground truth)."""
    return ObjectStore(f"{bucket}/specdraft", {"client_kwargs": {"endpoint_url": endpoint}})


def _write_artifact(store: ObjectStore, prefix: str, payload: dict[str, bytes], streamed: str | None = None):
    with store.artifact(prefix, "fp") as w:
        for name, data in payload.items():
            if name == streamed:
                with w.open(name) as f:  # a streamed part, as Parquet and hidden-state parts are written
                    for i in range(0, len(data), 1 << 16):
                        f.write(data[i:i + (1 << 16)])
            else:
                w.write_bytes(name, data)
        w.summary = {"parts": len(payload)}
    return store.manifest(prefix)


# -- transient answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["ServiceUnavailable", "SlowDown", "InternalError"])
def test_transient_5xx_retried_with_exponential_backoff(proxy, s3_bucket, sleeps, monkeypatch, code):
    """One HTTP request per attempt (botocore retries off): the store's own policy is what retries."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    proxy.status, proxy.code = (500 if code == "InternalError" else 503), code
    store = ObjectStore(f"{s3_bucket}/specdraft")
    assert store.retry == RetryPolicy()  # default: 4 attempts, 0.25 s doubling, capped at 4 s
    proxy.fail_first = 3
    store.write_json("a/manifest.json", {"ok": 1})
    assert _direct(s3_bucket, proxy_upstream(proxy)).read_json("a/manifest.json") == {"ok": 1}
    # s3fs retries SlowDown itself (5 tries); the others reach the store's policy: 3 backoffs
    # that double (with jitter in [0.5, 1]).
    if code != "SlowDown":
        assert len(sleeps) == 3
        for n, s in enumerate(sleeps):
            assert 0.25 * 2**n * 0.5 <= s <= 0.25 * 2**n
    proxy.fail_first, proxy._count, sleeps[:] = 3, 0, []
    assert store.read_json("a/manifest.json") == {"ok": 1}
    assert proxy.failed >= 6


def test_transient_faults_past_the_bound_fail_naming_the_url(proxy, s3_bucket, sleeps, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = ObjectStore(f"{s3_bucket}/specdraft")
    proxy.fail_first = 1000
    t0 = time.time()
    with pytest.raises(StoreError) as err:
        store.read_bytes("x/manifest.json")
    message = str(err.value)
    assert f"{s3_bucket}/specdraft/x/manifest.json" in message and "after 4 attempts" in message
    assert len(sleeps) == 3 and time.time() - t0 < 10
    assert is_transient(err.value.__cause__)
    # Writes too: and nothing was stored.
    with pytest.raises(StoreError, match=r"writing s3://.*/specdraft/y/obj failed after 4 attempts"):
        store.write_bytes("y/obj", b"data")
    proxy.fail_first = 0
    assert not _direct(s3_bucket, proxy_upstream(proxy)).exists("y/obj")


def test_dropped_connections_are_retried(proxy, s3_bucket, sleeps):
    """The server closes the connection without answering (botocore's own retries on, the default)."""
    store = ObjectStore(f"{s3_bucket}/specdraft")
    proxy.drop_first = 4
    m = _write_artifact(store, "drop/_/fp", {"a.bin": b"a" * 1000, "b.json": b"{}"})
    assert m is not None and proxy.failed == 4
    verify_manifest(store, m)


def test_every_kth_request_failing_still_completes_artifacts(proxy, s3_bucket):
    """Every 3rd request answers 503 with the default settings: artifacts with streamed and whole
    parts, their manifests, listing, reading and verification all get through."""
    store = ObjectStore(f"{s3_bucket}/specdraft")
    proxy.fail_every = 3
    rng = random.Random(0)
    payload = {f"part-{i:05d}.bin": rng.randbytes(rng.randint(1, 300_000)) for i in range(4)}
    payload["meta.json"] = json.dumps({"n": 4}).encode()
    m = _write_artifact(store, "kth/_/fp", payload, streamed="part-00001.bin")
    assert m is not None and set(m.files) == set(payload)
    verify_manifest(store, m)
    for name, data in payload.items():
        assert store.read_bytes(m.key(name)) == data
    assert proxy.failed >= 10 and len(proxy.seen) >= 3 * proxy.failed
    assert store.list("kth/_") == ["kth/_/fp"]


def test_manifests_are_never_partial_under_random_faults(proxy, s3_bucket, monkeypatch):
    """Seeded random 503s and dropped connections on every request, fewer retries than faults can
    need: each write either completes (and verifies) or fails with StoreError; at no point does
    the server hold a manifest that is unreadable or names a file that differs from it."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = ObjectStore(f"{s3_bucket}/specdraft", retry=RetryPolicy(attempts=2, base_s=0.01))
    truth = _direct(s3_bucket, proxy_upstream(proxy))
    rng = random.Random(7)
    outcomes = []
    for k in range(12):
        proxy._count = 0
        proxy.fail_every = rng.choice((2, 3, 4))
        proxy.drop_first = rng.choice((0, 1))
        prefix = f"rand/_/fp{k}"
        payload = {"data.bin": rng.randbytes(50_000), "stats.json": b'{"rows": 1}'}
        try:
            _write_artifact(store, prefix, payload, streamed="data.bin" if k % 2 else None)
            outcomes.append("ok")
        except StoreError as exc:
            assert "s3://" in str(exc)
            outcomes.append("failed")
        m = truth.manifest(prefix)  # never raises "corrupt manifest"
        if m is not None:
            verify_manifest(truth, m)
            assert set(m.files) == set(payload)
        else:
            assert outcomes[-1] == "failed"
    assert "ok" in outcomes and "failed" in outcomes  # both paths were exercised
    # A rerun without faults completes every artifact that failed.
    proxy.fail_every = proxy.drop_first = 0
    for k, outcome in enumerate(outcomes):
        if outcome == "failed":
            _write_artifact(store, f"rand/_/fp{k}", {"data.bin": b"x" * 10, "stats.json": b"{}"})
        verify_manifest(truth, truth.manifest(f"rand/_/fp{k}"))


def proxy_upstream(p: FaultProxy) -> str:
    return f"http://127.0.0.1:{p.upstream_port}"


# -- the endpoint going away mid-write -----------------------------------------------------------------
def test_endpoint_away_mid_write_then_back_on_same_port(proxy, s3_bucket):
    """The proxy (the endpoint the store talks to) stops between two parts and listens again on the
    same port 1 s later: the retried writes get through and the artifact is complete."""
    store = ObjectStore(f"{s3_bucket}/specdraft", retry=RetryPolicy(attempts=8))
    prefix = "away/_/fp"
    restarted = threading.Event()

    def restart_later():
        time.sleep(1.0)
        proxy.start()
        restarted.set()

    with store.artifact(prefix, "fp") as w:
        w.write_bytes("part-0.bin", b"0" * 1000)
        proxy.stop()
        threading.Thread(target=restart_later, daemon=True).start()
        t0 = time.time()
        w.write_bytes("part-1.bin", b"1" * 1000)  # refused until the endpoint is back
        assert restarted.is_set() and time.time() - t0 >= 0.9
        w.write_json("stats.json", {"ok": True})
    m = store.manifest(prefix)
    assert m is not None and set(m.files) == {"part-0.bin", "part-1.bin", "stats.json"}
    verify_manifest(store, m)


@pytest.fixture
def own_moto(monkeypatch):
    """A moto server of this test alone (it gets killed), with one bucket."""
    server = S3Server()
    server.start()
    try:
        for k, v in S3_ENV.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        bucket = f"s3://faults-{uuid.uuid4().hex[:8]}"
        _make_bucket(server, bucket)
        yield server, bucket
    finally:
        server.stop()  # by its PID, also when the setup above failed


def test_server_killed_mid_write_fails_clearly_then_rerun_succeeds(own_moto):
    """moto SIGKILLed while an artifact is being written and restarted on the same port (in-memory,
    so its buckets are gone): the write fails with a StoreError naming the URL, within seconds;
    the attempt leaves no manifest; once the bucket is back, a rerun writes the artifact."""
    server, bucket = own_moto
    store = ObjectStore(f"{bucket}/specdraft")
    prefix = "killed/_/fp"
    t0 = None
    with pytest.raises(StoreError) as err:
        with store.artifact(prefix, "fp") as w:
            w.write_bytes("part-0.bin", b"0" * 1000)
            server.stop()  # SIGKILL
            threading.Timer(0.5, server.start).start()  # same port, fresh state
            t0 = time.time()
            w.write_bytes("part-1.bin", b"1" * 1000)
    took = time.time() - t0
    message = str(err.value)
    print(f"failed after {took:.1f}s: {message}")
    assert f"{bucket}/specdraft/{prefix}/attempt-" in message and "part-1.bin" in message
    assert took < 30, took
    _wait_until_up(server)
    assert store.manifest(prefix) is None  # (NoSuchBucket reads as "no object" here)
    _make_bucket(server, bucket)
    m = _write_artifact(store, prefix, {"part-0.bin": b"0" * 1000, "part-1.bin": b"1" * 1000})
    verify_manifest(store, m)
    attempt = m.files["part-0.bin"]["path"].split("/")[0]
    assert sorted(k.rsplit("/", 1)[-1] for k in store.list(prefix)) == sorted([attempt, "manifest.json"])


def _make_bucket(server, bucket: str) -> None:
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint}, skip_instance_cache=True).mkdir(bucket[5:])


def _wait_until_up(server, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(server.endpoint, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError("moto did not come back")


# -- wrong credentials ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_moto():
    """A moto server that enforces IAM auth: one user with S3 rights, one bucket, then auth on."""
    import boto3

    server = S3Server()
    server.start()
    try:
        kw = dict(endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="bootstrap",
                  aws_secret_access_key="bootstrap")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="specdraft")
        iam.put_user_policy(UserName="specdraft", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="specdraft")["AccessKey"]
        bucket = f"auth-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", **kw).create_bucket(Bucket=bucket)
        # From now on every request must be signed by a known key with the right secret.
        req = urllib.request.Request(f"{server.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()
        yield server, f"s3://{bucket}", key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.stop()


def _use(monkeypatch, server, key_id, secret):
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


def test_right_credentials_work_against_the_auth_server(auth_moto, monkeypatch):
    server, bucket, key_id, secret = auth_moto
    _use(monkeypatch, server, key_id, secret)
    store = ObjectStore(f"{bucket}/specdraft")
    m = _write_artifact(store, "ok/_/fp", {"a.bin": b"abc"}, streamed="a.bin")
    verify_manifest(store, m)


@pytest.mark.parametrize("which", ["wrong_secret", "unknown_key"])
def test_wrong_credentials_fail_fast_and_clearly(auth_moto, monkeypatch, sleeps, tmp_path, which):
    from training.corpus import CorpusError, read_source

    server, bucket, key_id, secret = auth_moto
    bad_secret = "WRONG-secret-" + uuid.uuid4().hex
    _use(monkeypatch, server, key_id if which == "wrong_secret" else "AKIAUNKNOWNKEY000000", bad_secret)
    store = ObjectStore(f"{bucket}/specdraft")
    t0 = time.time()
    for call, url in [
        (lambda: store.manifest("some/_/fp"), f"{bucket}/specdraft/some/_/fp/manifest.json"),
        (lambda: store.write_json("some/_/fp/manifest.json", {}), f"{bucket}/specdraft/some/_/fp/manifest.json"),
        (lambda: _write_artifact(store, "some/_/fp", {"a.bin": b"a"}), f"{bucket}/specdraft/some/_/fp/attempt-"),
    ]:
        with pytest.raises(StoreError) as err:
            call()
        message = str(err.value)
        assert url in message and "PermissionError" in message, message
        assert bad_secret not in message and secret not in message
    assert sleeps == [] and time.time() - t0 < 10  # a 403 is final: not retried

    # The corpus reader names the URL as well.
    with pytest.raises(CorpusError, match=rf"{bucket}/corpus/x.jsonl"):
        read_source(f"{bucket}/corpus/x.jsonl")
