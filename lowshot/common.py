"""Helpers every stage shares: logging with time and memory, the data root, atomic outputs, errors.

Nothing here reads the environment or touches files at import time.

Over 400 lines: the small pieces every script and library module calls (the log line, InputError and
run_main's one-line errors, the argparse types, atomic and locked outputs, disk-error messages, the
workers' start). Each is a few lines; the seam would be "files" against "command line", but most
callers need both, so one module keeps one import line per caller.
"""
import argparse
import contextlib
import errno
import glob
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
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
# > 0 inside library_logging(): progress goes to the loggers instead of stdout
_TO_LOGGER = [0]


def _emit(to, msg):
    """One progress line, prefixed with elapsed seconds and resident memory: printed (flushed), or
    inside :func:`library_logging` given to the logger ``to`` at INFO level."""
    line = "[%8.2f s, RSS %6.2f GiB] %s" % (time.time() - _T0, rss_gib(), " ".join(str(m) for m in msg))
    if _TO_LOGGER[0]:
        to.info(line)
    else:
        print(line, flush=True)


def log(*msg):
    """Print one progress line prefixed with elapsed seconds and resident memory; flushes.

    Inside :func:`library_logging` (the Python API) the line goes to the ``lowshot`` logger at INFO
    level instead: silent unless the caller configures logging. Library modules use their own
    logger's (:func:`logger`)."""
    _emit(LOG, msg)


def logger(name):
    """The :func:`log` of a library module: ``log = logger(__name__)``; the same lines, which inside
    :func:`library_logging` go to ``logging.getLogger(name)`` (a child of ``lowshot``), so the API's
    callers can tune one module (``logging.getLogger("lowshot.features").setLevel(...)``).
    Configures nothing: no handler, no level."""
    to = logging.getLogger(name)

    def module_log(*msg):
        _emit(to, msg)
    return module_log


@contextlib.contextmanager
def library_logging():
    """Within this block :func:`log` writes to ``logging.getLogger("lowshot")`` (a module's
    :func:`logger` to its own child of it) rather than stdout: the scripts print their progress,
    the Python API's callers choose with :mod:`logging`."""
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


# errors of the place written to, not of the program: one line naming the file (run_main, atomic_output)
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def _final_name(path):
    """The file an :func:`atomic_output` temporary stands for (``.{name}.tmp{pid}-{host}`` -> name)."""
    m = re.fullmatch(r"\.(.+)\.tmp\d+-[A-Za-z0-9_-]+", os.path.basename(path or ""))
    return os.path.join(os.path.dirname(path), m.group(1)) if m else path


def disk_error_message(e, path=None):
    """One line for an OSError of the disk (full, quota, read-only, permission): the file, the
    problem, and for a full disk the space left there."""
    path = _final_name(e.filename if isinstance(e.filename, str) else path)
    msg = "%s: %s%s" % (path or "output", "" if e.errno == errno.EACCES else "cannot write: ",
                        _DISK_ERRNOS.get(e.errno, e.strerror))
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and path:
        d = os.path.dirname(os.path.abspath(path))
        while d != os.path.dirname(d) and not os.path.isdir(d):
            d = os.path.dirname(d)
        st = os.statvfs(d)
        msg += " (%.1f MiB free in %s)" % (st.f_bavail * st.f_frsize / 2**20, d)
    return msg


@contextlib.contextmanager
def disk_errors(path):
    """Inside the block, an OSError of the disk (ENOSPC, EDQUOT, EROFS, EACCES) writing ``path``
    becomes a one-line :class:`InputError` naming it; any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        raise InputError(disk_error_message(e, path)) from e


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    The temporary is ``.{name}.tmp{pid}-{host}`` (so :func:`remove_stale_temporaries` can tell a dead
    writer's leftovers from a live one's). The file is fsync'd before the rename and the folder after
    it: after a crash the final name holds the whole file or does not exist. An interrupted or failing
    writer leaves no file under the final name (and removes its temporary, unless SIGKILLed). A full
    disk or a read-only folder is a one-line InputError naming ``path`` (:func:`disk_errors`).
    """
    d = os.path.dirname(os.path.abspath(path))
    tmp = temporary_path(path)
    try:
        with disk_errors(path):
            os.makedirs(d, exist_ok=True)
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(d, directory=True)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def mapped_output(path, dtype, shape, name=None):
    """A new file ``path`` of ``shape`` x ``dtype``, memory-mapped for writing (``np.memmap``, mode r+).

    Its blocks are reserved first (``posix_fallocate``): on a full disk, writes into a mapping of a
    sparse file kill the process with SIGBUS; here a full disk is a one-line InputError naming
    ``name`` (the final file, when ``path`` is a temporary), before anything is computed."""
    import numpy as np
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with disk_errors(name or path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
    if nbytes == 0:         # mmap refuses empty files
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r+", shape=shape)


@contextlib.contextmanager
def file_lock(path, what, shared=False):
    """Hold an ``flock`` on ``path`` for the block, so that two runs on the same outputs take turns
    instead of fighting: the second logs that it waits, then finds the first one's outputs.
    ``shared``: a shared lock (runs that may go together, e.g. the shards of one build), which an
    exclusive one waits for. The lock goes with the process: released at exit, and by the kernel
    when the process is killed (also SIGKILL); child processes do not inherit it. An exclusive
    holder removes the file when done (a waiter then finds it gone or replaced and locks the
    current one), so no lock file stays beside the outputs.

    Yields True when this run had to wait for another, False when not, None when the lock file cannot
    be created (a read-only or full place: the caller then writes nothing there, or fails there with
    a one-line error).
    """
    import fcntl
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    waited, t0 = False, time.time()
    while True:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno not in _DISK_ERRNOS:
                raise
            yield None
            return
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                log("%s: another run holds %s: waiting for it to finish" % (what, path))
            waited = True
            fcntl.flock(fd, mode)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)           # removed by the holder we waited for: lock the file there now
    if waited:
        log("%s: the other run finished after %.1f s" % (what, time.time() - t0))
    try:
        yield waited
    finally:
        if not shared:
            try:
                os.remove(path)
            except OSError:
                pass
        os.close(fd)


def die_with_parent(sig=signal.SIGTERM):
    """A ``preexec_fn`` for :mod:`subprocess`: the child receives ``sig`` when the process that
    started it dies, even by SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``), so no worker outlives its
    launcher and fights the rerun for the same files. SIGTERM: the scripts exit through their
    ``finally`` blocks (:func:`run_main`). None (no preexec) where prctl does not exist."""
    parent = os.getpid()
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec():
        prctl(1, int(sig), 0, 0, 0)       # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:        # the parent died before the prctl
            os.kill(os.getpid(), sig)
    return preexec


def start_child(cmd, ignore_sigint=False, **popen_kw):
    """``subprocess.Popen(cmd, **popen_kw)`` for a worker that dies with this process
    (:func:`die_with_parent`); ``ignore_sigint``: Ctrl-C at the terminal reaches this process alone.

    SIGINT is blocked while the child is forked: CPython runs its at-fork hooks there and drops any
    exception they raise, so a Ctrl-C landing in that window would be lost and the run go on. Held
    back, it is raised on return from here, after the child is terminated (it never outlives a
    launcher that was interrupted while starting it)."""
    die = die_with_parent()

    def preexec():
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if die is not None:
            die()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        p = subprocess.Popen(cmd, preexec_fn=preexec, **popen_kw)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)    # a Ctrl-C held back is raised here
    except BaseException:
        p.terminate()
        p.wait()
        raise
    return p


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


# what a script keeps when interrupted now: the line run_main prints on Ctrl-C (interrupt_note)
_KEPT = ["every output completed so far (each is written whole under its final name, or not at all)"]


def interrupt_note(kept):
    """Say what this script keeps if it is interrupted from now on (e.g. the rows done of a partial
    file): :func:`run_main`'s line on Ctrl-C names it."""
    _KEPT[0] = kept


def run_main(main, argv=None):
    """Run a script's ``main(argv)``; turn InputError into ``error: ...`` on stderr and exit status 2.

    A full disk, a quota, a read-only or forbidden place (OSError ENOSPC, EDQUOT, EROFS, EACCES) is
    also one line naming the file, status 2. SIGTERM (what Slurm sends at a time limit or a
    preemption, before SIGKILL) exits through the ``finally`` blocks, so :func:`atomic_output`
    removes its temporaries (status 143). Ctrl-C (SIGINT) too, then one line says what was kept
    (:func:`interrupt_note`) and that the same command continues, no traceback (status 130)."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): kept %s; the same command again continues from there" % _KEPT[0],
              file=sys.stderr, flush=True)
        sys.exit(130)
    except InputError as e:
        print("error: %s" % e, file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        print("error: %s" % disk_error_message(e), file=sys.stderr, flush=True)
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


# Flag values, checked where the flags are declared (``type=``): a bad value is a one-line error
# naming the flag (ArgumentParser below), before any work.
SEED_MAX = 2**32 - 1        # np.random.RandomState's seeds: 0 .. 2^32 - 1


def _integer(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError("expected an integer, got %r" % text)


def int_at_least(low):
    """argparse type: an integer >= ``low`` (``type=int_at_least(2)``)."""
    def check(text):
        v = _integer(text)
        if v < low:
            raise argparse.ArgumentTypeError("must be >= %d, got %d" % (low, v))
        return v
    check.__name__ = "int_at_least_%d" % low
    return check


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def seed_int(text):
    """argparse type: a seed of ``np.random.RandomState``, 0 .. 2^32 - 1."""
    v = _integer(text)
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError("a seed must be in 0..%d (2^32 - 1), got %d" % (SEED_MAX, v))
    return v


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: a bad flag (unknown, missing value, a value its ``type`` refuses) is a
    one-line :class:`InputError` (``error: argument --seed: ...``, exit status 2 under
    :func:`run_main`) instead of argparse's usage block; ``--help`` is :class:`HelpFormatter`'s."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        # no abbreviated flags (--meth for --method): a flag means what it spells, in every script,
        # and checks of what was given (build_graph.py's reuse) cannot be bypassed
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise InputError(" ".join(message.split()))


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
