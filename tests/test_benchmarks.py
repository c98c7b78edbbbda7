"""The benchmark scripts run correctly at a tiny size (their numbers go in the README and
benchmarks/RESULTS.md; speed is never asserted in a test)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_runs_on_cpu_at_a_tiny_size():
    p = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--tiny"], capture_output=True,
                       text=True, timeout=240, env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout + p.stderr
    rates = {(m, prec): float(r) for m, prec, r in
             re.findall(r"train (\w+)\s+(bf16|fp32) batch\s+\d+:\s+([\d.]+) images/s", p.stdout)}
    assert set(rates) == {(m, prec) for m in ("grafit", "ce") for prec in ("bf16", "fp32")}, p.stdout
    assert all(r > 0 for r in rates.values())
    ev = re.search(r"kNN top-1 ([\d.]+), mAP ([\d.]+)", p.stdout)
    assert ev and 0 < float(ev.group(1)) <= 1 and 0 < float(ev.group(2)) <= 1, p.stdout


def test_eval_scale_benchmark_checks_itself_against_sklearn():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "eval_scale.py"), "--sizes", "3000",
                        "--queries", "64", "--repeat", "1"], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr          # it asserts its mAP equals sklearn's
    row = p.stdout.strip().splitlines()[-1].split()
    assert int(row[0]) == 3000 and 0 < float(row[3]) <= 1
