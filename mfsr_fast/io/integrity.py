"""Folders that prove they are whole: a manifest of sizes and SHA-256 digests written last, checked before use.

Training checkpoints (``training/checkpoint.py``) write ``manifest.json`` after every other file; ``check_folder``
then tells a complete checkpoint from one cut short by a crash, a full disk or a flipped bit, naming the file and
what is wrong. Folders written before manifests existed are checked structurally instead: every JSON file parses and
every safetensors file is exactly as long as its header says. ``newest_checkpoint`` picks the newest checkpoint of a
run that passes, and says which newer ones it passed over and why, so that a damaged newest checkpoint costs the
steps since the previous one instead of the whole run.

Files created through ``tempfile`` are private (0600 / 0700); ``apply_umask`` gives them the permissions an ordinary
``open`` / ``mkdir`` would have had under the process's umask.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct

MANIFEST = "manifest.json"
LATEST = "latest.json"
_STEP = re.compile(r"^step_(\d+)$")


class IntegrityError(ValueError):
    """A folder or file that is incomplete or damaged; the message names the file and the fault."""


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # no /proc: read it by setting it (restored at once)
    os.umask(old)
    return old


def apply_umask(path: str) -> None:
    """chmod ``path`` (and, for a folder, everything under it) to 0666 / 0777 less the umask."""
    mask = _umask()
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(root, f), folder)
            if rel != MANIFEST:
                out.append(rel)
    return out


def write_manifest(folder: str, written_by: str | None = None) -> dict:
    """Record every file under ``folder`` (size and SHA-256) in ``folder/manifest.json``, written last.
    ``written_by``: the command that wrote the folder (``folders.install`` replaces only what such a manifest
    lists)."""
    entries = {}
    for rel in _files(folder):
        p = os.path.join(folder, rel)
        entries[rel.replace(os.sep, "/")] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
    manifest = {"format": 1, "files": entries, **({"written_by": written_by} if written_by else {})}
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def check_safetensors(path: str) -> None:
    """Structural check of a safetensors file: a readable header whose tensors end exactly at the end of the file."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise IntegrityError(f"{path}: truncated ({size} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise IntegrityError(f"{path}: truncated (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{path}: damaged safetensors header") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise IntegrityError(f"{path}: {'truncated' if size < expected else 'has trailing bytes'} "
                             f"({size} bytes, its header describes {expected})")


def check_folder(folder: str, required: tuple[str, ...] = ()) -> None:
    """Raise ``IntegrityError`` unless ``folder`` is whole: with a manifest, every file listed has its recorded size
    and digest; without one (folders written before manifests), every JSON file parses and every safetensors file
    matches its header. ``required`` files must exist either way."""
    if not os.path.isdir(folder):
        raise IntegrityError(f"{folder}: no such folder")
    for rel in required:
        if not os.path.isfile(os.path.join(folder, rel)):
            raise IntegrityError(f"{folder}: {rel} is missing")
    mpath = os.path.join(folder, MANIFEST)
    if os.path.isfile(mpath):
        try:
            with open(mpath) as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise IntegrityError(f"{mpath}: damaged manifest") from None
        for rel, want in sorted(files.items()):
            p = os.path.join(folder, *rel.split("/"))
            if not os.path.isfile(p):
                raise IntegrityError(f"{p}: missing (listed in the manifest)")
            size = os.path.getsize(p)
            if size != want["size"]:
                raise IntegrityError(f"{p}: {size} bytes, the manifest records {want['size']}")
            if sha256_file(p) != want["sha256"]:
                raise IntegrityError(f"{p}: contents differ from the manifest's SHA-256 (damaged)")
        return
    for rel in _files(folder):
        p = os.path.join(folder, rel)
        if rel.endswith(".safetensors"):
            check_safetensors(p)
        elif rel.endswith(".json"):
            try:
                with open(p) as f:
                    json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise IntegrityError(f"{p}: damaged JSON (truncated?)") from None


CHECKPOINT_FILES = ("trainer_state.json", "rng.safetensors", os.path.join("model", "config.json"),
                    os.path.join("model", "diffusion_pytorch_model.safetensors"))
CHECKPOINT_FORMAT = 2  # trainer_state.json's "format": written with a manifest (absent: from before manifests)


def _manifest_expected(path: str) -> str | None:
    """Why the checkpoint ``path`` should have a manifest (None: it is structurally one from before manifests)."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            if "format" in json.load(f):
                return "its trainer_state.json says it was written with one"
    except (OSError, ValueError, TypeError):
        return None  # check_folder names the damaged or missing file
    root = os.path.dirname(os.path.abspath(path))
    if any(os.path.isfile(os.path.join(root, name, MANIFEST)) for _, name in checkpoint_steps(root)):
        return "the run's other checkpoints have one"
    return None


def check_checkpoint(path: str) -> None:
    """``check_folder`` for a training checkpoint. One without its manifest passes only when it is structurally a
    checkpoint from before manifests (no ``format`` in its trainer_state.json, no manifest beside it in its run):
    a deleted manifest would otherwise let damaged files through, and the next save bless them with a new one."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MANIFEST)):
        why = _manifest_expected(path)
        if why:
            raise IntegrityError(f"{path}: {MANIFEST} is missing ({why}), so its files cannot be checked")
    check_folder(path, CHECKPOINT_FILES)


def checkpoint_steps(root: str) -> list[tuple[int, str]]:
    """(step, folder name) of every ``step_*`` folder under ``root``, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP.match(d))
             and os.path.isdir(os.path.join(root, d))]
    return sorted(found, reverse=True)


def newest_checkpoint(root: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest whole checkpoint under ``root`` or None, [(folder, why it was passed over)] for newer ones).

    ``latest.json`` names the checkpoint a run last finished; a newer whole one (a crash between the two writes)
    still wins, and a damaged or missing target of ``latest.json`` is reported and passed over."""
    skipped: list[tuple[str, str]] = []
    lpath = os.path.join(root, LATEST)
    if os.path.exists(lpath):
        try:
            with open(lpath) as f:
                named = json.load(f)["path"]
            if not os.path.isdir(os.path.join(root, named)):
                skipped.append((named, f"named by {LATEST} but missing"))
        except (OSError, ValueError, KeyError, TypeError):
            skipped.append((LATEST, "damaged (truncated?); looking at the step_* folders instead"))
    for _, name in checkpoint_steps(root):
        path = os.path.join(root, name)
        try:
            check_checkpoint(path)
        except IntegrityError as e:
            skipped.append((name, str(e)))
            continue
        return path, skipped
    return None, skipped
