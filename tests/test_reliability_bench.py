"""``ctalign bench --plot`` without matplotlib (issue #21): the tables are printed and one line says
that plots need ``pip install 'ctalign[bench]'``; no internal error."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def test_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    import ctalign.bench as bench
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "bench.png"
    assert bench.write_plot({"results": [], "build_map": [], "machine": {}}, out) is False
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [bench.PLOT_NEEDS] and "pip install 'ctalign[bench]'" in lines[0]
    assert not out.exists()


def test_bench_extra_holds_matplotlib():
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert any(d.startswith("matplotlib") for d in meta["project"]["optional-dependencies"]["bench"])
