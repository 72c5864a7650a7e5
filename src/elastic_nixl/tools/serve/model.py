"""A small random-weight Llama that ``vllm serve`` loads without a download.

:func:`ensure_model` writes, once, a Hugging Face model directory: a Llama
config with seeded random weights (``transformers``) and a byte-level
tokenizer with no merges (``tokenizers``): ids 0-255 are the bytes
themselves, then a few specials. A prompt's token count is therefore its
UTF-8 byte count.

The weights are drawn with a large spread (``init_std``), so attention is
sharp and the logits' margins are wide: greedy output is stable under float
noise but changes when any transferred KV block is wrong
(``tests/unit/test_serve_model.py`` shows both). The directory is cached
under ``$XDG_CACHE_HOME/elastic-nixl/models/<name>`` (``~/.cache`` when
unset) and written atomically (a temporary sibling renamed into place), so
processes racing to make it never see half a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
"""Ids 256, 257, 258: BOS, EOS and PAD. Prompts never contain them."""

BYTE_VOCAB = 256


@dataclass(frozen=True)
class ModelSpec:
    """What the model is; every field enters the cache key."""

    name: str = "tiny-llama-bytes"
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    init_std: float = 0.25
    dtype: str = "float32"
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB + len(SPECIAL_TOKENS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def kv_bytes_per_token(self) -> int:
        """K and V bytes of one token in all layers."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def key(self) -> str:
        """A short hash of the spec (and of this file's format version)."""
        blob = json.dumps(
            {"format": 1, **dataclasses.asdict(self)}, sort_keys=True
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


DEFAULT_SPEC = ModelSpec()


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/elastic-nixl/models`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "elastic-nixl" / "models"


def model_dir(spec: ModelSpec = DEFAULT_SPEC, root: Path | None = None) -> Path:
    """Where ``spec`` lives (whether or not it has been made yet)."""
    return (root or cache_root()) / f"{spec.name}-{spec.key()}"


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def ensure_model(spec: ModelSpec = DEFAULT_SPEC, root: Path | None = None) -> Path:
    """The model directory for ``spec``, made on first use.

    Args:
        spec: the model to make.
        root: the cache directory; :func:`cache_root` by default.

    Returns:
        A directory ``vllm serve --model`` and ``transformers``'
        ``from_pretrained`` both load.
    """
    final = model_dir(spec, root)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _write_tokenizer(tmp)
        _write_model(spec, tmp)
        (tmp / "elastic_nixl_model.json").write_text(
            json.dumps(dataclasses.asdict(spec), indent=2) + "\n"
        )
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process got there first; its copy is identical.
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols
    # ByteLevel's alphabet is unordered; order it by byte value so id == byte.
    table = _bytes_to_unicode()
    assert set(table.values()) == set(byte_to_char)
    vocab: dict[str, int] = {table[b]: b for b in range(BYTE_VOCAB)}
    for i, special in enumerate(SPECIAL_TOKENS):
        vocab[special] = BYTE_VOCAB + i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False
    )
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[2],
        model_max_length=1 << 20,
    )
    fast.save_pretrained(path)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _write_model(spec: ModelSpec, path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std,
        bos_token_id=BYTE_VOCAB,
        eos_token_id=BYTE_VOCAB + 1,
        pad_token_id=BYTE_VOCAB + 2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
        _reinit(model, spec)
    model = model.to(getattr(torch, spec.dtype))
    model.config.torch_dtype = spec.dtype  # type: ignore[attr-defined]
    model.save_pretrained(path)


def _reinit(model: Any, spec: ModelSpec) -> None:
    """Every matrix N(0, init_std), norms 1: a seeded, wide spread.

    ``from_pretrained``-style lazy init may skip ``initializer_range`` for
    some modules; draw every parameter here so the weights depend on the seed
    and the spec alone.
    """
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * spec.init_std)
            del name
