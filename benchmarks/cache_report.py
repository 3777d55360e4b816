#!/usr/bin/env python
"""Teacher-cache figures on a real teacher: bytes per teacher token and the encoding's error, for each
k and log-probability codec, against DistillKit's anchors (top-128 in ~300 B/token; top-50 in ~114
B/token with one exact log-prob and a polynomial fit of the rest) and plain int32 ids + fp32 log-probs
(8 x k B/token).

Bytes per token are the rows' own (``RowCodec.bytes_per_position``) plus what every cached position
also stores (its teacher id, loss-mask byte and own-token log-prob: 9 B), and are checked against the
shard files a real ``cache_teacher`` run writes. The error is measured on the teacher's dense rows over
real text: max and mean absolute log-probability error of the kept entries, and the mean
KL(dense || cached) the encoding adds (``ctalign.cache.reconstruction_error``).

    python benchmarks/cache_report.py --teacher gemma3-gguf --texts 4 --json cache-report.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PER_POSITION_EXTRA = 4 + 1 + 4  # teacher id (int32), loss-mask byte, own-token log-prob (f32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="gemma3-gguf", help="asset name or GGUF path")
    p.add_argument("--texts", type=int, default=4)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from ctalign import assets, ops
    from ctalign.cache import RowCodec, cache_teacher, read_examples, reconstruction_error
    from ctalign.models import load_gguf_model

    path = assets.path(args.teacher) if args.teacher in assets.ASSETS else Path(args.teacher)
    t0 = time.time()
    model, vocab = load_gguf_model(path)
    load_s = time.time() - t0
    texts = [e.text for e in read_examples([assets.path("botchan-text")], chunk_chars=500)][: args.texts]
    V = len(vocab)
    rows = []
    t0 = time.time()
    with torch.no_grad():
        for text in texts:
            ids = [vocab.special_ids["bos"]] + vocab.encode(text)
            ids = ids[: args.max_length]
            rows.append(model(input_ids=torch.tensor([ids])).logits[0, :, :V].float())
    forward_s = time.time() - t0
    x = torch.cat(rows)
    dense = torch.log_softmax(x.double(), -1).numpy()
    out = {"teacher": str(path.name), "vocab_size": V, "positions": int(x.shape[0]), "load_s": load_s,
           "forward_s": forward_s, "rows": []}
    print(f"{path.name}: {V:,} ids, {x.shape[0]} positions of real text (botchan-text)")
    print(f"{'k':>4} {'codec':>5} {'B/token':>8} {'max |dlp|':>10} {'mean |dlp|':>11} {'KL added':>10}")
    for k in args.ks:
        top = ops.topk_logprobs(x, k, vocab_size=V)
        for name in ("q8", "q16", "f16", "f32"):
            codec = RowCodec(k, V, name)
            err = reconstruction_error(codec, top.indices.numpy(), top.logprobs.double().numpy(), dense)
            bpt = codec.bytes_per_position() + PER_POSITION_EXTRA
            out["rows"].append({"k": k, "codec": name, "bytes_per_token": bpt, **err})
            print(f"{k:>4} {name:>5} {bpt:>8} {err['max_abs_logprob_error']:>10.2e} "
                  f"{err['mean_abs_logprob_error']:>11.2e} {err['mean_kl_encoding']:>10.2e}")
        print(f"{k:>4} {'int32+fp32':>10} {8 * k:>3} (plain)")
    # the shard files of a real run: bytes per token including the text and the index of positions
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        index = cache_teacher(lambda ids, att: model(input_ids=ids, attention_mask=att).logits, texts, d,
                              teacher_vocab=vocab, top_k=64, max_length=args.max_length, progress=False)
        body = json.loads(Path(index).read_text())
        tokens = sum(s["tokens"] for s in body["shards"])
        size = sum(s["bytes"] for s in body["shards"])
        out["shard_run"] = {"k": 64, "codec": "q8", "tokens": tokens, "bytes": size,
                            "bytes_per_token": size / tokens, "seconds": time.time() - t0,
                            "teacher_tokens_per_s": tokens / (time.time() - t0)}
        print(f"shards of a real run (k = 64, q8): {size:,} bytes for {tokens} tokens = {size / tokens:.1f} B/token "
              f"(text and offsets included); {tokens / (time.time() - t0):.1f} teacher tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
