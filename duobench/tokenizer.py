"""The CLIP tokenizer of Stable Diffusion v1, built offline from open_clip's shipped BPE vocabulary.

SD1.4's tokenizer (``openai/clip-vit-large-patch14``) and open_clip's ``SimpleTokenizer`` share one BPE
vocabulary: 256 byte symbols, the same 256 with ``</w>``, 48,894 merges and the two special tokens, 49,408
ids in all. Writing that vocabulary as ``vocab.json`` + ``merges.txt`` gives a transformers `CLIPTokenizer`
whose ids equal SD1.4's, with no download. Tests, the tiny pipelines and the toy world all use it.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

from duobench.paths import duobench_home

# open_clip keeps merges[1 : 49152 - 256 - 2 + 1] of the file (the first line is a version header).
_N_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _open_clip_bpe_path() -> Path:
    try:
        import open_clip
    except ImportError as error:  # pragma: no cover - open_clip is a hard dependency
        from duobench.errors import DuobenchError

        raise DuobenchError(
            "open_clip_torch is needed to build the CLIP tokenizer offline; `pip install open_clip_torch`."
        ) from error
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer_files(folder: Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``folder``; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return folder


@functools.lru_cache(maxsize=1)
def clip_tokenizer_folder() -> Path:
    """A cached folder holding SD1.4's tokenizer files, written on first use."""
    folder = duobench_home() / "clip-tokenizer"
    if not (folder / "merges.txt").exists():
        # Write beside, then rename: several processes (torchrun ranks) may get here at once.
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".clip-tokenizer-"))
        write_clip_tokenizer_files(staging)
        try:
            os.rename(staging, folder)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def sd_clip_tokenizer():
    """A `transformers.CLIPTokenizer` with exactly SD1.4's token ids (49,408 entries, 77 positions)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder()))
