"""tools/plot_metrics.py: reading curves from metrics.jsonl, the trailing mean, the PNG and
the errors for bad input."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO, run_tool

_spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "tools" / "plot_metrics.py")
plot_metrics = sys.modules["plot_metrics"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_metrics)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_curve_skips_rows_without_the_key_and_non_finite_values(tmp_path):
    p = _write(tmp_path / "metrics.jsonl", [
        {"step": 1, "score_mean": 0.5}, {"step": 1, "exact_match": 0.6}, {"step": 2, "score_mean": float("nan")},
        {"step": 3, "score_mean": -1.0}, {"score_mean": 9.0}])
    assert plot_metrics.read_curve(str(p), "score_mean") == ([1, 3], [0.5, -1.0])


def test_read_curve_keeps_the_last_value_of_a_step_logged_again_after_a_resume(tmp_path):
    p = _write(tmp_path / "metrics.jsonl", [{"step": s, "kl": float(s)} for s in (1, 2, 3)]
               + [{"step": s, "kl": 10.0 * s} for s in (3, 4)])
    assert plot_metrics.read_curve(str(p), "kl") == ([1, 2, 3, 4], [1.0, 2.0, 30.0, 40.0])


def test_trailing_mean_matches_a_direct_computation():
    xs = [3.0, -1.0, 4.0, 1.0, -5.0, 9.0, 2.0]
    for w in (1, 2, 3, 10):
        expect = [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]
        assert plot_metrics.trailing_mean(xs, w) == pytest.approx(expect)


def test_cli_writes_a_png_and_counts_points(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"step": i, "score_mean": i * 0.1, "train_accuracy": 0.5} for i in range(1, 6)])
    b = _write(tmp_path / "b.jsonl", [{"step": i, "score_mean": -i * 0.1} for i in range(1, 4)])
    out = tmp_path / "c.png"
    r = run_tool("tools/plot_metrics.py", a, b, "--keys", "score_mean", "train_accuracy", "--smooth", "2",
                 "--label", "s1", "--label", "s2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "score_mean: s1 5 steps, s2 3 steps" in r.stdout
    assert "train_accuracy: s1 5 steps, s2 0 steps" in r.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_name_the_key_the_file_and_the_line(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"step": 1, "score_mean": 0.1}])
    r = run_tool("tools/plot_metrics.py", a, "--keys", "kl_nope", "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "no run logs 'kl_nope'" in r.stderr and str(a) in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "score_mean": 0.1}\n{oops\n')
    r = run_tool("tools/plot_metrics.py", bad, "--out", tmp_path / "x.png")
    assert r.returncode != 0 and f"{bad}:2: not JSON" in r.stderr
    r = run_tool("tools/plot_metrics.py", a, "--label", "one", "--label", "two", "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "--label given 2 times for 1 files" in r.stderr
    r = run_tool("tools/plot_metrics.py", tmp_path / "missing.jsonl", "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "missing.jsonl: no such file" in r.stderr
