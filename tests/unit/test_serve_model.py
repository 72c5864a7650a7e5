"""The demo's model: byte tokens, a cached directory, and greedy output that
one corrupted KV block changes (so a token-for-token comparison of a
disaggregated run against the prompt served whole can fail).

HF ``transformers`` on the same weights vLLM serves; a few seconds.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from elastic_nixl.tools.serve.model import (
    BYTE_VOCAB,
    DEFAULT_SPEC,
    SPECIAL_TOKENS,
    ensure_model,
    model_dir,
)

BLOCK = 32  # the block size the servers use


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_model(DEFAULT_SPEC, root=tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def hf(model_path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = LlamaForCausalLM.from_pretrained(model_path).eval()
    model.generation_config.eos_token_id = None  # vLLM's ignore_eos
    return tok, model


def test_tokens_are_bytes(hf: tuple[Any, Any]) -> None:
    tok, model = hf
    text = "Hello, wörld! #3: ~\t"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode())  # no BOS, one token per byte
    assert tok.decode(ids) == text
    assert len(tok) == BYTE_VOCAB + len(SPECIAL_TOKENS) == DEFAULT_SPEC.vocab_size
    assert model.config.vocab_size == DEFAULT_SPEC.vocab_size
    assert tok.eos_token_id == BYTE_VOCAB + 1


def test_made_once_and_atomically(model_path: Path) -> None:
    root = model_path.parent
    assert model_path == model_dir(DEFAULT_SPEC, root)
    stamp = (model_path / "model.safetensors").stat().st_mtime_ns
    # A half-written copy of a crashed maker lies next to it: ignored.
    (root / f".{model_path.name}.crashed").mkdir()
    assert ensure_model(DEFAULT_SPEC, root=root) == model_path
    assert (model_path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [
        p
        for p in root.iterdir()
        if p.name.startswith(f".{model_path.name}.")
        and p.name != f".{model_path.name}.crashed"
    ]


def test_cache_root_follows_xdg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from elastic_nixl.tools.serve.model import cache_root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "elastic-nixl" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path(os.path.expanduser("~/.cache/elastic-nixl/models"))


def _greedy(model: Any, prompt: list[int], n: int, perturb: Any = None) -> list[int]:
    """Prefill, optionally corrupt the cache, then ``n`` greedy steps."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        cache = out.past_key_values
        if perturb is not None:
            perturb(cache)
        ids: list[int] = []
        for _ in range(n):
            nxt = int(out.logits[0, -1].argmax())
            ids.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    return ids


def _corrupt(layer: int, block: int, how: str) -> Any:
    """Corrupt one block (BLOCK tokens of K and V) of one layer's cache:
    ``zero`` (memory never written) or ``other`` (another block's KV, as a
    read of the wrong block id would give)."""
    sl = slice(block * BLOCK, (block + 1) * BLOCK)
    other = slice((block + 1) * BLOCK, (block + 2) * BLOCK)

    def apply(cache: Any) -> None:
        entry = cache.layers[layer]
        for t in (entry.keys, entry.values):
            t[:, :, sl] = 0 if how == "zero" else t[:, :, other].clone()

    return apply


# ~65 s on a 2-core host (greedy decoding of three prompts, five times each):
# the model's sensitivity is a property of the model spec, checked once in
# the full run, not on every quick one.
@pytest.mark.slow
def test_one_corrupted_block_changes_greedy_output(hf: tuple[Any, Any]) -> None:
    import torch

    _, model = hf
    rng = random.Random(7)
    n_new = 32
    for trial in range(3):
        length = rng.randrange(4 * BLOCK, 12 * BLOCK)
        prompt = [rng.randrange(32, 127) for _ in range(length)]
        clean = _greedy(model, prompt, n_new)
        # The loop is plain greedy decoding: HF's generate agrees.
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False
        )[0, length:].tolist()
        assert clean == ref
        assert len(set(clean)) > n_new // 4, f"degenerate output {clean}"
        for how in ("zero", "other"):
            layer = rng.randrange(DEFAULT_SPEC.num_layers)
            block = rng.randrange(length // BLOCK - 1)
            bad = _greedy(model, prompt, n_new, _corrupt(layer, block, how))
            assert bad != clean, (
                f"prompt {trial} ({length} tokens): {how} block {block} of layer "
                f"{layer} left the greedy output unchanged"
            )
