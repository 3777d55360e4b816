"""examples/distill.py runs end to end for every loss, a few steps each, on small in-script models
with real tokenizers, and writes its loss curve and summary."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import the same ctalign as this process: the installed one in CI, the working tree
# (PYTHONPATH=python) in development.
PACKAGE_PARENT = str(Path(__import__("ctalign").__file__).resolve().parents[1])
SCRIPT = ROOT / "examples" / "distill.py"
QUICK = ["--steps", "3", "--teacher-steps", "3", "--batch-size", "4", "--max-length", "40", "--eval-texts", "4",
         "--chunk-chars", "120", "--no-progress", "--threads", "1"]


def load_script():
    spec = importlib.util.spec_from_file_location("ctalign_example_distill", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def distill():
    return load_script()


def check_outputs(out: Path, summary: dict, loss: str) -> None:
    assert summary["loss"] == loss
    bpb = summary["bits_per_byte"]
    for k in ("teacher", "student_before", "student_after"):
        assert math.isfinite(bpb[k]) and 0 < bpb[k] < 20, (k, bpb)
    assert math.isfinite(summary["final_loss"])
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.parametrize("loss", ["uld", "bld", "likelihood", "alm"])
def test_every_loss_runs(distill, loss, tmp_path):
    summary = distill.main(["--loss", loss, "--out", str(tmp_path)] + QUICK)
    check_outputs(tmp_path, summary, loss)


def test_large_real_vocabularies(distill, tmp_path):
    """A teacher and a student with the vocabulary sizes of mistral-v1 (32,000) and GPT-2 (50,257)."""
    summary = distill.main(["--loss", "likelihood", "--teacher-tokenizer", "mistral-v1", "--student-tokenizer",
                            "gpt2", "--out", str(tmp_path)] + QUICK)
    check_outputs(tmp_path, summary, "likelihood")
    assert summary["regime"] == "general"


def test_command_line(tmp_path):
    """The script as a user runs it (a subprocess, progress bar on)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--loss", "alm", "--out", str(tmp_path)] +
                          [a for a in QUICK if a != "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bits per byte on held-out text" in proc.stdout
    assert (tmp_path / "loss_curve.png").is_file()


def test_transformers_models_from_local_directories(distill, tmp_path):
    """Real models loaded from local folders (a tiny random GPT-2 per side saved with a real tokenizer)."""
    transformers = pytest.importorskip("transformers")
    import shutil
    from ctalign import assets
    dirs = {}
    for side, files in (("teacher", {"tokenizer.json": "llama3"}),
                        ("student", {"vocab.json": "gpt2-encoder", "merges.txt": "gpt2-merges"})):
        d = tmp_path / side
        d.mkdir()
        for name, asset in files.items():
            shutil.copy(assets.path(asset), d / name)
        vocab_size = 128256 if side == "teacher" else 50257
        cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
        dirs[side] = d
    summary = distill.main(["--loss", "likelihood", "--teacher-model", str(dirs["teacher"]), "--student-model",
                            str(dirs["student"]), "--out", str(tmp_path / "out")] + QUICK)
    check_outputs(tmp_path / "out", summary, "likelihood")
