"""mininp_segformer.hub against a hostile or broken hub, and a damaged cache.

The fake Hub of test_hub.py (http.server on 127.0.0.1) answers with redirects to local files, endless, lying or
trickling bodies; two processes download one checkpoint at once; names, cache directories and manifests are bad.
Whatever could hang runs under `bounded` (a SIGALRM timer) or a subprocess timeout, so that a regression fails
instead of hanging; the time limits (DEADLINE, RATE_WINDOW) are set small here so that the tests are quick.
"""

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mininp_segformer import hub
from mininp_segformer.tools import cli
from mininp_segformer.errors import CheckpointError, DownloadError
from tests.conftest import REPO_ROOT
from tests.test_hub import NAME, cache_files, checkpoint, fake_hub  # noqa: F401 (fixtures)

WEIGHTS = "model.safetensors"


class Hung(BaseException):
    """Raised by `bounded` in the code under test; not an Exception, so no `except` in the library swallows it."""


@contextlib.contextmanager
def bounded(seconds: float = 20.0):
    """Fail (raise Hung) if the block runs longer than `seconds`."""
    def alarm(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def send_head(handler, headers=(), status=200):
    handler.send_response(status)
    for key, value in headers:
        handler.send_header(key, value)
    handler.end_headers()


ENDLESS_BYTES = 64 << 20  # more than every cap; a client without caps fills no disk before the server gives up


def endless(handler):
    """A chunked body of zeros that does not end (before ENDLESS_BYTES; then the server hangs up, mid-chunk)."""
    send_head(handler, [("Transfer-Encoding", "chunked")])
    block = b"\0" * 65536
    for _ in range(ENDLESS_BYTES // len(block)):
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
    handler.close_connection = True


def trickle(headers_too: bool):
    """One byte every 0.2 s: of the body only, or of the status line and headers too."""
    def respond(handler):
        head, body = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x" * 1000
        data = head + body if headers_too else body
        if not headers_too:
            handler.wfile.write(head)
        for i in range(len(data)):
            if handler.hub.release.wait(0.2):
                return
            handler.wfile.write(data[i: i + 1])
    return respond


def assert_no_cache_entry(tmp_path):
    assert hub.cached_models() == []
    assert cache_files(tmp_path) == [], "a failed download must leave nothing in the cache but its lock file"


# ---------------------------------------------------------------------------------------------------------------
# 1. Redirects: http(s) only, at most MAX_REDIRECTS


def location(kind: str, checkpoint) -> tuple[str, str]:
    """(the file redirected, where to) for each kind of hostile redirect."""
    config = base64.b64encode(checkpoint["files"]["config.json"]).decode()
    return {
        "etc-passwd": (WEIGHTS, "file:///etc/passwd"),
        "dev-zero": (WEIGHTS, "file:///dev/zero"),
        "local-weights": (WEIGHTS, (checkpoint["dir"] / WEIGHTS).as_uri()),  # a "download" that would succeed
        "data-config": ("config.json", f"data:application/json;base64,{config}"),
        "ftp": (WEIGHTS, "ftp://127.0.0.1/model.safetensors"),
    }[kind]


@pytest.mark.parametrize("kind", ["etc-passwd", "dev-zero", "local-weights", "data-config", "ftp"])
def test_redirect_to_anything_but_http_is_refused(fake_hub, checkpoint, tmp_path, kind):
    filename, target = location(kind, checkpoint)
    fake_hub.add_model(NAME, checkpoint["files"], **{filename: {"redirect": target}})
    with bounded(), pytest.raises(DownloadError, match="redirected to .*not an http:// or https:// URL"):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)


def test_endpoint_must_be_http(fake_hub, checkpoint, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / NAME / "resolve" / "main"  # a file: "mirror" that urllib would happily read
    mirror.mkdir(parents=True)
    for filename, body in checkpoint["files"].items():
        (mirror / filename).write_bytes(body)
    monkeypatch.setenv("HF_ENDPOINT", (tmp_path / "mirror").as_uri())
    with pytest.raises(DownloadError, match="HF_ENDPOINT gives 'file:.*not an http:// or https:// URL"):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)


def test_redirect_loop_stops_after_max_redirects(fake_hub, checkpoint, tmp_path):
    config_path = f"/{NAME}/resolve/main/config.json"
    fake_hub.add_model(NAME, checkpoint["files"], **{"config.json": {"redirect": config_path}})
    with bounded(), pytest.raises(DownloadError, match=r"more than \d+ redirects"):
        hub.resolve(NAME, progress=False)
    assert fake_hub.paths().count(config_path) == hub.MAX_REDIRECTS + 1
    assert_no_cache_entry(tmp_path)


def test_max_redirects_are_followed(fake_hub, checkpoint):
    hops = [f"/cdn/{i}" for i in range(hub.MAX_REDIRECTS)]
    fake_hub.add_model(NAME, checkpoint["files"], **{WEIGHTS: {"redirect": hops[0]}})
    for here, there in zip(hops, hops[1:]):
        fake_hub.routes[here] = dict(redirect=there)
    fake_hub.routes[hops[-1]] = dict(body=checkpoint["files"][WEIGHTS])
    path = hub.resolve(NAME, progress=False)
    assert (path / WEIGHTS).read_bytes() == checkpoint["files"][WEIGHTS]


# ---------------------------------------------------------------------------------------------------------------
# 2. Sizes: no more than announced, nor than the cap when nothing is announced


def test_endless_config_is_cut_at_the_json_cap(fake_hub, checkpoint, tmp_path):
    fake_hub.add_model(NAME, checkpoint["files"], **{"config.json": {"respond": endless}})
    with bounded(), pytest.raises(DownloadError, match=r"more than [0-9,]+ bytes \(the cap\)"):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)


def test_endless_weights_are_cut_at_the_weights_cap(fake_hub, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "MAX_WEIGHTS_BYTES", 1 << 20, raising=False)
    fake_hub.add_model(NAME, checkpoint["files"], **{WEIGHTS: {"respond": endless}})
    with bounded(), pytest.raises(DownloadError, match=f"more than {1 << 20:,} bytes"):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)


def test_endless_weights_are_cut_at_the_announced_size(fake_hub, checkpoint, tmp_path):
    size = len(checkpoint["files"][WEIGHTS])
    fake_hub.add_model(NAME, checkpoint["files"], **{WEIGHTS: {
        "redirect": "/cdn/blob", "headers": {"X-Linked-Size": str(size)}}})
    fake_hub.routes["/cdn/blob"] = dict(respond=endless)
    with bounded(), pytest.raises(DownloadError, match=f"more than the {size:,} bytes it announced"):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)


def test_huge_content_length_is_refused_before_reading(fake_hub, checkpoint, tmp_path):
    def huge(handler):
        send_head(handler, [("Content-Length", str(10 ** 12))])
        for _ in range(ENDLESS_BYTES // 65536):
            handler.wfile.write(b"\0" * 65536)
        handler.close_connection = True

    fake_hub.add_model(NAME, checkpoint["files"], **{"config.json": {"respond": huge}})
    with bounded(), pytest.raises(DownloadError, match="announces 1,000,000,000,000 bytes"):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)


@pytest.mark.parametrize("extra", [1000, -1000], ids=["longer", "shorter"])
def test_lying_content_length_is_caught(fake_hub, checkpoint, tmp_path, extra):
    """The hub's redirect announces the true size; the CDN's Content-Length says more (and then holds the
    connection open) or less (and sends the whole file anyway)."""
    weights = checkpoint["files"][WEIGHTS]

    def lying(handler):
        send_head(handler, [("Content-Length", str(len(weights) + extra))])
        handler.wfile.write(weights)
        handler.hub.release.wait(30)

    fake_hub.add_model(NAME, checkpoint["files"], **{WEIGHTS: {
        "redirect": "/cdn/blob", "headers": {"X-Linked-Size": str(len(weights))}}})
    fake_hub.routes["/cdn/blob"] = dict(respond=lying)
    with bounded(), pytest.raises(DownloadError, match=f"announced {len(weights)} bytes .X-Linked-Size. but the "
                                                       f"server sends {len(weights) + extra} .Content-Length."):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)


def test_malformed_content_length_is_ignored(fake_hub, checkpoint):
    """'²' passes str.isdigit() but not int(): the body is then read to the end of the connection."""
    config = checkpoint["files"]["config.json"]

    def superscript(handler):
        send_head(handler, [("Content-Length", "²"), ("Connection", "close")])
        handler.wfile.write(config)
        handler.close_connection = True

    fake_hub.add_model(NAME, checkpoint["files"], **{"config.json": {"respond": superscript}})
    path = hub.resolve(NAME, progress=False)
    assert (path / "config.json").read_bytes() == config


# ---------------------------------------------------------------------------------------------------------------
# 3. Time: an overall deadline and a minimum rate, headers included


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers"])
def test_trickle_is_cut_off_at_the_deadline(fake_hub, checkpoint, tmp_path, monkeypatch, headers_too):
    monkeypatch.setattr(hub, "DEADLINE", 1.0, raising=False)
    fake_hub.add_model(NAME, checkpoint["files"], **{"config.json": {"respond": trickle(headers_too)}})
    with bounded(), pytest.raises(DownloadError, match=r"cut off: it took longer than 1 s .*hub.DEADLINE"):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)


def test_trickle_is_cut_off_below_the_minimum_rate(fake_hub, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "MIN_BYTES_PER_SECOND", 1000, raising=False)
    monkeypatch.setattr(hub, "RATE_WINDOW", 0.5, raising=False)
    fake_hub.add_model(NAME, checkpoint["files"], **{WEIGHTS: {"respond": trickle(headers_too=False)}})
    with bounded(), pytest.raises(DownloadError, match=r"fewer than 1,000 bytes/s .*MIN_BYTES_PER_SECOND"):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 4. Two processes, one checkpoint


def test_two_processes_download_one_checkpoint(fake_hub, checkpoint, tmp_path):
    """The first process is held in the middle of the weights until the second one is waiting for the lock (or,
    without a lock, has started its own download); both must end with the same verified copy."""
    weights, config = checkpoint["files"][WEIGHTS], checkpoint["files"]["config.json"]
    halfway, go_on = threading.Event(), threading.Event()

    def serve_config(handler):
        if sum(p.endswith("/config.json") for p in fake_hub.paths()) > 1:
            go_on.set()  # a second download under way (no lock): let the first one finish now
        send_head(handler, [("Content-Length", str(len(config)))])
        handler.wfile.write(config)

    def serve_weights(handler):
        send_head(handler, [("Content-Length", str(len(weights)))])
        handler.wfile.write(weights[: len(weights) // 2])
        halfway.set()
        go_on.wait(60)
        handler.wfile.write(weights[len(weights) // 2:])

    fake_hub.add_model(NAME, checkpoint["files"], **{"config.json": {"respond": serve_config},
                                                     WEIGHTS: {"respond": serve_weights}})
    script = "import sys; from mininp_segformer import hub; print(hub.resolve(sys.argv[1]))"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MININP_SEGFORMER_THREADS="1")

    def start():
        return subprocess.Popen([sys.executable, "-c", script, NAME], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)

    second_err = []

    def read_second(stream):
        for line in stream:
            second_err.append(line)
            if line.startswith("Waiting for another process"):
                go_on.set()

    first = start()
    second = None
    try:
        assert halfway.wait(120), "the first process never asked for the weights"
        second = start()
        reader = threading.Thread(target=read_second, args=(second.stderr,), daemon=True)
        reader.start()
        out1, err1 = first.communicate(timeout=120)
        out2 = second.stdout.read()
        second.wait(timeout=120)
        reader.join(10)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
    err2 = "".join(second_err)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert out1.strip() == out2.strip() == str(hub.cache_dir(NAME))
    assert "Waiting for another process that is downloading" in err2
    assert sum(p.endswith(WEIGHTS) for p in fake_hub.paths()) == 1, "the second process must reuse the first's copy"
    assert hub.resolve(NAME, progress=False) == hub.cache_dir(NAME)
    assert [(c.name, c.complete) for c in hub.cached_models()] == [(NAME, True)]
    assert not [f for f in cache_files(tmp_path) if ".incomplete" in f]


# ---------------------------------------------------------------------------------------------------------------
# 5. A failed download leaves no cache entry


@pytest.mark.parametrize("failure", ["unknown model", "weights error 500"])
def test_failed_download_leaves_no_cache_entry(fake_hub, checkpoint, tmp_path, capsys, failure):
    if failure == "weights error 500":
        fake_hub.add_model(NAME, checkpoint["files"], **{WEIGHTS: {"status": 500}})
    with pytest.raises(DownloadError, match="HTTP 404" if failure == "unknown model" else "HTTP 500"):
        hub.resolve(NAME, progress=False)
    assert_no_cache_entry(tmp_path)
    assert cli.main(["models"]) == 0
    assert NAME not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# 6. Names are checked before anything touches the disk


@pytest.mark.parametrize("name", ["../../../etc", "/etc", "acme/../../etc", "acme/model-", "acme/.hidden",
                                  "acme/model.git", "acme/" + "m" * 97, "acme/mödel"])
def test_download_refuses_what_is_not_a_hub_name(fake_hub, tmp_path, capsys, name):
    with pytest.raises(SystemExit) as info:
        cli.main(["download", name])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "not a valid Hub model name" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match="not a valid Hub model name"):
        hub.check_hub_name(name)
    assert not (tmp_path / "cache").exists() and fake_hub.requests == []


def test_download_checks_the_revision_too(fake_hub, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["download", NAME, "--revision", "../../etc"])
    assert info.value.code == 2
    assert not (tmp_path / "cache").exists() and fake_hub.requests == []


def test_valid_hub_names():
    for name in ("nvidia/mit-b0", "a/b", "_x/y_", "acme/model.v2", "o/" + "m" * 96):
        hub.check_hub_name(name)


# ---------------------------------------------------------------------------------------------------------------
# 7. A damaged cache: clean errors naming the path and the fix


DAMAGED_MANIFESTS = {
    "nested 200k deep": b"[" * 200_000 + b"]" * 200_000,
    "not UTF-8": b'{"files": {"config.json": {"size": 1, "sha256": "\xff\xfe"}}}',
    "fields of the wrong type": json.dumps({"name": 5, "revision": ["x"], "files": {
        "config.json": {"size": 1, "sha256": "0"}}}).encode(),
    "listing another file": json.dumps({"files": {"config.json": {}, "model.safetensors": {},
                                                  "../../../../etc/passwd": {}}}).encode(),
}


@pytest.mark.parametrize("kind", list(DAMAGED_MANIFESTS))
def test_damaged_manifest(fake_hub, checkpoint, monkeypatch, capsys, kind):
    entry = hub.cache_dir(NAME)
    entry.mkdir(parents=True)
    for filename, body in checkpoint["files"].items():
        (entry / filename).write_bytes(body)
    (entry / hub.MANIFEST_NAME).write_bytes(DAMAGED_MANIFESTS[kind])

    [cached] = hub.cached_models()
    assert (cached.name, cached.revision, cached.path, cached.complete) == (NAME, "main", entry, False)
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}" in out and "Incomplete or damaged" in out and str(entry) in out

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match=f"cached copy in {entry} is incomplete or damaged .delete it."):
        hub.resolve(NAME, progress=False)

    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, the entry is downloaded again and replaced
    fake_hub.add_model(NAME, checkpoint["files"])
    assert hub.resolve(NAME, progress=False) == entry
    assert [(c.name, c.complete) for c in hub.cached_models()] == [(NAME, True)]


@pytest.fixture
def unwritable(tmp_path):
    """A directory this process cannot create anything in (as root, which ignores permissions: one in sysfs)."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    if os.access(directory, os.W_OK):
        directory = Path("/sys/mininp-segformer-cache")
        if not Path("/sys/kernel").is_dir():
            pytest.skip("running as root without a sysfs: no unwritable directory to test with")
    yield directory
    (tmp_path / "read-only").chmod(0o755)


def test_unwritable_cache_is_a_clear_error(fake_hub, checkpoint, monkeypatch, unwritable):
    fake_hub.add_model(NAME, checkpoint["files"])
    monkeypatch.setenv("MININP_SEGFORMER_HOME", str(unwritable))
    with pytest.raises(DownloadError, match=f"could not write to the model cache: {unwritable}.*"
                                            "set MININP_SEGFORMER_HOME to a writable directory"):
        hub.resolve(NAME, progress=False)


def test_cache_home_that_is_a_file_is_a_clear_error(fake_hub, checkpoint, monkeypatch, tmp_path, capsys):
    home = tmp_path / "not-a-directory"
    home.write_text("a file")
    fake_hub.add_model(NAME, checkpoint["files"])
    monkeypatch.setenv("MININP_SEGFORMER_HOME", str(home))
    with pytest.raises(DownloadError, match=f"could not write to the model cache: {home}.*Not a directory.*"
                                            "MININP_SEGFORMER_HOME"):
        hub.resolve(NAME, progress=False)
    assert cli.main(["download", NAME]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "MININP_SEGFORMER_HOME" in err
    assert home.read_text() == "a file"
