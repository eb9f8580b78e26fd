"""mininp_segformer.hub against a fake Hub: http.server on 127.0.0.1 serving a tiny synthetic checkpoint.

Every test points HF_ENDPOINT at the local server (or at a closed local port) and MININP_SEGFORMER_HOME at a
temporary directory, so nothing here touches the network or the user's cache.
"""

import hashlib
import http.server
import io
import json
import socket
import threading

import numpy as np
import pytest

from mininp_segformer import hub
from mininp_segformer.config import variant_config
from mininp_segformer.weights import CheckpointError, load_checkpoint, random_state_dict, save_checkpoint

NAME = "acme/segformer-tiny"
PREPROCESSOR = json.dumps({"image_processor_type": "SegformerImageProcessor", "size": {"height": 64, "width": 64}})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The bytes of a real b0 checkpoint with 3 labels, and of a mismatched one (5 labels)."""
    root = tmp_path_factory.mktemp("ckpt")
    config = variant_config("b0", num_labels=3)
    save_checkpoint(root / "good", config, random_state_dict(config, seed=0))
    other = variant_config("b0", num_labels=5)
    save_checkpoint(root / "other", other, random_state_dict(other, seed=1))
    good = {f: (root / "good" / f).read_bytes() for f in ("config.json", "model.safetensors")}
    good["preprocessor_config.json"] = PREPROCESSOR.encode()
    return {"files": good, "other_weights": (root / "other" / "model.safetensors").read_bytes(), "dir": root / "good"}


class FakeHub:
    """Routes URL paths to canned answers and records every request (path, headers)."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        self.release = threading.Event()  # lets "hang" routes finish at teardown
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def add_model(self, name, files, revision="main", **options):
        rev = revision.replace("/", "%2F")
        for filename, body in files.items():
            self.routes[f"/{name}/resolve/{rev}/{filename}"] = dict(body=body, **options.get(filename, {}))

    def error_code(self, path):
        """What the Hub's X-Error-Code says for a missing /owner/model/resolve/revision/file."""
        repo, _, rest = path.partition("/resolve/")
        revision = rest.rsplit("/", 1)[0]
        if not any(p.startswith(repo + "/resolve/") for p in self.routes):
            return "RepoNotFound"
        if not any(p.startswith(f"{repo}/resolve/{revision}/") for p in self.routes):
            return "RevisionNotFound"
        return "EntryNotFound"

    def paths(self):
        return [path for path, _ in self.requests]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.hub.requests.append((self.path, dict(self.headers)))
        route = self.hub.routes.get(self.path)
        if route is None:
            return self._answer(404, b"not found", {"X-Error-Code": self.hub.error_code(self.path)})
        if route.get("hang"):
            self.hub.release.wait(20)
            return
        if route.get("respond"):  # a hand-written (hostile) answer: respond(handler) writes it
            try:
                route["respond"](self)
            except OSError:  # the client hung up
                self.close_connection = True
            return
        if route.get("status"):
            return self._answer(route["status"], b"no", route.get("headers", {}))
        if route.get("redirect"):
            return self._answer(302, b"", {"Location": route["redirect"], **route.get("headers", {})})
        body = route["body"]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        for key, value in route.get("headers", {}).items():
            self.send_header(key, value)
        self.end_headers()
        if route.get("truncate"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _answer(self, status, body, headers):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("MININP_SEGFORMER_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.close()


def cache_files(tmp_path):
    """The files in the test's cache, without the lock files (<home>/.locks/*.lock stay, by design)."""
    root = tmp_path / "cache"
    files = (str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else ()
    return sorted(f for f in files if not f.startswith(".locks/"))


# ---------------------------------------------------------------------------------------------------------------


def test_download_verifies_records_and_caches(fake_hub, checkpoint, tmp_path):
    fake_hub.add_model(NAME, checkpoint["files"])
    path = hub.resolve(NAME, progress=False)

    assert path == tmp_path / "cache" / "acme--segformer-tiny" / "main"
    for filename, body in checkpoint["files"].items():
        assert (path / filename).read_bytes() == body
    manifest = json.loads((path / hub.MANIFEST_NAME).read_text())
    assert manifest["name"] == NAME and manifest["revision"] == "main"
    for filename, body in checkpoint["files"].items():
        assert manifest["files"][filename] == {"sha256": sha256(body), "size": len(body)}
    config, head, state = load_checkpoint(path)
    assert config.num_labels == 3 and head == "SegformerForSemanticSegmentation"
    assert not list(path.glob(".*")), "temporary files left behind"

    n = len(fake_hub.requests)
    assert n == 3
    assert hub.resolve(NAME, progress=False) == path
    assert len(fake_hub.requests) == n, "a verified cached copy must not touch the network"

    [entry] = hub.cached_models()
    assert (entry.name, entry.revision, entry.path, entry.complete) == (NAME, "main", path, True)
    assert entry.size >= sum(len(b) for b in checkpoint["files"].values())


def test_revision_goes_into_the_url_and_the_cache_path(fake_hub, checkpoint, tmp_path):
    fake_hub.add_model(NAME, checkpoint["files"], revision="refs/pr/1")
    path = hub.resolve(NAME, revision="refs/pr/1", progress=False)
    assert path == tmp_path / "cache" / "acme--segformer-tiny" / "refs--pr--1"
    assert all("/resolve/refs%2Fpr%2F1/" in p for p in fake_hub.paths())
    assert hub.cached_models()[0].revision == "refs/pr/1"
    with pytest.raises(hub.DownloadError, match="has no revision 'v2'"):
        hub.resolve(NAME, revision="v2", progress=False)


def test_missing_preprocessor_config_is_fine(fake_hub, checkpoint):
    files = {k: v for k, v in checkpoint["files"].items() if k != "preprocessor_config.json"}
    fake_hub.add_model(NAME, files)
    path = hub.resolve(NAME, progress=False)
    assert not (path / "preprocessor_config.json").exists()
    assert set(json.loads((path / hub.MANIFEST_NAME).read_text())["files"]) == {"config.json", "model.safetensors"}


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(fake_hub, checkpoint, monkeypatch):
    fake_hub.add_model(NAME, checkpoint["files"])
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    hub.resolve(NAME, progress=True)
    out = terminal.getvalue()
    assert "model.safetensors" in out and "100%" in out and "B/s" in out  # tqdm's bar, redrawn in place
    assert "\r" in out and out.endswith("\n")


def test_progress_in_a_log_is_one_line_per_file(fake_hub, checkpoint, capsys):
    fake_hub.add_model(NAME, checkpoint["files"])
    hub.resolve(NAME, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith(f"Downloading {NAME}")
    assert [line.split(":")[0] for line in lines[1:]] == ["config.json", "preprocessor_config.json",
                                                          "model.safetensors"]
    assert all(" 100%|##########| " in line and "B/s]" in line for line in lines[1:])  # the finished bar


def test_no_progress_output_when_disabled(fake_hub, checkpoint, capsys):
    fake_hub.add_model(NAME, checkpoint["files"])
    hub.resolve(NAME, progress=False)
    assert capsys.readouterr().err == ""


def test_unknown_model_is_a_clear_404(fake_hub, tmp_path):
    with pytest.raises(hub.DownloadError, match=r"no model 'acme/nope'.*HTTP 404") as info:
        hub.resolve("acme/nope", progress=False)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not any(f.endswith(hub.MANIFEST_NAME) for f in cache_files(tmp_path))


def test_missing_weights_file_names_the_file(fake_hub, checkpoint):
    fake_hub.add_model(NAME, {"config.json": checkpoint["files"]["config.json"]})
    with pytest.raises(hub.DownloadError, match=r"has no model\.safetensors.*pytorch_model\.bin"):
        hub.resolve(NAME, progress=False)


@pytest.mark.parametrize("status, match", [(401, "HTTP 401.*private or gated"), (403, "HTTP 403.*gated or private")])
def test_unauthorized_and_forbidden(fake_hub, status, match):
    fake_hub.routes[f"/{NAME}/resolve/main/config.json"] = dict(status=status)
    with pytest.raises(hub.DownloadError, match=match):
        hub.resolve(NAME, progress=False)


def test_corrupt_weights_fail_and_are_not_trusted(fake_hub, checkpoint, tmp_path):
    files = dict(checkpoint["files"], **{"model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"})
    fake_hub.add_model(NAME, files)
    with pytest.raises(CheckpointError, match="strict check") as info:
        hub.resolve(NAME, progress=False)
    assert "not a valid safetensors file" in str(info.value)
    assert cache_files(tmp_path) == [], "a checkpoint that fails the strict load must be removed"


def test_weights_of_another_model_fail_then_a_fixed_server_is_used(fake_hub, checkpoint, tmp_path):
    fake_hub.add_model(NAME, dict(checkpoint["files"], **{"model.safetensors": checkpoint["other_weights"]}))
    with pytest.raises(CheckpointError, match="does not match its config"):
        hub.resolve(NAME, progress=False)
    assert not (hub.cache_dir(NAME) / hub.MANIFEST_NAME).exists()

    fake_hub.add_model(NAME, checkpoint["files"])
    path = hub.resolve(NAME, progress=False)
    assert (path / "model.safetensors").read_bytes() == checkpoint["files"]["model.safetensors"]


def test_announced_sha256_is_checked(fake_hub, checkpoint, tmp_path):
    wrong = {"headers": {"X-Linked-Etag": f'"{sha256(b"something else")}"'}}
    fake_hub.add_model(NAME, checkpoint["files"], **{"model.safetensors": wrong})
    with pytest.raises(hub.DownloadError, match="sha256"):
        hub.resolve(NAME, progress=False)
    path = hub.cache_dir(NAME)
    assert not (path / "model.safetensors").exists()
    assert not (path / hub.MANIFEST_NAME).exists()
    assert not list(path.glob(".*.part"))


def test_redirect_carries_the_sha256_and_the_token_stays_on_the_hub(fake_hub, checkpoint, monkeypatch):
    weights = checkpoint["files"]["model.safetensors"]
    cdn = fake_hub.url.replace("127.0.0.1", "localhost") + "/cdn/blob"  # another host name, still loopback
    fake_hub.add_model(NAME, checkpoint["files"], **{"model.safetensors": {
        "redirect": cdn, "headers": {"X-Linked-Etag": f'"{sha256(weights)}"'}}})
    fake_hub.routes["/cdn/blob"] = dict(body=weights, headers={"ETag": '"an-md5-like-tag"'})
    monkeypatch.setenv("HF_TOKEN", "hf_secret")

    path = hub.resolve(NAME, progress=False)
    assert (path / "model.safetensors").read_bytes() == weights
    auth = {p: h.get("Authorization") for p, h in fake_hub.requests}
    assert auth[f"/{NAME}/resolve/main/config.json"] == "Bearer hf_secret"
    assert auth["/cdn/blob"] is None

    # The same redirect with a sha256 that does not match what the CDN serves is caught.
    fake_hub.routes["/cdn/blob"] = dict(body=weights[:-1] + b"\x00")
    fake_hub.add_model("acme/other", checkpoint["files"], **{"model.safetensors": {
        "redirect": cdn, "headers": {"X-Linked-Etag": f'"{sha256(weights)}"'}}})
    with pytest.raises(hub.DownloadError, match="arrived damaged"):
        hub.resolve("acme/other", progress=False)


def test_partial_download_leaves_nothing_at_the_final_path(fake_hub, checkpoint, tmp_path):
    fake_hub.add_model(NAME, checkpoint["files"], **{"model.safetensors": {"truncate": True}})
    with pytest.raises(hub.DownloadError, match="cut short|interrupted"):
        hub.resolve(NAME, progress=False)
    assert not hub.cache_dir(NAME).parent.exists(), "a failed download leaves no cache entry"
    assert hub.cached_models() == [] and cache_files(tmp_path) == []


def test_corrupted_cache_is_downloaded_again(fake_hub, checkpoint):
    fake_hub.add_model(NAME, checkpoint["files"])
    path = hub.resolve(NAME, progress=False)
    assert hub.is_verified(path) and hub.is_verified(str(path))
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content: only the sha256 notices
    weights.write_bytes(bytes(data))
    assert not hub.is_verified(path)
    n = len(fake_hub.requests)
    assert hub.resolve(NAME, progress=False) == path
    assert len(fake_hub.requests) > n
    assert weights.read_bytes() == checkpoint["files"]["model.safetensors"] and hub.is_verified(path)


def test_failed_redownload_leaves_the_entry_untrusted(fake_hub, checkpoint):
    fake_hub.add_model(NAME, checkpoint["files"])
    path = hub.resolve(NAME, progress=False)
    (path / "model.safetensors").write_bytes(b"damaged")
    fake_hub.routes[f"/{NAME}/resolve/main/model.safetensors"] = dict(status=500)
    with pytest.raises(hub.DownloadError, match="HTTP 500"):
        hub.resolve(NAME, progress=False)
    assert not (path / hub.MANIFEST_NAME).exists()
    assert not hub.cached_models()[0].complete


def test_not_segformer_config_is_rejected_before_the_weights(fake_hub):
    fake_hub.add_model(NAME, {"config.json": json.dumps({"model_type": "bert"}).encode(), "model.safetensors": b"x"})
    with pytest.raises(CheckpointError, match="not a SegFormer checkpoint"):
        hub.resolve(NAME, progress=False)
    assert not any("model.safetensors" in p for p in fake_hub.paths())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MININP_SEGFORMER_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(hub.DownloadError) as info:
        hub.resolve("nvidia/segformer-b0-finetuned-ade-512-512", progress=False)
    message = str(info.value)
    assert "could not reach the model hub" in message and "connection refused" in message
    assert "mininp_segformer.load('/path/to/dir')" in message
    assert "/nvidia/segformer-b0-finetuned-ade-512-512" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_hub_that_never_answers_times_out(fake_hub, monkeypatch):
    monkeypatch.setattr(hub, "TIMEOUT", 0.5)
    fake_hub.routes[f"/{NAME}/resolve/main/config.json"] = dict(hang=True)
    with pytest.raises(hub.DownloadError, match="could not reach.*no answer within 0.5 s"):
        hub.resolve(NAME, progress=False)


def test_hf_hub_offline_never_downloads(fake_hub, checkpoint, monkeypatch):
    fake_hub.add_model(NAME, checkpoint["files"])
    hub.resolve(NAME, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve(NAME, progress=False) == hub.cache_dir(NAME)  # the verified cache still works
    with pytest.raises(hub.DownloadError, match="HF_HUB_OFFLINE"):
        hub.resolve("acme/never-downloaded", progress=False)
    assert len(fake_hub.requests) == 3


def test_local_directory_passes_through(fake_hub, checkpoint, monkeypatch):
    directory = checkpoint["dir"]
    assert hub.resolve(str(directory)) == directory
    assert hub.resolve(directory) == directory
    monkeypatch.chdir(directory.parent)
    assert hub.resolve(directory.name) == directory.relative_to(directory.parent)
    assert fake_hub.requests == []


@pytest.mark.parametrize("given", ["./no/such/dir", "~/no-such-mininp-dir", "no/such/dir", "/no/such/dir"])
def test_missing_local_path_is_named(fake_hub, given):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        hub.resolve(given)
    assert given in str(info.value)
    assert fake_hub.requests == []


def test_a_file_is_not_a_checkpoint_directory(fake_hub, checkpoint):
    with pytest.raises(CheckpointError, match="is a file"):
        hub.resolve(str(checkpoint["dir"] / "model.safetensors"))


@pytest.mark.parametrize("name", ["acme/", "acme/bad name", "acme--x/model", "-acme/model", "acme/a..b"])
def test_invalid_hub_names(fake_hub, name):
    with pytest.raises(CheckpointError, match="not a valid Hub model name"):
        hub.resolve(name)
    assert fake_hub.requests == []


def test_invalid_revision(fake_hub):
    with pytest.raises(CheckpointError, match="not a valid revision"):
        hub.resolve(NAME, revision="../../etc")


def test_bundled_models_and_short_names(fake_hub, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "BUNDLED_DIR", checkpoint["dir"].parent)
    assert hub.resolve("good") == checkpoint["dir"]
    assert "good" in hub.bundled_models()
    with pytest.raises(CheckpointError, match="Did you mean 'nvidia/segformer-b0-finetuned-ade-512-512'"):
        hub.resolve("segformer-b0-finetuned-ade-512-512")
    monkeypatch.setattr(hub, "BUNDLED_DIR", tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="demo model 'segformer-b0-shapes'"):
        hub.resolve("segformer-b0-shapes")
    assert fake_hub.requests == []


def test_known_checkpoints_table():
    known = hub.KNOWN_CHECKPOINTS
    assert "nvidia/segformer-b5-finetuned-ade-640-640" in known
    assert "nvidia/segformer-b5-finetuned-ade-512-512" not in known
    assert "nvidia/segformer-b0-finetuned-cityscapes-512-1024" in known
    assert sum(k.startswith("nvidia/mit-b") for k in known) == 6
    assert sum("cityscapes-1024-1024" in k for k in known) == 6
    for name, info in known.items():
        assert set(info) >= {"description", "task", "num_labels", "input_size", "licence"}
        if "/" in name:
            hub.check_hub_name(name)
            assert "non-commercial" in info["licence"] and not info["bundled"]
    assert known["segformer-b0-shapes"]["bundled"]
    assert np.prod(known["nvidia/segformer-b2-finetuned-cityscapes-1024-1024"]["input_size"]) == 1024 * 1024


def test_load_by_hub_name_goes_through_the_cache(fake_hub, checkpoint):
    import mininp_segformer as ms

    fake_hub.add_model(NAME, checkpoint["files"])
    model = ms.load(NAME)
    assert len(model.id2label) == 3
    n = len(fake_hub.requests)
    ms.load(NAME)
    assert len(fake_hub.requests) == n


def test_empty_name(fake_hub):
    with pytest.raises(CheckpointError, match="empty checkpoint name"):
        hub.resolve("")
