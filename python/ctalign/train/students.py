"""Students for ``ctalign distill``: a transformers model folder, a GGUF file, or a small model made
from scratch for a tokenizer (``scratch:TOKENIZER[:d=256,layers=4,heads=4]``), and saving one so that
transformers loads it back.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctalign.errors import CtalignError


@dataclass
class Student:
    model: Any
    vocab: Any
    name: str
    source: str
    tokenizer_file: Path | None  # the file its vocabulary came from (copied next to the saved model)


def _scratch(spec: str):
    """``scratch:TOKENIZER[:d=256,layers=4,heads=4,ff=1024,context=1024]`` -> (tokenizer spec, sizes)."""
    body = spec[len("scratch:"):]
    tok, _, opts = body.partition(":")
    if not tok:
        raise CtalignError(f"{spec!r}: a scratch student names its tokenizer, e.g. scratch:asset:mistral-v1:d=256")
    if tok == "asset" and opts:  # scratch:asset:NAME[:opts]
        name, _, opts = opts.partition(":")
        tok = f"asset:{name}"
    sizes = {"d": 256, "layers": 4, "heads": 4, "ff": 0, "context": 1024}
    for part in filter(None, opts.split(",")):
        key, eq, value = part.partition("=")
        if key not in sizes or not eq or not value.isdigit() or int(value) < 1:
            raise CtalignError(f"{spec!r}: bad size {part!r} (known: {', '.join(sizes)}; positive integers)")
        sizes[key] = int(value)
    if sizes["d"] % sizes["heads"]:
        raise CtalignError(f"{spec!r}: d={sizes['d']} is not a multiple of heads={sizes['heads']}")
    sizes["ff"] = sizes["ff"] or 4 * sizes["d"]
    return tok, sizes


def load_student(spec: str, *, seed: int = 0) -> Student:
    from ctalign.alignment_map import resolve_spec
    from ctalign.vocab import load_vocab

    spec = str(spec)
    if spec.startswith("scratch:"):
        tok, sizes = _scratch(spec)
        tok_path = resolve_spec(tok)
        vocab = load_vocab(tok_path)
        try:
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            raise CtalignError("a scratch student needs transformers (pip install 'ctalign[train]')") from None
        ids = vocab.special_ids
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=sizes["d"], intermediate_size=sizes["ff"],
                             num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                             num_key_value_heads=sizes["heads"], max_position_embeddings=sizes["context"],
                             tie_word_embeddings=True, bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"),
                             pad_token_id=ids.get("pad"))
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        single = Path(tok_path) if not isinstance(tok_path, (tuple, list)) else None
        return Student(model, vocab, f"scratch-{vocab.name}-d{sizes['d']}x{sizes['layers']}", spec, single)
    path = Path(spec)
    if not path.exists():
        raise CtalignError(f"{path}: no such student model (a transformers folder, a .gguf file, or scratch:TOKENIZER)")
    if path.suffix == ".gguf":
        from ctalign.models import load_gguf_model
        model, vocab = load_gguf_model(path)
        return Student(model, vocab, path.stem, spec, path)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise CtalignError(f"{path}: loading a transformers student needs the train extra "
                           f"(pip install 'ctalign[train]')") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CtalignError(f"{path}: cannot load the student with transformers ({' '.join(str(e).split())[:300]})") from None
    return Student(model, load_vocab(path), path.name, spec, None)


def save_student(student: Student, out: Path) -> Path:
    """``save_pretrained`` into ``out/student`` (the model alone: no byte head or other training state),
    with the tokenizer file its vocabulary came from beside it; returns the folder."""
    folder = Path(out) / "student"
    tmp = Path(out) / ".student.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    student.model.save_pretrained(tmp)
    info = {"source": student.source, "name": student.name}
    if student.tokenizer_file is not None and Path(student.tokenizer_file).is_file():
        src = Path(student.tokenizer_file)
        if src.suffix == ".gguf":
            info["tokenizer"] = str(src)  # the weights are in the folder; the GGUF is the tokenizer
        else:
            target = tmp / ("tokenizer.json" if src.suffix == ".json" else src.name)
            shutil.copyfile(src, target)
            info["tokenizer"] = target.name
    (tmp / "ctalign_student.json").write_text(json.dumps(info, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
