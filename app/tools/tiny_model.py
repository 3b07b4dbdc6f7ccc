"""Build pdserve's default model: a tiny Llama trained briefly on the Python standard library.

Nothing is downloaded. The life cycle of `build_tiny_model(out_dir)`:
1. Collect text: the standard library's own `.py` sources (sorted, tests left out), which every
   Python install carries, capped at `max_chars`.
2. Train a byte-level BPE tokenizer (`tokenizers`) on that text, with chat special tokens and a
   chat template, and save it in Hugging Face format.
3. Train a small `LlamaForCausalLM` (float32, fixed seeds) on the tokenised text for a few minutes,
   so that its greedy output looks like Python rather than noise.
4. Save config, safetensors weights, generation config and tokenizer into `out_dir`.

The built files are committed under `models/pdserve-tiny-llama` because training takes minutes;
`pdserve build-model` rebuilds them. The result is deterministic for a given torch version and
thread count.
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and training budget of the default model (about 4M parameters)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096
    max_chars: int = 6_000_000
    seq_len: int = 256
    batch_size: int = 16
    num_steps: int = 1200
    learning_rate: float = 3e-3
    seed: int = 0


def collect_stdlib_text(max_chars: int) -> str:
    """Concatenate the standard library's sources, sorted by path, skipping test packages."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    num_chars = 0
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") for p in rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        num_chars += len(text)
        if num_chars >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def train_tokenizer(text: str, spec: TinyModelSpec, out_dir: Path):
    """Train a byte-level BPE tokenizer and save it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunks = text.split("\n\n")
    tokenizer.train_from_iterator(chunks, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _llama_config(spec: TinyModelSpec, tokenizer):
    from transformers import LlamaConfig

    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|end|>")]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_ids[0],
        eos_token_id=eos_ids,
        pad_token_id=eos_ids[0],
        torch_dtype="float32",
    )


def train_model(text: str, tokenizer, spec: TinyModelSpec, log=print):
    """Train the model on random windows of the tokenised text; returns it in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # [num_text_tokens]
    model = LlamaForCausalLM(_llama_config(spec, tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    gen = torch.Generator().manual_seed(spec.seed)
    warmup = max(1, spec.num_steps // 20)
    started = time.monotonic()
    model.train()
    for step in range(spec.num_steps):
        lr_scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / spec.num_steps))
        for group in opt.param_groups:
            group["lr"] = spec.learning_rate * lr_scale
        starts = torch.randint(0, len(ids) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])  # [batch, seq_len]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == spec.num_steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  {time.monotonic() - started:6.1f}s")
    model.eval()
    return model


def build_tiny_model(out_dir: Path, spec: TinyModelSpec = TinyModelSpec(), log=print) -> Path:
    """Build tokenizer and model into `out_dir` (created); returns `out_dir`."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    text = collect_stdlib_text(spec.max_chars)
    log(f"training text: {len(text):,} characters from the standard library")
    tokenizer = train_tokenizer(text, spec, out_dir)
    model = train_model(text, tokenizer, spec, log=log)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen_config = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
                  "pad_token_id": model.config.pad_token_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_config, indent=2) + "\n")
    log(f"saved to {out_dir}")
    return out_dir
