"""The ctalign command line: reports, --json, exit codes and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctalign import cli
from ctalign.alignment_map import AlignmentMap

PYTHON_DIR = str(Path(cli.__file__).resolve().parents[1])


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("ctalign: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "pair.ctmap"
    rc = cli.main(["build-map", "asset:botchan-bpe", "asset:mistral-v1", "-o", str(path), "--json", "-q"])
    assert rc == 0
    return path


def test_build_map_human_report(capsys, tmp_path):
    out_path = tmp_path / "m.ctmap"
    rc, out, err = run(capsys, "build-map", "asset:mistral-v1", "asset:botchan-bpe", "-o", str(out_path))
    assert rc == 0 and err == ""  # progress lines only on a terminal
    for key in ("teacher", "student", "regime", "identical", "cover", "warnings", "time", "parse", "build"):
        assert key in out, key
    assert "mistral-v1 (sentencepiece_bpe)" in out and "general" in out
    assert AlignmentMap.load(out_path).regime == "general"


def test_build_map_json_and_progress(capsys, tmp_path):
    out_path = tmp_path / "m.ctmap"
    rc, out, err = run(capsys, "build-map", "asset:botchan-bpe", "asset:botchan-bpe", "-o", str(out_path), "--json",
                       "--progress")
    assert rc == 0
    rep = json.loads(out)
    assert rep["regime"] == "identical" and rep["file_bytes"] == out_path.stat().st_size
    assert {"parse_s", "build_s", "encode_raw_s", "core_s", "save_s"} <= set(rep["timings"])
    assert "loading teacher" in err and "building the map" in err


def test_inspect(capsys, built):
    rc, out, err = run(capsys, "inspect", str(built))
    assert rc == 0 and "regime" in out and str(built) in out and err == ""
    rc, out, _ = run(capsys, "inspect", str(built), "--json")
    rep = json.loads(out)
    assert rep["teacher"]["name"] == "botchan-bpe" and rep["student"]["name"] == "mistral-v1"
    assert "load_s" in rep["timings"]
    rc, out, _ = run(capsys, "inspect", str(built), "--json", "--teacher", "asset:botchan-bpe",
                     "--student", "asset:mistral-v1")
    assert rc == 0 and json.loads(out)["verified_against"]["teacher"] == "asset:botchan-bpe"


def test_inspect_against_other_tokenizers(capsys, built):
    rc, _, err = run(capsys, "inspect", str(built), "--student", "asset:mistral-v3")
    assert rc == 2
    line = one_error_line(err)
    assert "student 'mistral-v1'" in line and "mistral-v3" in line


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "empty"])
def test_corrupt_map(capsys, built, tmp_path, damage):
    data = bytearray(built.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "magic":
        data[:8] = b"NOTAMAP!"
    else:
        data = bytearray()
    bad = tmp_path / "bad.ctmap"
    bad.write_bytes(bytes(data))
    rc, out, err = run(capsys, "inspect", str(bad))
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert str(bad) in line
    assert {"truncate": "truncated", "flip": "checksum", "magic": "not a ctalign", "empty": "not a ctalign"}[damage] in line


def test_missing_and_unknown_inputs(capsys, tmp_path):
    out = str(tmp_path / "x.ctmap")
    missing = tmp_path / "nope" / "tokenizer.json"
    rc, _, err = run(capsys, "build-map", str(missing), "asset:botchan-bpe", "-o", out)
    assert rc == 2 and str(missing) in one_error_line(err)
    garbage = tmp_path / "weird.bin"
    garbage.write_bytes(b"\x00\x01 this is no tokenizer \xff" * 10)
    rc, _, err = run(capsys, "build-map", "asset:botchan-bpe", str(garbage), "-o", out)
    assert rc == 2 and "weird.bin" in one_error_line(err)
    rc, _, err = run(capsys, "build-map", "asset:no-such-thing", "asset:botchan-bpe", "-o", out)
    assert rc == 2 and "asset:no-such-thing" in one_error_line(err)
    rc, _, err = run(capsys, "inspect", str(tmp_path / "none.ctmap"))
    assert rc == 2 and "no such file" in one_error_line(err)
    rc, _, err = run(capsys, "build-map", "asset:botchan-bpe", "asset:botchan-bpe", "-o",
                     str(tmp_path / "no" / "dir" / "x.ctmap"))
    assert rc == 2 and "does not exist" in one_error_line(err)
    assert not (tmp_path / "x.ctmap").exists()


def test_usage_errors(capsys):
    for argv in (["build-map", "a"], ["frobnicate"], [], ["shrink-vocab", "asset:cl100k", "--vocab-size", "many", "-o", "x"]):
        rc, _, err = run(capsys, *argv)
        assert rc == 2, argv
        one_error_line(err)
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "build-map" in out


def test_shrink_vocab_command(capsys, tmp_path):
    rc, out, err = run(capsys, "shrink-vocab", "asset:gpt2", "--vocab-size", "400", "-o", str(tmp_path / "s"), "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["regular_tokens"] == 400 and Path(info["tokenizer_json"]).is_file()
    rc, _, err = run(capsys, "shrink-vocab", "asset:botchan-unigram", "--vocab-size", "400", "-o", str(tmp_path / "u"))
    assert rc == 2 and "unigram" in one_error_line(err)
    rc, _, err = run(capsys, "shrink-vocab", "asset:gpt2", "--vocab-size", "10", "-o", str(tmp_path / "v"))
    assert rc == 2 and "--vocab-size 10" in one_error_line(err)


def test_unexpected_error_exit_1(capsys, monkeypatch, tmp_path):
    import ctalign.alignment_map as am

    def boom(*a, **k):
        raise RuntimeError("something\nbroke")
    monkeypatch.setattr(am, "build_map", boom)
    argv = ["build-map", "asset:botchan-bpe", "asset:botchan-bpe", "-o", str(tmp_path / "x")]
    rc, _, err = run(capsys, *argv)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "RuntimeError: something broke" in lines[0] and "--debug" in lines[0]
    rc, _, err = run(capsys, *argv, "--debug")
    assert rc == 1 and "Traceback" in err


def test_bench_is_forwarded(capsys, monkeypatch):
    import types
    seen = {}
    fake = types.ModuleType("ctalign.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "ctalign.bench", fake)
    assert cli.main(["bench", "--quick", "ops", "-o", "x.json"]) == 0
    assert seen["argv"] == ["--quick", "ops", "-o", "x.json"]


def test_subprocess_exit_codes(tmp_path):
    """The real process: exit status and a single stderr line, with no traceback."""
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    missing = tmp_path / "missing.ctmap"
    p = subprocess.run([sys.executable, "-m", "ctalign.cli", "inspect", str(missing)], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == f"ctalign: error: {missing}: no such file"
