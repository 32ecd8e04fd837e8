"""lowshot.common's progress lines: the same line printed by a script or a library module, and
given to the module's own logger (a child of ``lowshot``) inside the Python API; and the workers'
start, which loses no Ctrl-C."""
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap

from lowshot import common, features

LINE = r"\[ *\d+\.\d\d s, RSS +\d+\.\d\d GiB\] "


def test_module_logger_prints_the_scripts_line(capsys):
    common.log("script", 1)
    features.log("module", 2)
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(LINE + "script 1", out[0]) and re.fullmatch(LINE + "module 2", out[1])


def test_module_logger_inside_the_api(capsys, caplog):
    log = common.logger("lowshot.pca")
    with common.library_logging():
        log("silent")           # no handler configured: nothing printed
        assert capsys.readouterr().out == ""
        with caplog.at_level(logging.INFO, logger="lowshot"):
            log("seen", 3)
            common.log("top")
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert [(n, lv) for n, lv, _ in records] == [("lowshot.pca", logging.INFO), ("lowshot", logging.INFO)]
    assert re.fullmatch(LINE + "seen 3", records[0][2]) and re.fullmatch(LINE + "top", records[1][2])
    # the module's logger configures nothing of its own: its records go up to "lowshot"
    assert not logging.getLogger("lowshot.pca").handlers and logging.getLogger("lowshot.pca").propagate


# Ctrl-C lands exactly while the child is forked: an at-fork hook of the parent sends the SIGINT
CTRL_C_AT_FORK = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    sys.path.insert(0, %r)
    from lowshot import common
    os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))
    try:
        p = common.start_child(["sleep", "30"]) if sys.argv[1] == "start_child" else \\
            subprocess.Popen(["sleep", "30"], preexec_fn=lambda: None)
    except KeyboardInterrupt:
        print("interrupted")
    else:
        print("went on"); p.kill()
    time.sleep(0.2)
    print("sleep left running" if os.system("pgrep -P %%d -x sleep >/dev/null" %% os.getpid()) == 0 else "no sleep")
""") % os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_ctrl_c_at_fork(how):
    return subprocess.run([sys.executable, "-c", CTRL_C_AT_FORK, how], capture_output=True, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), timeout=60)


def test_ctrl_c_while_starting_a_worker_is_not_lost():
    """CPython drops what its at-fork hooks raise, so a plain Popen loses a Ctrl-C that lands there
    (the launcher then ran on to the end, exit status 0); start_child raises it and stops the child."""
    plain = run_ctrl_c_at_fork("popen")
    assert plain.stdout.splitlines()[0] == "went on", plain.stdout + plain.stderr
    r = run_ctrl_c_at_fork("start_child")
    assert r.returncode == 0 and r.stdout.splitlines() == ["interrupted", "no sleep"], r.stdout + r.stderr
