"""lowshot.common's progress lines: the same line printed by a script or a library module, and
given to the module's own logger (a child of ``lowshot``) inside the Python API."""
import logging
import re

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
