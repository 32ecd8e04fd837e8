"""lowshot.cpus: the CPUs a process may use (affinity mask, cgroup quota), against hand-made cgroup
trees, and the scripts' environment under a quota."""
import os
import subprocess
import sys

from lowshot import cpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cgroup_tree(tmp_path, files, own="/user.slice/job"):
    root = tmp_path / "cg"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::%s\n" % own)
    return str(root), str(proc)


def test_no_quota(tmp_path):
    root, proc = cgroup_tree(tmp_path, {"cpu.max": "max 100000\n", "user.slice/job/cpu.max": "max 100000\n"})
    assert cpus.cgroup_cpu_limit(root, proc) is None
    assert cpus.available_cpus(root, proc) == len(os.sched_getaffinity(0))


def test_quota_of_a_parent_caps(tmp_path):
    root, proc = cgroup_tree(tmp_path, {"user.slice/cpu.max": "150000 100000\n",
                                        "user.slice/job/cpu.max": "max 100000\n"})
    assert cpus.cgroup_cpu_limit(root, proc) == 1.5
    assert cpus.available_cpus(root, proc) == min(2, len(os.sched_getaffinity(0)))


def test_smallest_quota_wins_and_at_least_one(tmp_path):
    root, proc = cgroup_tree(tmp_path, {"user.slice/cpu.max": "400000 100000\n",
                                        "user.slice/job/cpu.max": "20000 100000\n"})
    assert cpus.cgroup_cpu_limit(root, proc) == 0.2
    assert cpus.available_cpus(root, proc) == 1


def test_cgroup_v1(tmp_path):
    root, proc = cgroup_tree(tmp_path, {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cpus.cgroup_cpu_limit(root, proc) == 1.0
    root, proc = cgroup_tree(tmp_path / "b", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cpus.cgroup_cpu_limit(root, proc) is None


def test_unreadable_tree_means_no_quota(tmp_path):
    assert cpus.cgroup_cpu_limit(str(tmp_path / "absent"), str(tmp_path / "absent_proc")) is None


def test_scripts_follow_a_quota_below_the_mask(tmp_path, monkeypatch):
    """omp_env sets OMP_NUM_THREADS from a quota smaller than the affinity mask (and torch follows), and
    leaves a user's setting alone."""
    root, proc = cgroup_tree(tmp_path, {"user.slice/job/cpu.max": "100000 100000\n"})
    code = ("import lowshot.cpus as c; c.CGROUP_ROOT = %r\n"
            "import functools; c.available_cpus = functools.partial(c.available_cpus, %r, %r)\n"
            "import os, lowshot.omp_env, torch\n"
            "print(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())" % (root, root, proc))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=ROOT)
    if len(os.sched_getaffinity(0)) > 1:
        assert out.stdout.split() == ["1", "1"]
    else:
        assert out.stdout.split()[0] == "None"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=dict(env, OMP_NUM_THREADS="2"))
    assert out.stdout.split()[0] == "2"
