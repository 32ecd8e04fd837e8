"""lowshot.progress: the lines of a long step, against hand-computed rates and ETAs on a fake clock."""
from lowshot.progress import Progress


def test_progress_lines_on_a_fake_clock():
    now = [100.0]
    lines = []
    p = Progress("table", 1000, unit="rows", every=30, clock=lambda: now[0], emit=lines.append)
    now[0] = 110.0
    p.update(100)                      # 10 s after the start: quiet
    assert lines == []
    now[0] = 130.0
    p.update(300)                      # 300 rows in 30 s: 10 rows/s, 700 left: 70 s
    assert lines == ["  table: 300 / 1000 rows (10 rows/s, ETA 70 s)"]
    now[0] = 159.0
    p.update(590)                      # 29 s after the last line: quiet
    assert len(lines) == 1
    now[0] = 180.0
    p.update(800)                      # 800 rows in 80 s: 10 rows/s, 200 left: 20 s
    assert lines[-1] == "  table: 800 / 1000 rows (10 rows/s, ETA 20 s)"
    assert p.line(0).endswith("(0 rows/s, ETA inf s)")
