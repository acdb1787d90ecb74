"""`kubeinfer download hf://ORG/NAME --revision REV --dir DIR`: fill a model cache folder once.

The operator's download Job runs it (kubeinfer/operator/download_job.py) against a ReadWriteMany
claim that engine pods later mount read-only. huggingface_hub's snapshot_download writes the repo's
serving files into DIR (resuming what an earlier attempt left there; HF_TOKEN and HF_ENDPOINT as the
hub client reads them), and only then DIR/.kubeinfer-complete is written (atomically, with the
commit, file count and bytes): a folder without it is a download in progress or a failed one, never
a model to serve. A folder that has it is not downloaded again, so InferenceServices sharing a claim
share one copy.

Progress goes to stdout as `progress: ...` lines (at most one per PROGRESS_SECONDS per bar); the
outcome goes to the termination message ($KUBEINFER_TERMINATION_LOG), which the operator shows in
the ModelCached condition. Exit codes: 0 downloaded (or already there), 1 the download failed, 2 bad
arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import huggingface_hub
from tqdm.std import tqdm

COMPLETE_MARKER = ".kubeinfer-complete"
PROGRESS_SECONDS = 5.0
_HF = re.compile(r"^hf://([A-Za-z0-9][-A-Za-z0-9_.]*)/([A-Za-z0-9][-A-Za-z0-9_.]*)$")
# what a serving run reads; duplicates of the weights in other layouts are left on the hub
IGNORE = ["consolidated*", "original/*", "*.pth", "*.pt", "*.msgpack", "*.h5", "*.ot", "*.onnx*",
          "*.tflite", ".gitattributes"]
MESSAGE_BYTES = 4096
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """tqdm's file: each refresh ("\\r" + bar) becomes one `progress:` line on stdout."""

    def write(self, text: str) -> None:
        # tqdm moves the cursor between stacked bars (ESC[A); a log wants plain lines
        line = _ESCAPES.sub("", text.rsplit("\r", 1)[-1]).strip()
        if line:
            print(f"progress: {line}", flush=True)

    def flush(self) -> None:
        pass


class ProgressLines(tqdm):
    """snapshot_download's progress bars (files fetched; bytes) as log lines a few seconds apart."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("name", None)
        kwargs.update(file=_Lines(), mininterval=PROGRESS_SECONDS, ascii=True, disable=False)
        super().__init__(*args, **kwargs)


def _termination_message(text: str) -> None:
    path = os.environ.get("KUBEINFER_TERMINATION_LOG")
    if not path:
        return
    data = text.strip().encode("utf-8", errors="replace")[:MESSAGE_BYTES]
    try:
        Path(path).write_bytes(data)
    except OSError:
        pass   # the outcome is in the log and the exit code all the same


def _summary(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts
             and p.name != COMPLETE_MARKER]
    return len(files), sum(p.stat().st_size for p in files)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def download(uri: str, revision: str, folder: Path) -> str:
    """Download `uri` at `revision` into `folder` and mark it complete; the summary line. Raises
    ValueError for a uri that is not hf://ORG/NAME, and what the hub client raises otherwise."""
    match = _HF.match(uri)
    if not match:
        raise ValueError(f"{uri!r} is not a hub model: give hf://ORG/NAME")
    repo = f"{match.group(1)}/{match.group(2)}"
    if is_complete(folder):
        files, size = _summary(folder)
        return f"{repo}@{revision} is cached already in {folder}: {files} files, {_size(size)}"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(f"downloading {repo}@{revision} into {folder}", flush=True)
    huggingface_hub.snapshot_download(repo_id=repo, revision=revision, local_dir=str(folder),
                                      ignore_patterns=IGNORE, tqdm_class=ProgressLines)
    files, size = _summary(folder)
    if files == 0:
        raise RuntimeError(f"{repo}@{revision} has no files to serve (all matched {IGNORE})")
    marker = {"uri": uri, "revision": revision, "files": files, "bytes": size,
              "seconds": round(time.monotonic() - start, 1)}
    tmp = folder / f"{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, folder / COMPLETE_MARKER)   # the marker appears whole or not at all
    return f"downloaded {repo}@{revision}: {files} files, {_size(size)} in {marker['seconds']:g} s"


def run(args: argparse.Namespace) -> int:
    try:
        said = download(args.uri, args.revision, Path(args.dir))
    except ValueError as e:
        print(f"kubeinfer download: {e}", file=sys.stderr)
        _termination_message(f"bad arguments: {e}")
        return 2
    except Exception as e:   # the hub's errors are many (auth, not found, network, disk full)
        said = f"{type(e).__name__}: {e}".strip()
        print(f"kubeinfer download: failed: {said}", file=sys.stderr, flush=True)
        _termination_message(f"download failed: {said}")
        return 1
    print(said, flush=True)
    _termination_message(said)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "download", help="download a hub model once into a folder (the operator's model cache Job)",
        description="Download hf://ORG/NAME at --revision into --dir with huggingface_hub, then write "
                    f"{COMPLETE_MARKER}; a folder that has it already is left as it is.")
    p.add_argument("uri", metavar="hf://ORG/NAME")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default %(default)s)")
    p.add_argument("--dir", required=True, help="the model's folder, e.g. /model-store/models/ORG--NAME/main")
    p.set_defaults(func=run)
