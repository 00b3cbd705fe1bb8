"""Output folders a tool writes as a whole (an exported model, a converted restorer) without ever deleting what it
did not write.

``check_destination`` runs before any work: it refuses a destination that is, holds or lies inside one of the
tool's own inputs, a file, or a non-empty folder unless ``overwrite`` is given. ``install`` then moves a finished
staging folder into place: a fresh or empty destination is one rename; an existing one gets the new files one by one
(each an atomic rename, the manifest last) and loses only the files the previous write of the same tool listed in its
manifest and this one no longer writes. Everything else in the folder stays as it was.
"""

from __future__ import annotations

import json
import os
import shutil

from mfsr_fast.io.integrity import MANIFEST


class FolderError(ValueError):
    """A destination folder the tool refuses to write into; the message says why and what to do."""


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it (real paths: links resolved)."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_destination(out: str, *, inputs: tuple[str, ...] = (), overwrite: bool = False, what: str = "output",
                      flag: str = "--overwrite", nested: bool = False) -> None:
    """Raise ``FolderError`` unless ``out`` may be written: it must not be any of ``inputs`` (nor, unless ``nested``,
    hold one or lie inside one); it must be absent, an empty folder, or (with ``overwrite``) a folder."""
    for src in inputs:
        same = bool(src) and os.path.exists(src) and os.path.realpath(out) == os.path.realpath(src)
        if same or (src and os.path.exists(src) and not nested and (_inside(out, src) or _inside(src, out))):
            rel = "is" if os.path.realpath(out) == os.path.realpath(src) else (
                "lies inside" if _inside(out, src) else "holds")
            raise FolderError(f"{what} {out} {rel} {src}, which it is made from: choose a folder outside it")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FolderError(f"{what} {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        kind = "an earlier output of this command" if os.path.isfile(os.path.join(out, MANIFEST)) else "files"
        raise FolderError(f"{what} {out} already holds {kind}; pass {flag} to replace this command's own files "
                          "in it (nothing else is touched), or choose an empty or new folder")


def _owned(folder: str) -> set[str]:
    """The files a previous write of a command listed in ``folder``'s manifest (relative, '/'-separated); empty
    without one, or when the manifest is not one a command of this package wrote."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        return set(manifest["files"]) if manifest.get("written_by") else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _relfiles(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/") for f in sorted(files)]
    return out


def install(stage: str, out: str) -> None:
    """Move the finished folder ``stage`` to ``out`` (see the module docstring); ``stage`` is gone afterwards."""
    if not os.path.isdir(out) or not os.listdir(out):
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(stage, out)
        return
    new = _relfiles(stage)
    for rel in new:  # refuse before moving anything: a folder of the user's where a file of ours goes
        dest = os.path.join(out, *rel.split("/"))
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise FolderError(f"{dest} is a folder; this command would write a file there. Move it, or choose "
                              "another output folder")
    stale = _owned(out) - set(new)
    ordered = [r for r in new if r != MANIFEST] + [r for r in new if r == MANIFEST]
    for rel in ordered:
        dest = os.path.join(out, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(os.path.join(stage, *rel.split("/")), dest)
    for rel in sorted(stale):
        p = os.path.join(out, *rel.split("/"))
        if os.path.isfile(p) or os.path.islink(p):
            os.unlink(p)
    shutil.rmtree(stage, ignore_errors=True)
