"""``ctalign cache-teacher``: the command line of :func:`ctalign.cache.cache_teacher`."""
from __future__ import annotations

import json


def add_parser(sub, common) -> None:
    c = sub.add_parser("cache-teacher", help="run a teacher once over a dataset and store its top-k rows",
                       description="Run a teacher over a dataset (.txt: paragraphs packed into examples of up to 1500 "
                                   "characters; .jsonl: "
                                   "'text' or 'prompt'/'response' per line) and write its top-k rows to a "
                                   "cache folder, resumable. The teacher is a transformers model folder or a "
                                   ".gguf file.")
    c.add_argument("teacher", metavar="TEACHER", help="transformers model folder or .gguf file")
    c.add_argument("dataset", metavar="DATA", nargs="+", help=".txt / .jsonl files or folders of them")
    c.add_argument("-o", "--output", required=True, metavar="DIR", help="cache folder (created; resumed if present)")
    c.add_argument("--top-k", type=int, default=64, metavar="K", help="entries kept per position (default 64)")
    c.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature (default 1)")
    c.add_argument("--max-length", type=int, default=512, metavar="N", help="teacher tokens per example (default 512)")
    c.add_argument("--batch-size", type=int, default=8, metavar="B", help="examples per teacher call (default 8)")
    c.add_argument("--shard-examples", type=int, default=256, metavar="E", help="examples per shard (default 256)")
    c.add_argument("--logprob-codec", default="q8", choices=["q8", "q16", "f16", "f32"],
                   help="how log-probabilities are stored (default q8; see ctalign.cache.codec)")
    c.add_argument("--tokenizer", metavar="SPEC", help="the teacher's tokenizer, if not in its folder")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    common(c)


def run(args, progress: bool) -> int:
    from ctalign.cache import TeacherCache, cache_teacher
    index = cache_teacher(args.teacher, args.dataset, args.output, teacher_vocab=args.tokenizer,
                          top_k=args.top_k, temperature=args.temperature, max_length=args.max_length,
                          batch_size=args.batch_size, shard_examples=args.shard_examples,
                          logprob_codec=args.logprob_codec, progress=progress)
    data = TeacherCache(index.parent, verify=False, complete=False)
    body = json.loads(index.read_text())
    tokens = sum(s["tokens"] for s in body["shards"])
    nbytes = sum(s["bytes"] for s in body["shards"])
    info = {"index": str(index), "examples": len(data), "tokens": tokens, "bytes": nbytes,
            "bytes_per_token": nbytes / max(tokens, 1), "top_k": data.codec.k,
            "logprob_codec": data.codec.logprob_codec, "teacher": data.config["teacher"]["name"]}
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(f"wrote {index}: {len(data):,} examples, {tokens:,} teacher tokens, {nbytes:,} bytes "
              f"({info['bytes_per_token']:.0f} bytes per token at k = {data.codec.k}, {data.codec.logprob_codec})")
    return 0
