"""lowshot.plan: the resource model's fit against synthetic measurements (closed form), and its CLI."""
import json

import pytest

from lowshot import plan


def test_fit_recovers_a_known_coefficient_and_least_squares():
    # measurements made by the formula itself: the fit recovers the coefficient exactly
    meas = {N: {"table_s": 3e-9 * plan.work(N)["pairs"]} for N in (10**6, 10**7)}
    assert plan.fit(meas)["table_s"] == pytest.approx(3e-9, rel=1e-12)
    # two points off by +10% and -10%: the relative least squares balances them (closed form)
    x1, x2 = plan.work(10**6)["pairs"], plan.work(10**7)["pairs"]
    meas = {10**6: {"table_s": 1.1 * x1}, 10**7: {"table_s": 0.9 * x2}}
    r = [1 / 1.1, 1 / 0.9]
    assert plan.fit(meas)["table_s"] == pytest.approx(sum(r) / sum(v * v for v in r))


def test_plan_scales_with_shards_and_prints(capsys):
    p1 = plan.plan(10**8, shards=1)
    p64 = plan.plan(10**8, shards=64)
    s1 = {r["stage"]: r for r in p1["stages"]}
    s64 = {r["stage"]: r for r in p64["stages"]}
    # the table's total work does not depend on the sharding; each task gets its share of chunks
    assert s64["graph shard"]["core_h"] == pytest.approx(s1["graph shard"]["core_h"])
    assert s64["graph shard"]["task_h"] < s1["graph shard"]["task_h"] / 30
    assert p64["nchunks"] == 96 and p64["nlist"] == 40000 and p64["nprobe"] == 14
    # disk: the lists (4 N d bytes) and the tables (8 N K bytes)
    assert s1["graph merge"]["disk_gib"] == pytest.approx((4 * 10**8 * 256 + 8 * 10**8 * 32) / 2**30)
    assert plan.main(["100000000", "--shards", "64"]) == 0
    out = capsys.readouterr().out
    assert "| graph shard | 64 |" in out and "nprobe 14" in out
    assert plan.main(["1000000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["N"] == 10**6
    assert plan.main(["--check"]) == 0
    with pytest.raises(SystemExit):
        plan.main(["0"])
