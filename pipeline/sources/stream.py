"""Streamed tar shards, as WebDataset names them: `pipe:COMMAND` (the command writes the shard to stdout, e.g.
`pipe:aws s3 cp s3://bucket/train-000.tar -`) and `http(s)://` URLs, each with brace patterns (`{000..009}`).

A stream cannot be read by offset, and the listing must see every shard (labels, class names, splits) before the
first image is embedded; so each shard is streamed once per run, at listing, into a spool file
(`$FEATPIPE_SPOOL`, default `<tmp>/featpipe-spool-<uid>/`, one file per shard address, replaced on each run) and then
read in place like a local shard. Resume and incremental runs are by key and member stamp (the member's size and
the mtime in its tar header, not the spool file's): rows committed before are kept, the shards are streamed again
from the start (a stream has no random access), and only missing or changed keys are computed.

`pipe:` runs a shell command, so it is accepted only from the command line or the Python API: never from a YAML
run config (configs from others may not run code) and never re-run from a store's record.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.errors import DataError

PREFIXES = ("pipe:", "http://", "https://")
CHUNK = 1 << 20
TIMEOUT_S = 60  # per network read


def is_stream(data: str | Path) -> bool:
    return str(data).startswith(PREFIXES)


def spool_root() -> Path:
    given = os.environ.get("FEATPIPE_SPOOL")
    return Path(given) if given else Path(tempfile.gettempdir()) / f"featpipe-spool-{os.getuid()}"


def shard_name(address: str, number: int) -> str:
    """The shard's file name (its split hint: `train-000.tar` says train): the URL's last path part, or a pipe
    command's last word that names a .tar, else shard-NNNNN.tar."""
    if address.startswith("pipe:"):
        words = [w for w in re.split(r"\s+", address[5:]) if ".tar" in w]
        name = words[-1].rstrip("'\"").rsplit("/", 1)[-1] if words else ""
    else:
        name = urllib.parse.urlparse(address).path.rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return name if name.endswith(".tar") else f"shard-{number:05d}.tar"


def spool(address: str, number: int) -> Path:
    """Stream one shard into its spool file (written as .partial, renamed when complete); a command that fails or
    a download that breaks is an error naming the shard."""
    folder = spool_root() / hashlib.sha1(address.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / shard_name(address, number)
    partial = target.with_name(target.name + ".partial")
    if address.startswith("pipe:"):
        _from_command(address, partial)
    else:
        _from_url(address, partial)
    os.replace(partial, target)
    return target


def _from_command(address: str, partial: Path) -> None:
    command = address[5:].strip()
    if not command:
        raise DataError("--data 'pipe:' names no command; write pipe:COMMAND, e.g. 'pipe:cat shard-000.tar'")
    with open(partial, "wb") as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=err)  # noqa: S602 - pipe: is a shell command by definition
        assert proc.stdout is not None
        shutil.copyfileobj(proc.stdout, out, CHUNK)
        code, size = proc.wait(), out.tell()
        err.seek(0)
        message = " ".join(err.read()[-300:].decode("utf-8", "replace").split())
    if code != 0:
        partial.unlink(missing_ok=True)
        raise DataError(f"{address}: the command exited with status {code} after {size} bytes"
                        f"{f' ({message})' if message else ''}; fix the command or leave the shard out of --data")


def _from_url(address: str, partial: Path) -> None:
    try:
        with urllib.request.urlopen(address, timeout=TIMEOUT_S) as response, open(partial, "wb") as out:  # noqa: S310 - http(s) only
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, CHUNK)
            size = out.tell()
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise DataError(f"{address} cannot be downloaded ({type(exc).__name__}: {str(exc)[:200]}); check the URL "
                        "and the network, or leave the shard out of --data") from None
    if expected is not None and expected.isdigit() and int(expected) != size:
        partial.unlink(missing_ok=True)
        raise DataError(f"{address}: the download stopped after {size} of {expected} bytes; run again")
