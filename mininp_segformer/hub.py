"""Where checkpoints come from: a local directory, the bundled demo model, or the Hugging Face Hub (cached).

    resolve("path/to/checkpoint")                        -> that directory, as it is
    resolve("segformer-b0-shapes")                       -> mininp_segformer/bundled/segformer-b0-shapes (demo)
    resolve("nvidia/segformer-b0-finetuned-ade-512-512") -> <cache>/nvidia--segformer-b0-finetuned-ade-512-512/main

A Hub download fetches `config.json`, `preprocessor_config.json` (when the model has one) and `model.safetensors`
from `{endpoint}/{owner}/{model}/resolve/{revision}/{file}` with the standard library's urllib, into a directory of
its own next to the cache entry (`.<revision>.<random>.incomplete`). Each file is streamed there while its sha256 is
computed, checked against the byte count and the sha256 the server announces, and fsync'ed. Once a strict load
(`weights.load_checkpoint`) has passed, `manifest.json` records every file's sha256 and the directory is renamed
to the entry, so an entry is either complete or absent; later calls re-hash the files against the manifest instead
of going to the network. A lock file per model (<home>/.locks) makes a second process wait for the first.

The server is not trusted: only http(s) URLs and at most MAX_REDIRECTS redirects are followed; a file may not be
larger than announced (X-Linked-Size, Content-Length) nor, unannounced, than MAX_JSON_BYTES / MAX_WEIGHTS_BYTES;
a download taking longer than DEADLINE, or slower than MIN_BYTES_PER_SECOND over RATE_WINDOW, is cut off.

Environment variables:
    MININP_SEGFORMER_HOME  cache directory (default ~/.cache/mininp_segformer)
    HF_ENDPOINT            the hub or a mirror (default https://huggingface.co)
    HF_TOKEN               access token for gated/private models, sent to the endpoint's host only
    HF_HUB_OFFLINE=1       never download; only local directories, the bundled model and the cache resolve
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .config import SegformerConfig
from .errors import CheckpointError, ConfigError, DownloadError
from .weights import CONFIG_NAME, PREPROCESSOR_NAME, WEIGHTS_NAME, fsync_dir, load_checkpoint

try:
    import fcntl  # the download lock (Linux, macOS)
except ImportError:  # Windows: downloads go ahead unlocked, see _download_lock
    fcntl = None

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST_NAME = "manifest.json"
# The project's own models: in the source tree a link to weights/<name>, in an installed wheel a copy.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
CHECKPOINT_FILES = (CONFIG_NAME, PREPROCESSOR_NAME, WEIGHTS_NAME)  # downloaded in this order
TIMEOUT = 30.0  # seconds a connect or a read may stall before the download is given up
DEADLINE = 3600.0  # seconds one file's download may take in all, from the request to the last byte
MIN_BYTES_PER_SECOND = 10_000  # a download slower than this over RATE_WINDOW seconds is cut off
RATE_WINDOW = 60.0
MAX_REDIRECTS = 5
MAX_JSON_BYTES = 4 << 20  # config.json, preprocessor_config.json, manifest.json: a few kB in practice
MAX_WEIGHTS_BYTES = 2 << 30  # weights whose size nobody announces; B5 in float32 is 0.34 GB
CHUNK_BYTES = 1 << 20
USER_AGENT = "mininp_segformer (urllib)"
# What a failed connection or exchange raises (urllib wraps socket errors in URLError; http.client's are no OSError)
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)

NVIDIA_LICENCE = "NVIDIA Source Code License for SegFormer: non-commercial, research or evaluation use only"
PROJECT_LICENCE = "Apache-2.0 (this project's licence)"


# ---------------------------------------------------------------------------------------------------------------
# The checkpoints this project knows


def _entry(description, task, dataset, num_labels, input_size, licence, bundled=False) -> dict:
    return dict(description=description, task=task, dataset=dataset, num_labels=num_labels,
                input_size=input_size, licence=licence, bundled=bundled)


def _known_checkpoints() -> dict[str, dict]:
    table = {}
    for v in ("b0", "b1", "b2", "b3", "b4", "b5"):
        side = 640 if v == "b5" else 512
        table[f"nvidia/segformer-{v}-finetuned-ade-{side}-{side}"] = _entry(
            f"SegFormer-{v.upper()} fine-tuned on ADE20K", "semantic-segmentation", "ADE20K", 150, (side, side),
            NVIDIA_LICENCE)
    for v in ("b0", "b1", "b2", "b3", "b4", "b5"):
        table[f"nvidia/segformer-{v}-finetuned-cityscapes-1024-1024"] = _entry(
            f"SegFormer-{v.upper()} fine-tuned on Cityscapes", "semantic-segmentation", "Cityscapes", 19,
            (1024, 1024), NVIDIA_LICENCE)
    table["nvidia/segformer-b0-finetuned-cityscapes-512-1024"] = _entry(
        "SegFormer-B0 fine-tuned on Cityscapes at half resolution", "semantic-segmentation", "Cityscapes", 19,
        (512, 1024), NVIDIA_LICENCE)
    for v in ("b0", "b1", "b2", "b3", "b4", "b5"):
        table[f"nvidia/mit-{v}"] = _entry(
            f"MiT-{v.upper()} encoder trained on ImageNet-1k (the backbone the SegFormers start from)",
            "image-classification", "ImageNet-1k", 1000, (224, 224), NVIDIA_LICENCE)
    table["segformer-b0-shapes"] = _entry(
        "the project's demo model: SegFormer-B0 trained on synthetic shapes, bundled in weights/, works offline",
        "semantic-segmentation", "synthetic shapes", 6, (128, 128), PROJECT_LICENCE, bundled=True)
    return table


# name -> description, task, dataset, num_labels, input_size (H, W), licence, bundled. The nvidia/* weights are
# downloaded on the user's request and never shipped with the project (see weights/README.md).
KNOWN_CHECKPOINTS: dict[str, dict] = _known_checkpoints()


# ---------------------------------------------------------------------------------------------------------------
# Resolving a name


def resolve(name_or_path: str | os.PathLike, revision: str = "main", progress: bool = True) -> Path:
    """The local checkpoint directory for a path, a bundled model's name or a Hub name (downloaded if needed).

    Order: an existing directory; a bundled model (`weights/<name>`); a Hub name `owner/model`, served from the
    cache when a verified copy of that revision is there, else downloaded, strictly checked and cached.
    `progress` shows a progress bar on stderr (tqdm's, on a terminal; elsewhere one line per file).
    """
    if isinstance(name_or_path, os.PathLike):
        return _existing_dir(os.fspath(name_or_path))
    name = str(name_or_path)
    if not name.strip():
        raise CheckpointError("empty checkpoint name: pass a directory, a bundled model's name or a Hub name")
    if _looks_local(name):  # any existing path counts, so a local directory wins over a Hub name
        return _existing_dir(name)
    if "/" not in name:
        return _bundled_dir(name)
    check_hub_name(name)
    check_revision(revision)
    target = cache_dir(name, revision)
    if is_verified(target):
        return target
    return _download_checkpoint(name, revision, target, progress)


def _looks_local(name: str) -> bool:
    """A string meant as a path: it exists, starts like one (. / ~ \\ C:), or has a backslash or two slashes."""
    return (Path(os.path.expanduser(name)).exists() or name.startswith((".", "/", "~", "\\"))
            or re.match(r"[A-Za-z]:", name) is not None or "\\" in name or name.count("/") > 1)


def _existing_dir(shown: str) -> Path:
    path = Path(os.path.expanduser(shown))
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{shown} is a file; pass the directory that holds config.json and model.safetensors")
    raise CheckpointError(f"{shown} does not exist: pass an existing checkpoint directory (config.json + "
                          "model.safetensors) or a Hub name such as nvidia/segformer-b0-finetuned-ade-512-512")


def bundled_models() -> list[str]:
    """Names of the checkpoints bundled with the package (`mininp_segformer/bundled/`, from `weights/`)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(d.name for d in BUNDLED_DIR.iterdir() if (d / CONFIG_NAME).is_file())


def _bundled_dir(name: str) -> Path:
    if re.fullmatch(r"[\w.-]+", name) and (BUNDLED_DIR / name / CONFIG_NAME).is_file():
        return BUNDLED_DIR / name
    if KNOWN_CHECKPOINTS.get(name, {}).get("bundled"):
        raise CheckpointError(
            f"the demo model {name!r} ships with the package, but {BUNDLED_DIR / name} is missing from this "
            f"installation; reinstall mininp_segformer or pass the path of weights/{name} in a checkout of the project")
    hub_names = [k for k in KNOWN_CHECKPOINTS if k.endswith("/" + name)]
    hint = f" Did you mean {hub_names[0]!r}?" if hub_names else ""
    raise CheckpointError(
        f"{name!r} is not a local directory, not a bundled model ({', '.join(bundled_models()) or 'none found'}) and "
        f"not a Hub name of the form owner/model.{hint}")


def check_hub_name(name: str) -> None:
    """Raise CheckpointError unless `name` is a Hub model id `owner/model` -- huggingface_hub's validate_repo_id
    rules: letters, digits, '_', '-', '.'; at most 96 of them per part; neither starting nor ending with '-' or
    '.'; no '--' or '..'; not ending in '.git'. Such a name is also a safe cache directory name (owner--model)."""
    part = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
    if (not isinstance(name, str) or not re.fullmatch(f"{part}/{part}", name) or "--" in name or ".." in name
            or name.endswith(".git")):
        raise CheckpointError(
            f"{name!r} is not a valid Hub model name: expected owner/model made of letters, digits, '-', '_' and "
            "'.' (at most 96 per part, not starting or ending with '-' or '.', no '--' or '..'), e.g. "
            "nvidia/segformer-b0-finetuned-ade-512-512")


def check_revision(revision: str) -> None:
    """Raise CheckpointError unless `revision` is a plausible branch, tag, commit hash or refs/pr/N."""
    if (not isinstance(revision, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,254}", revision)
            or ".." in revision):
        raise CheckpointError(f"{revision!r} is not a valid revision: use a branch, a tag, a commit hash or "
                              "refs/pr/N")


# ---------------------------------------------------------------------------------------------------------------
# The cache


def cache_home() -> Path:
    """`$MININP_SEGFORMER_HOME`, else ~/.cache/mininp_segformer."""
    return Path(os.environ.get("MININP_SEGFORMER_HOME") or "~/.cache/mininp_segformer").expanduser()


def cache_dir(name: str, revision: str = "main") -> Path:
    """Where Hub model `owner/model` at `revision` is cached: <home>/owner--model/<revision, '/' as '--'>."""
    return cache_home() / name.replace("/", "--") / revision.replace("/", "--")


def _read_manifest(directory: Path) -> dict | None:
    """`directory`'s manifest, or None when it is missing or damaged: unreadable, larger than MAX_JSON_BYTES, not
    UTF-8 JSON, nested too deeply for the parser (RecursionError), or listing files other than the checkpoint's."""
    path = directory / MANIFEST_NAME
    try:
        if not path.is_file():  # missing, or a directory or FIFO (whose open() would wait for a writer)
            return None
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        manifest = json.loads(data) if len(data) <= MAX_JSON_BYTES else None
    except (OSError, ValueError, RecursionError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not set(files) <= set(CHECKPOINT_FILES):
        return None
    return manifest if all(isinstance(v, dict) for v in files.values()) else None


def is_verified(directory: str | os.PathLike) -> bool:
    """True when `directory` is a cache entry whose manifest lists config + weights and every listed file still has
    its recorded size and sha256 (the check `resolve` makes before it serves a cached copy)."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    if manifest is None or not {CONFIG_NAME, WEIGHTS_NAME} <= set(manifest["files"]):
        return False
    try:
        for filename, info in manifest["files"].items():
            path = directory / filename
            if not path.is_file() or path.stat().st_size != info.get("size"):
                return False
            if _sha256_of(path) != info.get("sha256"):
                return False
    except OSError:  # unreadable, or replaced by a concurrent download while being hashed
        return False
    return True


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedModel:
    name: str  # owner/model
    revision: str
    path: Path
    size: int  # bytes on disk
    complete: bool  # a manifest is there and the files have their recorded sizes (resolve also re-hashes them)


def cached_models() -> list[CachedModel]:
    """Everything in the download cache, complete or not (an incomplete entry is re-downloaded on next use).

    Names and revisions come from the directory names (a manifest's own fields are only trusted when they map to
    the same directory); hidden directories (.locks, downloads under way) are not entries.
    """
    home = cache_home()
    found = []
    try:
        for rev_dir in (r for m in _entries(home) if "--" in m.name for r in _entries(m)):
            with contextlib.suppress(FileNotFoundError):  # replaced by a download finishing meanwhile
                found.append(_cached_model(rev_dir))
    except OSError as e:
        raise CheckpointError(f"could not read the model cache {e.filename or home} ({e.strerror or e}): fix its "
                              "permissions, or set MININP_SEGFORMER_HOME to another directory") from None
    return found


def _entries(directory: Path) -> list[Path]:
    """The sub-directories of `directory` whose names do not start with '.'; none if it is not a directory."""
    try:
        return sorted(d for d in directory.iterdir() if not d.name.startswith(".") and d.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _cached_model(rev_dir: Path) -> CachedModel:
    manifest = _read_manifest(rev_dir) or {"files": {}}
    files = manifest["files"]
    sizes = {p.name: p.stat().st_size for p in rev_dir.iterdir() if p.is_file()}
    revision = manifest.get("revision")
    if not (isinstance(revision, str) and revision.replace("/", "--") == rev_dir.name):
        revision = rev_dir.name.replace("--", "/")
    return CachedModel(
        name=rev_dir.parent.name.replace("--", "/", 1),  # Hub names have no '--' (check_hub_name)
        revision=revision, path=rev_dir, size=sum(sizes.values()),
        complete={CONFIG_NAME, WEIGHTS_NAME} <= set(files) and all(
            sizes.get(f) == info.get("size") for f, info in files.items()))


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _cache_error_message(error: OSError) -> str:
    where = error.filename or cache_home()
    return (f"could not write to the model cache: {where}: {error.strerror or error}. Free space or fix the "
            f"permissions there, or set MININP_SEGFORMER_HOME to a writable directory (now {cache_home()})")


# ---------------------------------------------------------------------------------------------------------------
# Downloading: one checkpoint at a time per model (a lock), into a private directory that becomes the cache entry
# only once everything in it has passed the strict check.


def endpoint() -> str:
    """`$HF_ENDPOINT` without a trailing slash, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def file_url(name: str, revision: str, filename: str) -> str:
    """`{endpoint}/{owner}/{model}/resolve/{revision}/{filename}`; a revision like refs/pr/1 is percent-encoded."""
    return f"{endpoint()}/{name}/resolve/{urllib.parse.quote(revision, safe='')}/{filename}"


def _download_checkpoint(name: str, revision: str, target: Path, progress: bool) -> Path:
    """Fetch a Hub checkpoint into a private directory next to `target`, check it strictly, write the manifest that
    marks it trusted, then rename it to `target`. A failure leaves no entry behind (only an older one, untrusted)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        why = (f"HF_HUB_OFFLINE is set and the cached copy in {target} is incomplete or damaged (delete it)"
               if target.exists() else "HF_HUB_OFFLINE is set and no verified copy is cached")
        raise DownloadError(_unreachable_message(name, why))
    try:
        with _download_lock(name, progress) as locked:
            if is_verified(target):  # another process finished this download while we waited for the lock
                return target
            staging = _staging_dir(target, locked)
            try:
                if progress:
                    print(f"Downloading {name} (revision {revision}) from {endpoint()} to {target}", file=sys.stderr)
                files = _fetch_files(name, revision, staging, progress)
                try:
                    load_checkpoint(staging)
                except CheckpointError as e:
                    raise CheckpointError(f"{name} (revision {revision}) from {endpoint()} failed the strict check "
                                          f"and was not cached:\n{e}") from None
                _write_json_atomically(staging / MANIFEST_NAME, {
                    "name": name, "revision": revision, "endpoint": endpoint(),
                    "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files})
                _replace_dir(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # gone already when the download succeeded
                _remove_if_empty(target.parent)
    except OSError as e:  # network errors are DownloadErrors by now: this is the cache's disk
        raise DownloadError(_cache_error_message(e)) from None
    return target


@contextlib.contextmanager
def _download_lock(name: str, progress: bool):
    """Hold <home>/.locks/<owner--model>.lock (fcntl.flock) while downloading `name`, so that a second process
    waits for the first and then finds its verified copy. Yields whether a lock is held: where fcntl is missing
    (Windows) or the file system refuses it, downloads go ahead unlocked -- each in its own directory, so they
    only waste bandwidth. The lock file stays: deleting it would let a third process lock a new file meanwhile."""
    path = cache_home() / ".locks" / f"{name.replace('/', '--')}.lock"
    if fcntl is None:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: flock itself needs no write access (NFS's emulation does)
        fd = os.open(path, os.O_RDONLY)
    try:
        locked = _wait_for_lock(fd, path, name, progress)
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _wait_for_lock(fd: int, path: Path, name: str, progress: bool) -> bool:
    """Lock the open lock file `fd`, polling while another process holds it; False if the file system cannot."""
    patience = len(CHECKPOINT_FILES) * DEADLINE + TIMEOUT  # by then the holder has given up on each of its files
    start, told = time.monotonic(), not progress
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            waited = time.monotonic() - start
        except OSError:  # e.g. a network file system without flock
            return False
        if waited > patience:
            raise DownloadError(f"another process has been downloading {name} for {waited:.0f} s (it holds {path}); "
                                "if no other download is running, delete that file and try again")
        if not told:
            print(f"Waiting for another process that is downloading {name} (lock {path})", file=sys.stderr)
            told = True
        time.sleep(0.1)


def _staging_dir(target: Path, locked: bool) -> Path:
    """A new private directory next to `target` (.<revision>.<random>.incomplete) to download into.

    The manifest of an older copy at `target` is removed: that copy failed verification, so it is no longer vouched
    for. Under the lock, staging directories left by killed processes are removed too (without a lock they may
    belong to a download under way).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        (target / MANIFEST_NAME).unlink(missing_ok=True)
    if locked:
        for stale in target.parent.glob(".*.incomplete"):
            shutil.rmtree(stale, ignore_errors=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.incomplete"
    staging.mkdir()  # not tempfile.mkdtemp: its mode 0o700 would keep other users of a shared cache out
    return staging


def _replace_dir(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`, replacing what is there (an older copy that failed verification)."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    fsync_dir(target.parent)


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:  # not empty (the usual case), or gone
        pass


def _fetch_files(name: str, revision: str, directory: Path, progress: bool) -> dict:
    """Download the checkpoint's files into `directory`; returns {filename: {"sha256", "size"}}."""
    files = {}
    for filename in CHECKPOINT_FILES:
        try:
            files[filename] = _fetch(file_url(name, revision, filename), directory / filename, progress)
        except urllib.error.HTTPError as e:
            e.close()
            if filename == PREPROCESSOR_NAME and e.code == 404:
                continue  # optional file: this model has none
            raise DownloadError(_http_error_message(e, name, revision, filename)) from None
        except NETWORK_ERRORS as e:
            raise DownloadError(_unreachable_message(name, _describe(e))) from None
        if filename == CONFIG_NAME:
            _check_config_early(name, directory)
    return files


def _check_config_early(name: str, directory: Path) -> None:
    """Reject a config.json that is not SegFormer's before downloading the (large) weights."""
    try:
        SegformerConfig.from_json(directory / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(f"{name}: {e}") from None


def _fetch(url: str, dest: Path, progress: bool) -> dict:
    """Stream `url` into the new file `dest`; returns {"sha256", "size"}. HTTP and connection errors propagate.

    The body may not exceed the size the server announces, nor `_size_cap(dest.name)` when it announces none; it
    must arrive within DEADLINE at MIN_BYTES_PER_SECOND (a `_Watchdog` cuts the connection otherwise), and match
    the announced size and sha256.
    """
    with _Watchdog(url) as watchdog:
        response, announced = _open(url, watchdog)
        with response:
            size = _announced_size(response, announced, url, _size_cap(dest.name))
            with open(dest, "xb") as f:
                sha256, done = _copy(response, f, size, _size_cap(dest.name), watchdog, dest.name, progress)
                f.flush()
                os.fsync(f.fileno())
    if size is not None and done != size:
        raise DownloadError(f"the download of {url} was cut short: {done} of {size} bytes arrived; try again")
    if announced.get("sha256") and sha256 != announced["sha256"]:
        raise DownloadError(f"{url} arrived damaged: its sha256 is {sha256} but the server announced "
                            f"{announced['sha256']}; try again")
    return {"sha256": sha256, "size": done}


def _size_cap(filename: str) -> int:
    return MAX_JSON_BYTES if filename.endswith(".json") else MAX_WEIGHTS_BYTES


def _announced_size(response, announced: dict, url: str, cap: int) -> int | None:
    """The body's size as announced -- the hub's X-Linked-Size (on a redirect to its CDN), else Content-Length --
    checked against `cap` before anything is written; None when neither is given (a chunked answer)."""
    length = _int_header(response.headers, "Content-Length")
    if announced.get("size") is not None and length is not None and length != announced["size"]:
        raise DownloadError(f"{url}: the hub announced {announced['size']} bytes (X-Linked-Size) but the server "
                            f"sends {length} (Content-Length); try again later")
    size = announced.get("size", length)
    if size is not None and size > cap:
        raise DownloadError(f"{url} announces {size:,} bytes, more than the {cap:,} this file can be "
                            "(mininp_segformer.hub.MAX_JSON_BYTES / MAX_WEIGHTS_BYTES); not downloaded")
    return size


def _int_header(headers, key: str) -> int | None:
    value = (headers.get(key) or "").strip()
    return int(value) if re.fullmatch(r"[0-9]{1,18}", value) else None  # not int(): "²".isdigit(), 5000 digits


class _Watchdog:
    """Cuts a download off -- shuts its sockets from a thread -- once it has taken longer than DEADLINE, or fewer than
    MIN_BYTES_PER_SECOND arrived over the last RATE_WINDOW seconds. TIMEOUT alone bounds each read, so a server
    that trickles a byte at a time (headers included) could otherwise hold a download forever.
    """

    def __init__(self, url: str):
        self.url = url
        self.received = 0  # body bytes so far, counted by `_copy`
        self.reason = None  # why the download was cut off
        self.connections = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mininp_segformer download watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        start = window_start = time.monotonic()
        window_bytes = 0
        while not self._done.wait(0.05):
            now = time.monotonic()
            if self.reason is None and now - start > DEADLINE:
                self.reason = f"it took longer than {DEADLINE:g} s (mininp_segformer.hub.DEADLINE)"
            elif self.reason is None and now - window_start >= RATE_WINDOW:
                if self.received - window_bytes < MIN_BYTES_PER_SECOND * (now - window_start):
                    self.reason = (f"fewer than {MIN_BYTES_PER_SECOND:,} bytes/s arrived over "
                                   f"{now - window_start:.3g} s (mininp_segformer.hub.MIN_BYTES_PER_SECOND)")
                window_start, window_bytes = now, self.received
            if self.reason:
                self._cut()  # at every tick from then on: a connection opened meanwhile is cut too

    def _cut(self) -> None:
        for connection in list(self.connections):
            for sock in (connection.sock, connection.watched_socket):
                try:
                    if sock is not None:
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes a blocked read; works for TLS too
                except OSError:
                    pass

    def error(self) -> DownloadError:
        return DownloadError(f"the download of {self.url} was cut off: {self.reason}; on a slow link raise that "
                             "limit, otherwise try again later")


class _WatchedConnection:
    """Mixin for http.client's connections: registers with a `_Watchdog` before connecting (so that it can cut a
    stalled TLS handshake) and keeps the socket, which urllib detaches from the connection once the headers are in."""

    watched_socket = None

    def __init__(self, *args, watchdog: _Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        watchdog.connections.append(self)

    def connect(self):
        super().connect()
        self.watched_socket = self.sock


class _WatchedHTTPConnection(_WatchedConnection, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, http.client.HTTPSConnection):
    pass


class _WatchedHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, request):
        return self.do_open(functools.partial(_WatchedHTTPConnection, watchdog=self.watchdog), request)

    def https_open(self, request):
        return self.do_open(functools.partial(_WatchedHTTPSConnection, watchdog=self.watchdog), request)


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """urllib for http and https only (none of its file:, data: and ftp: handlers), with no redirect handler --
    30x answers surface as HTTPError for `_open` to follow -- and every connection watched by `watchdog`."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), _WatchedHandler(watchdog), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _open(url: str, watchdog: _Watchdog):
    """GET `url`, following up to MAX_REDIRECTS redirects by hand; returns (response, what the hub announced:
    {"sha256", "size"} from the first answer that carries them).

    The Hub answers a large file's URL with a redirect to a CDN; the redirect carries the file's sha256 in
    `X-Linked-Etag` and its size in `X-Linked-Size`, which urllib's own redirect handling would drop. Following
    by hand also keeps HF_TOKEN from being sent to any host other than the endpoint's, and every URL -- the
    endpoint's and each `Location` -- must be http(s): a hostile server could otherwise redirect to file:///dev/zero.
    """
    token = os.environ.get("HF_TOKEN")
    token_host = urllib.parse.urlsplit(url).netloc
    opener = _opener(watchdog)
    announced = {}
    for hop in range(MAX_REDIRECTS + 1):
        if watchdog.reason:
            raise watchdog.error()
        _check_http_url(url, "HF_ENDPOINT gives" if hop == 0 else "the server redirected to")
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if token and urllib.parse.urlsplit(url).netloc == token_host:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            response = opener.open(request, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            _note_announcements(announced, e.headers)
            location = e.headers.get("Location")
            if e.code in (301, 302, 303, 307, 308) and location:
                e.close()
                url = urllib.parse.urljoin(url, location)
                continue
            raise
        except NETWORK_ERRORS:
            if watchdog.reason:
                raise watchdog.error() from None
            raise
        _note_announcements(announced, response.headers)
        return response, announced
    raise DownloadError(f"more than {MAX_REDIRECTS} redirects while downloading {watchdog.url} (the last to "
                        f"{_shorten(url)}); the server is misconfigured or hostile, try again later")


def _check_http_url(url: str, what: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise DownloadError(f"{what} {_shorten(url)!r}, which is not an http:// or https:// URL; downloads follow "
                            "only those (check HF_ENDPOINT, or the hub or mirror is hostile)")


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _note_announcements(announced: dict, headers) -> None:
    if headers is None:
        return
    sha256 = _sha256_header(headers)
    size = _int_header(headers, "X-Linked-Size")
    if sha256 and "sha256" not in announced:
        announced["sha256"] = sha256
    if size is not None and "size" not in announced:
        announced["size"] = size


def _sha256_header(headers) -> str | None:
    """The sha256 in `X-Linked-Etag` or `ETag` (quoted, maybe weak); None for other tags (e.g. git's sha1)."""
    for key in ("X-Linked-Etag", "ETag"):
        tag = (headers.get(key) or "").removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def _copy(response, f, size: int | None, cap: int, watchdog: _Watchdog, label: str,
          progress: bool) -> tuple[str, int]:
    """Copy the response body to `f`, hashing as it goes, stopping past `size` (or `cap` when no size was announced);
    returns (sha256 hex, bytes). `read1` returns whatever has arrived, so the watchdog sees the true rate.

    With `progress`: a tqdm bar on stderr when it is a terminal; elsewhere (a log, a pipe) the finished bar alone,
    as one line."""
    limit = cap if size is None else size
    digest = hashlib.sha256()
    done, start = 0, time.monotonic()
    with tqdm(total=size, desc=label, unit="B", unit_scale=True, mininterval=0.1, file=sys.stderr,
              disable=None if progress else True) as bar:  # None: tqdm shows the bar on a terminal only
        while chunk := _read_chunk(response, watchdog, label):
            done += len(chunk)
            watchdog.received = done
            if done > limit:
                announced = f"the {size:,} bytes it announced" if size is not None else f"{cap:,} bytes (the cap)"
                raise DownloadError(f"the server sent more than {announced} for {label}; not downloaded")
            f.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    if progress and bar.disable:
        print(tqdm.format_meter(done, size, time.monotonic() - start, prefix=label, unit="B", unit_scale=True,
                                ascii=True), file=sys.stderr, flush=True)
    return digest.hexdigest(), done


def _read_chunk(response, watchdog: _Watchdog, label: str) -> bytes:
    """The next bytes of the body (b"" at its end); a DownloadError when the read fails or the watchdog cut it."""
    try:
        chunk = response.read1(CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as e:
        if watchdog.reason:
            raise watchdog.error() from None
        raise DownloadError(f"the download of {label} was interrupted ({_describe(e)}); try again") from None
    if watchdog.reason:  # a cut socket reads as the end of the body
        raise watchdog.error()
    return chunk


# ---------------------------------------------------------------------------------------------------------------
# Error messages


def _describe(error: BaseException) -> str:
    """A short reason for a network failure: DNS, refused, timed out, ..."""
    reason = getattr(error, "reason", error)
    if isinstance(reason, socket.gaierror):
        return f"host name lookup failed: {reason.strerror or reason}"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return f"no answer within {TIMEOUT:g} s"
    return str(reason) or type(reason).__name__


def _unreachable_message(name: str, reason: str) -> str:
    return (f"could not reach the model hub at {endpoint()} to download {name} ({reason}).\n"
            f"On a machine with access, download config.json and model.safetensors from {endpoint()}/{name} "
            "(Files and versions), put them in one directory, and pass that directory instead of the name: "
            "mininp_segformer.load('/path/to/dir'). HF_ENDPOINT selects a mirror; MININP_SEGFORMER_HOME the cache.")


def _http_error_message(e: urllib.error.HTTPError, name: str, revision: str, filename: str) -> str:
    page = f"{endpoint()}/{name}"
    kind = e.headers.get("X-Error-Code", "") if e.headers else ""
    if e.code == 401:
        token_note = ("HF_TOKEN is set but was not accepted for it." if os.environ.get("HF_TOKEN")
                      else "For a gated or private model, accept its terms on the model page and set HF_TOKEN.")
        return (f"{endpoint()} refused {name} (HTTP 401 Unauthorized): the model does not exist, or it is private "
                f"or gated. Check the name on {page}. {token_note}")
    if e.code == 403:
        return (f"access to {name} was denied (HTTP 403 Forbidden): it is gated or private and the token in HF_TOKEN "
                f"does not grant access; request access on {page}")
    if e.code == 404 and kind == "RevisionNotFound":
        return (f"{name} has no revision {revision!r} (HTTP 404): use a branch, tag or commit hash listed on "
                f"{page}/commits")
    if e.code == 404 and (kind == "EntryNotFound" or (not kind and filename != CONFIG_NAME)):
        hint = ""
        if filename == WEIGHTS_NAME:
            hint = (" Older repositories may hold only pytorch_model.bin: look for a safetensors conversion pull "
                    "request (revision='refs/pr/N') or convert it with weights/export_safetensors.py.")
        return f"{name} has no {filename} at revision {revision!r} (HTTP 404).{hint}"
    if e.code == 404:
        return (f"no model {name!r} (revision {revision!r}) on {endpoint()} (HTTP 404): check the spelling; "
                "mininp_segformer.hub.KNOWN_CHECKPOINTS lists the SegFormer checkpoints this project knows")
    return f"{endpoint()} answered HTTP {e.code} {e.reason} for {name}/{filename}; try again later"
