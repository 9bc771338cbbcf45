"""Test instrumentation (tests/tiny_workflow.py puts this folder on PYTHONPATH for one run).

Records, in every Python process of a workflow run, each file under $ELS_AUDIT_ROOT that is
opened for writing and each rename into it (os.rename / os.replace / Path.replace), as JSON lines
in $ELS_AUDIT_LOG, through Python's audit hooks (PEP 578). The test then checks that every output
was renamed into place and never written under its final name. Writes done outside Python (e.g.
safetensors' Rust writer) are not seen as opens, but their rename into place is.

Fault injection: with $ELS_AUDIT_PAUSE set, a process about to rename a file whose destination
path contains that text (the output, complete, still under its temporary name) records a "paused"
entry and waits until the file $ELS_AUDIT_RELEASE exists (at most 300 s), so that a test can kill it
(or its Snakemake) at that very moment.
"""

import os
import sys

_LOG = os.environ.get("ELS_AUDIT_LOG")
_ROOT = os.environ.get("ELS_AUDIT_ROOT")
_PAUSE = os.environ.get("ELS_AUDIT_PAUSE")
_RELEASE = os.environ.get("ELS_AUDIT_RELEASE")

if _LOG and _ROOT:
    import json
    import threading

    _root = os.path.realpath(_ROOT)
    _busy = threading.local()
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def _under_root(path):
        if isinstance(path, int) or path is None:
            return None
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return None
        full = os.path.realpath(os.path.join(os.getcwd(), path))
        return full if full == _root or full.startswith(_root + os.sep) else None

    def _record(entry):
        _busy.on = True
        try:
            fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(entry) + "\n").encode())
            finally:
                os.close(fd)
        finally:
            _busy.on = False

    def _pause(full):
        import time

        _record({"event": "paused", "path": full, "pid": os.getpid()})
        end = time.monotonic() + 300
        while time.monotonic() < end and not (_RELEASE and os.path.exists(_RELEASE)):
            time.sleep(0.05)

    def _hook(event, args):
        if getattr(_busy, "on", False):
            return
        try:
            if event == "open":
                path, mode, flags = args
                if isinstance(mode, str):
                    writes = any(c in mode for c in "wax+")
                else:
                    writes = bool((flags or 0) & _WRITE_FLAGS)
                full = _under_root(path) if writes else None
                if full:
                    _record({"event": "write", "path": full, "pid": os.getpid()})
            elif event == "os.rename":
                src, dst = args[0], args[1]
                full = _under_root(dst)
                if full and _PAUSE and _PAUSE in full:
                    _pause(full)
                if full:
                    _record(
                        {
                            "event": "rename",
                            "src": _under_root(src),
                            "path": full,
                            "pid": os.getpid(),
                        }
                    )
            elif event == "shutil.copyfile":
                full = _under_root(args[1])
                if full:
                    _record({"event": "write", "path": full, "pid": os.getpid()})
        except Exception:  # never break the process under test
            pass

    sys.addaudithook(_hook)
