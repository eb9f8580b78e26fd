"""Where checkpoints come from: a local directory, the bundled demo model, or the Hugging Face Hub (cached).

    resolve("path/to/checkpoint")                        -> that directory, as it is
    resolve("segformer-b0-shapes")                       -> mininp_segformer/bundled/segformer-b0-shapes (demo)
    resolve("nvidia/segformer-b0-finetuned-ade-512-512") -> <cache>/nvidia--segformer-b0-finetuned-ade-512-512/main

A Hub download fetches `config.json`, `preprocessor_config.json` (when the model has one) and `model.safetensors`
from `{endpoint}/{owner}/{model}/resolve/{revision}/{file}` with the standard library's urllib. Each file is streamed
into a temporary file next to its final path while its sha256 is computed; it is checked against the byte count and
the sha256 the server announces, fsync'ed, and only then renamed into place, so a final path never holds half a
file. The directory is trusted only once a strict load (`weights.load_checkpoint`) has passed: then `manifest.json`
records every file's sha256, and later calls re-hash the files against it instead of going to the network.

Environment variables:
    MININP_SEGFORMER_HOME  cache directory (default ~/.cache/mininp_segformer)
    HF_ENDPOINT            the hub or a mirror (default https://huggingface.co)
    HF_TOKEN               access token for gated/private models, sent to the endpoint's host only
    HF_HUB_OFFLINE=1       never download; only local directories, the bundled model and the cache resolve
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .config import SegformerConfig
from .errors import CheckpointError, ConfigError, DownloadError
from .weights import CONFIG_NAME, PREPROCESSOR_NAME, WEIGHTS_NAME, load_checkpoint

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST_NAME = "manifest.json"
# The project's own models: in the source tree a link to weights/<name>, in an installed wheel a copy.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
TIMEOUT = 30.0  # seconds a connect or a read may stall before the download is given up
CHUNK_BYTES = 1 << 20
USER_AGENT = "mininp_segformer (urllib)"

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
    `progress` shows a progress bar on stderr (on a terminal; elsewhere one line per file).
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
    _check_hub_name(name)
    _check_revision(revision)
    target = cache_dir(name, revision)
    if _is_verified(target):
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


def _check_hub_name(name: str) -> None:
    part = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
    if not re.fullmatch(f"{part}/{part}", name) or "--" in name or ".." in name:
        raise CheckpointError(
            f"{name!r} is not a valid Hub model name: expected owner/model made of letters, digits, '-', '_' and "
            "'.' (no '--' or '..'), e.g. nvidia/segformer-b0-finetuned-ade-512-512")


def _check_revision(revision: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,254}", revision or "") or ".." in revision:
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
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest.get("files")
        return manifest if isinstance(files, dict) and all(isinstance(v, dict) for v in files.values()) else None
    except (OSError, ValueError, AttributeError):
        return None


def _is_verified(directory: Path) -> bool:
    """True when the manifest lists config + weights and every listed file still has its recorded sha256."""
    manifest = _read_manifest(directory)
    if manifest is None or not {CONFIG_NAME, WEIGHTS_NAME} <= set(manifest["files"]):
        return False
    for filename, info in manifest["files"].items():
        path = directory / filename
        if not path.is_file() or path.stat().st_size != info.get("size"):
            return False
        if _sha256_of(path) != info.get("sha256"):
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
    """Everything in the download cache, complete or not (an incomplete entry is re-downloaded on next use)."""
    home = cache_home()
    found = []
    for model_dir in sorted(home.iterdir()) if home.is_dir() else []:
        if not model_dir.is_dir() or "--" not in model_dir.name:
            continue
        for rev_dir in sorted(d for d in model_dir.iterdir() if d.is_dir()):
            manifest = _read_manifest(rev_dir) or {"files": {}}
            files = manifest["files"]
            sizes_match = all((rev_dir / f).is_file() and (rev_dir / f).stat().st_size == info.get("size")
                              for f, info in files.items())
            complete = {CONFIG_NAME, WEIGHTS_NAME} <= set(files) and sizes_match
            found.append(CachedModel(
                name=manifest.get("name") or model_dir.name.replace("--", "/", 1),
                revision=manifest.get("revision") or rev_dir.name.replace("--", "/"),
                path=rev_dir,
                size=sum(p.stat().st_size for p in rev_dir.iterdir() if p.is_file()),
                complete=complete))
    return found


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Downloading


def endpoint() -> str:
    """`$HF_ENDPOINT` without a trailing slash, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def file_url(name: str, revision: str, filename: str) -> str:
    """`{endpoint}/{owner}/{model}/resolve/{revision}/{filename}`; a revision like refs/pr/1 is percent-encoded."""
    return f"{endpoint()}/{name}/resolve/{urllib.parse.quote(revision, safe='')}/{filename}"


def _download_checkpoint(name: str, revision: str, target: Path, progress: bool) -> Path:
    """Fetch a Hub checkpoint into `target`, check it strictly, then write the manifest that marks it trusted."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise DownloadError(_unreachable_message(name, "HF_HUB_OFFLINE is set and no verified copy is cached"))
    target.mkdir(parents=True, exist_ok=True)
    (target / MANIFEST_NAME).unlink(missing_ok=True)  # whatever was there is no longer vouched for
    for stale in target.glob(".*.part"):  # temporary files of an interrupted earlier run
        stale.unlink(missing_ok=True)
    if progress:
        print(f"Downloading {name} (revision {revision}) from {endpoint()} to {target}", file=sys.stderr)
    files = {}
    for filename in (CONFIG_NAME, PREPROCESSOR_NAME, WEIGHTS_NAME):
        url = file_url(name, revision, filename)
        try:
            files[filename] = _fetch(url, target / filename, progress)
        except urllib.error.HTTPError as e:
            if filename == PREPROCESSOR_NAME and e.code == 404:
                (target / filename).unlink(missing_ok=True)  # optional file: this model has none
                continue
            raise DownloadError(_http_error_message(e, name, revision, filename)) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise DownloadError(_unreachable_message(name, _describe(e))) from None
        if filename == CONFIG_NAME:
            _check_config_early(name, target)
    try:
        load_checkpoint(target)
    except CheckpointError as e:
        shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(f"{name} (revision {revision}) from {endpoint()} failed the strict check and was "
                              f"removed from the cache:\n{e}") from None
    _write_json_atomically(target / MANIFEST_NAME, {
        "name": name, "revision": revision, "endpoint": endpoint(),
        "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files})
    return target


def _check_config_early(name: str, target: Path) -> None:
    """Reject a config.json that is not SegFormer's before downloading the (large) weights."""
    try:
        SegformerConfig.from_json(target / CONFIG_NAME)
    except ConfigError as e:
        shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(f"{name}: {e}") from None


def _fetch(url: str, dest: Path, progress: bool) -> dict:
    """Stream `url` to `dest` atomically; returns {"sha256", "size"}. HTTP and connection errors propagate."""
    response, announced_sha256 = _open(url)
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                sha256, size = _copy(response, f, total, dest.name, progress)
                f.flush()
                os.fsync(f.fileno())
            if total is not None and size != total:
                raise DownloadError(f"the download of {url} was cut short: {size} of {total} bytes arrived; try again")
            if announced_sha256 and sha256 != announced_sha256:
                raise DownloadError(f"{url} arrived damaged: its sha256 is {sha256} but the server announced "
                                    f"{announced_sha256}; try again")
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    _fsync_dir(dest.parent)
    return {"sha256": sha256, "size": size}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Surface 30x answers as HTTPError so that `_open` follows them itself (see there why)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _open(url: str):
    """GET `url`, following redirects by hand; returns (response, sha256 the server announced or None).

    The Hub answers a large file's URL with a redirect to a CDN; the redirect carries the file's sha256 in
    `X-Linked-Etag`, which urllib's own redirect handling would drop. Following by hand also keeps HF_TOKEN
    from being sent to any host other than the endpoint's.
    """
    token = os.environ.get("HF_TOKEN")
    token_host = urllib.parse.urlsplit(url).netloc
    announced = None
    for _ in range(10):
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if token and urllib.parse.urlsplit(url).netloc == token_host:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            response = _OPENER.open(request, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            announced = announced or _sha256_header(e.headers)
            location = e.headers.get("Location")
            if e.code in (301, 302, 303, 307, 308) and location:
                e.close()
                url = urllib.parse.urljoin(url, location)
                continue
            raise
        return response, announced or _sha256_header(response.headers)
    raise DownloadError(f"too many redirects while downloading {url}")


def _sha256_header(headers) -> str | None:
    """The sha256 in `X-Linked-Etag` or `ETag` (quoted, maybe weak); None for other tags (e.g. git's sha1)."""
    for key in ("X-Linked-Etag", "ETag"):
        tag = (headers.get(key) or "").removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def _copy(response, f, total: int | None, label: str, progress: bool) -> tuple[str, int]:
    """Copy the response body to `f`, hashing as it goes; returns (sha256 hex, bytes)."""
    digest = hashlib.sha256()
    done = 0
    start = last_draw = time.monotonic()
    live = progress and _is_terminal(sys.stderr)
    while True:
        try:
            chunk = response.read(CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f"the download of {label} was interrupted ({_describe(e)}); try again") from None
        if not chunk:
            break
        f.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if live and time.monotonic() - last_draw >= 0.1:
            sys.stderr.write("\r" + progress_line(label, done, total, time.monotonic() - start))
            sys.stderr.flush()
            last_draw = time.monotonic()
    if progress:  # on a terminal the finished bar replaces the live one; in a log it is the only line
        sys.stderr.write(("\r" if live else "") + progress_line(label, done, total, time.monotonic() - start) + "\n")
        sys.stderr.flush()
    return digest.hexdigest(), done


def progress_line(label: str, done: int, total: int | None, seconds: float) -> str:
    """`model.safetensors  42% [##########              ]   6.0/14.3 MB  5.1 MB/s`."""
    rate = done / max(seconds, 1e-3) / 1e6
    if not total:
        return f"{label} {done / 1e6:6.1f} MB {rate:5.1f} MB/s"
    fraction = min(done / total, 1.0)
    bar = "#" * int(fraction * 24)
    return f"{label} {fraction:4.0%} [{bar:<24}] {done / 1e6:6.1f}/{total / 1e6:.1f} MB {rate:5.1f} MB/s"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


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
