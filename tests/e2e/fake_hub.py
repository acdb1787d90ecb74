"""A Hugging Face Hub stand-in for tests that must not touch the network: `snapshot_download` of
hf://ORG/NAME copies $KUBEINFER_FAKE_HUB/ORG/NAME/* into local_dir, one file at a time through the
caller's tqdm_class (as the real one reports files fetched), and raises the hub client's
RepositoryNotFoundError for a repo that is not there.

Run as a program it is `kubeinfer` with that stand-in installed: the e2e's stand-in kubelet maps the
pods' `kubeinfer` command to it, so the download Job's `kubeinfer download` runs offline and
`kubeinfer serve` runs as usual.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HUB_ENV = "KUBEINFER_FAKE_HUB"


def snapshot_download(repo_id: str, *, revision: str | None = None, local_dir: str | None = None,
                      tqdm_class=None, ignore_patterns=None, **_) -> str:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    source = Path(os.environ[HUB_ENV]) / repo_id
    if not source.is_dir():
        import httpx
        url = f"{huggingface_hub.constants.ENDPOINT}/api/models/{repo_id}/revision/{revision}"
        raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for url: {url}",
                                      response=httpx.Response(404, request=httpx.Request("GET", url)))
    files = sorted(p for p in source.rglob("*") if p.is_file())
    target = Path(local_dir)
    bar = tqdm_class(total=len(files), desc=f"Fetching {len(files)} files") if tqdm_class else None
    for f in files:
        dest = target / f.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return str(target)


def install() -> None:
    import huggingface_hub
    huggingface_hub.snapshot_download = snapshot_download


if __name__ == "__main__":
    install()
    from kubeinfer.cli import main
    sys.exit(main())
