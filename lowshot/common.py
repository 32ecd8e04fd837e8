"""Helpers every stage shares: logging with time and memory, the data root, atomic outputs, errors.

Nothing here reads the environment or touches files at import time.
"""
import argparse
import contextlib
import glob
import json
import logging
import os
import re
import resource
import socket
import sys
import time

import psutil

_T0 = time.time()


class InputError(ValueError):
    """A problem with the user's input (missing file, wrong shape, bad flag value).

    Scripts turn it into a one-line ``error: ...`` message and exit status 2, never a traceback.
    The message should name the file and the problem.
    """


def rss_gib():
    """Resident memory of this process now, in GiB."""
    return psutil.Process().memory_info().rss / 2**30


def anon_rss_gib():
    """The process' own resident memory in GiB: RSS less the pages of memory-mapped files (page
    cache, which the kernel can drop and other processes share). Linux; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def peak_rss_gib():
    """Peak resident memory of this process so far, in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class OwnMemoryPeak:
    """Peak of :func:`anon_rss_gib` (the process' own memory, page cache of mapped files left out),
    sampled every ``interval`` seconds by a daemon thread while running: the kernel keeps only the
    peak of the whole RSS (ru_maxrss), which counts the mapped inputs' pages too.

    Sampled from its creation until the process ends: ``own = OwnMemoryPeak()`` ... ``own.gib``.
    """

    def __init__(self, interval=0.05):
        import threading
        self.interval = interval
        self._peak = anon_rss_gib() or 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            time.sleep(self.interval)
            self._peak = max(self._peak, anon_rss_gib() or 0.0)

    @property
    def gib(self):
        """The peak so far, GiB."""
        return max(self._peak, anon_rss_gib() or 0.0)


LOG = logging.getLogger("lowshot")
# > 0 inside library_logging(): progress goes to the "lowshot" logger instead of stdout
_TO_LOGGER = [0]


def log(*msg):
    """Print one progress line prefixed with elapsed seconds and resident memory; flushes.

    Inside :func:`library_logging` (the Python API) the line goes to the ``lowshot`` logger at INFO
    level instead: silent unless the caller configures logging."""
    line = "[%8.2f s, RSS %6.2f GiB] %s" % (time.time() - _T0, rss_gib(), " ".join(str(m) for m in msg))
    if _TO_LOGGER[0]:
        LOG.info(line)
    else:
        print(line, flush=True)


@contextlib.contextmanager
def library_logging():
    """Within this block :func:`log` writes to ``logging.getLogger("lowshot")`` rather than stdout:
    the scripts print their progress, the Python API's callers choose with :mod:`logging`."""
    _TO_LOGGER[0] += 1
    try:
        yield
    finally:
        _TO_LOGGER[0] -= 1


def print_args(args):
    """First line of every script: the arguments it runs with."""
    print("args:", json.dumps(vars(args), sort_keys=True, default=str), flush=True)


def print_result(result):
    """Last line of every script: one JSON object that parsers read (never parse other lines)."""
    print(json.dumps(result, sort_keys=True), flush=True)


def get_ddir(ddir=None, must_exist=True):
    """The data root: the ``--ddir`` flag if given, else ``$DDIR``; a clear error when neither is usable."""
    ddir = ddir or os.environ.get("DDIR")
    if not ddir:
        raise InputError("no data directory: set $DDIR or pass --ddir")
    if must_exist and not os.path.isdir(ddir):
        raise InputError("data directory %s (from --ddir or $DDIR) does not exist" % ddir)
    return ddir


def require_file(path, what="input file"):
    """Raise InputError naming ``path`` when it is not an existing file."""
    if not os.path.isfile(path):
        raise InputError("%s %s does not exist" % (what, path))
    return path


def _host():
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def temporary_path(path):
    """``.{name}.tmp{pid}-{host}`` next to ``path``: the temporary of an atomic write (the form
    :func:`remove_stale_temporaries` reads back)."""
    d = os.path.dirname(os.path.abspath(path))
    return os.path.join(d, ".%s.tmp%d-%s" % (os.path.basename(path), os.getpid(), _host()))


def fsync_path(path, directory=False):
    """Flush a file (or, with ``directory``, a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    The temporary is ``.{name}.tmp{pid}-{host}`` (so :func:`remove_stale_temporaries` can tell a dead
    writer's leftovers from a live one's). The file is fsync'd before the rename and the folder after
    it: after a crash the final name holds the whole file or does not exist. An interrupted or failing
    writer leaves no file under the final name (and removes its temporary, unless SIGKILLed).
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(d, directory=True)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pid_alive(pid):
    """True when a process ``pid`` exists on this host (signal 0; one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder):
    """Remove the :func:`atomic_output` temporaries in ``folder`` whose writer, on this host, is gone
    (a SIGKILLed or crashed run); those of live processes and of other hosts stay. Returns the
    removed paths."""
    removed = []
    host = _host()
    for p in glob.glob(os.path.join(glob.escape(folder), ".*.tmp*")):
        m = re.search(r"\.tmp(\d+)-([A-Za-z0-9_-]+)$", p)
        if m and m.group(2) == host and not pid_alive(int(m.group(1))):
            try:
                os.remove(p)
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def write_json(path, obj):
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def run_main(main, argv=None):
    """Run a script's ``main(argv)``; turn InputError into ``error: ...`` on stderr and exit status 2.

    SIGTERM (what Slurm sends at a time limit or a preemption, before SIGKILL) exits through the
    ``finally`` blocks, so :func:`atomic_output` removes its temporaries (status 143)."""
    import signal
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return main(argv)
    except InputError as e:
        print("error: %s" % e, file=sys.stderr, flush=True)
        sys.exit(2)


def merge_config(default, given, where, free=(), path=()):
    """``default`` (nested dicts) updated by ``given``: a key ``default`` lacks, or a mapping given
    a non-mapping, is a one-line InputError naming ``where`` (the config file) and the key's path.
    ``free``: key paths (tuples) whose mappings take any keys (e.g. Slurm options)."""
    import copy
    out = copy.deepcopy(default)
    path = list(path)
    for key, val in given.items():
        if key not in default:
            raise InputError("config %s: unknown key %r%s (known: %s)" % (
                where, key, " in " + ".".join(path) if path else "", ", ".join(sorted(default))))
        if isinstance(default[key], dict) and tuple(path + [key]) not in free:
            if not isinstance(val, dict):
                raise InputError("config %s: %s must be a mapping" % (where, ".".join(path + [key])))
            out[key] = merge_config(default[key], val, where, free, path + [key])
        else:
            out[key] = val
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's layout and shows each option's default (when it has one
    and its help does not already say it)."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("default" not in h and d is not None and d is not False and d is not argparse.SUPPRESS
                and d != [] and action.option_strings and action.nargs != 0):
            h += " (default: %(default)s)"
        return h
