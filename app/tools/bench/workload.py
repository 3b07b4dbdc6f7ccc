"""What a benchmark sends, and when: fixed by a seed, so two systems see the same requests at the same times.

A `Workload` is a list of `BenchRequest`s (prompt as token ids or text, max_tokens) plus an arrival
pattern: `poisson` (exponential gaps at `rate` req/s), `burst` (`burst_size` requests at once every
`burst_interval_s`), or `closed` (`concurrency` workers, each sending its next request when the last
one finished; no schedule). Lengths come from `LengthDist` (a fixed count or a uniform range) with
random token ids, from multi-turn conversations (`multi_turn_conversations`: each turn's prompt is the
conversation so far, so a replica that ran the previous turn holds most of it), or from a ShareGPT-style
JSON file: a list of
`{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}`, where the
first human turn is the prompt and the length of the reply that follows it is the output length.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class LengthDist:
    """A uniform distribution of token counts, [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """`512` or `256:1024`; raises ValueError saying what to write."""
        try:
            low, _, high = text.partition(":")
            dist = cls(int(low), int(high or low))
        except ValueError:
            raise ValueError(f"length {text!r}: write a token count (512) or a range (256:1024)") from None
        if dist.low < 1 or dist.high < dist.low:
            raise ValueError(f"length {text!r}: need 1 <= low <= high")
        return dist

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def sample(self, num: int, rng: random.Random) -> list[int]:
        return [rng.randint(self.low, self.high) for _ in range(num)]


@dataclass(frozen=True)
class BenchRequest:
    prompt: tuple[int, ...] | str  # token ids (synthetic) or text (dataset)
    num_prompt_tokens: int
    max_tokens: int
    ideal_cached_tokens: int = 0  # multi-turn: what a prefix cache holding the previous turn would serve


Pattern = Literal["poisson", "burst", "closed"]


@dataclass(frozen=True)
class Arrivals:
    pattern: Pattern
    rate: float = 1.0  # poisson: requests/s
    burst_size: int = 8  # burst: requests per burst
    burst_interval_s: float = 5.0  # burst: seconds between bursts
    concurrency: int = 4  # closed: workers

    def schedule(self, num: int, rng: random.Random) -> list[float] | None:
        """Send times (seconds from the start) for `num` requests; None for a closed loop."""
        if self.pattern == "closed":
            return None
        if self.pattern == "burst":
            return [(i // self.burst_size) * self.burst_interval_s for i in range(num)]
        if self.rate <= 0:
            raise ValueError("poisson arrivals need rate > 0")
        times, t = [], 0.0
        for _ in range(num):
            t += rng.expovariate(self.rate)
            times.append(t)
        return times

    def label(self) -> str:
        return {"poisson": f"poisson {self.rate:g}/s", "burst": f"bursts of {self.burst_size} every "
                f"{self.burst_interval_s:g} s", "closed": f"closed loop x{self.concurrency}"}[self.pattern]


def synthetic_requests(num: int, inputs: LengthDist, outputs: LengthDist, vocab_size: int,
                       rng: random.Random) -> list[BenchRequest]:
    """Prompts of random token ids (no shared prefixes, so no prefix-cache hits blur the numbers)."""
    requests = []
    for n_in, n_out in zip(inputs.sample(num, rng), outputs.sample(num, rng), strict=True):
        ids = tuple(rng.randrange(10, vocab_size) for _ in range(n_in))
        requests.append(BenchRequest(ids, n_in, n_out))
    return requests


def multi_turn_conversations(num_conversations: int, num_turns: int, prefix_len: int, turn_inputs: LengthDist,
                             turn_outputs: LengthDist, vocab_size: int, rng: random.Random, block_size: int = 32
                             ) -> list[list[BenchRequest]]:
    """Conversations of `num_turns` turns. Turn 1's prompt is the conversation's own prefix of `prefix_len` tokens
    (its system prompt and documents) and the first user message; turn k's prompt is turn k-1's, a stand-in for
    its reply (random tokens of its output length: the model's real reply differs, so only the earlier prompt is
    cacheable) and the next user message. `ideal_cached_tokens`: turn k-1's prompt in whole blocks, what a
    prefix cache that ran it serves (0 for turn 1)."""
    conversations = []
    for _ in range(num_conversations):
        history = tuple(rng.randrange(10, vocab_size) for _ in range(prefix_len))
        turns, previous = [], 0
        for n_in, n_out in zip(turn_inputs.sample(num_turns, rng), turn_outputs.sample(num_turns, rng), strict=True):
            prompt = history + tuple(rng.randrange(10, vocab_size) for _ in range(n_in))
            ideal = previous // block_size * block_size
            turns.append(BenchRequest(prompt, len(prompt), n_out, ideal_cached_tokens=ideal))
            previous = len(prompt)
            history = prompt + tuple(rng.randrange(10, vocab_size) for _ in range(n_out))
        conversations.append(turns)
    return conversations


def sharegpt_requests(path: str | Path, num: int, tokenizer: Any, rng: random.Random,
                      max_input: int = 4096, max_output: int = 1024) -> list[BenchRequest]:
    """`num` (prompt, reply length) pairs drawn from a ShareGPT-style file; raises ValueError on a bad file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'conversations': [...]}} entries")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        if turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        n_in = len(tokenizer(turns[0]["value"], add_special_tokens=False)["input_ids"])
        n_out = len(tokenizer(turns[1]["value"], add_special_tokens=False)["input_ids"])
        if 1 <= n_in <= max_input and 1 <= n_out <= max_output:
            pairs.append(BenchRequest(turns[0]["value"], n_in, n_out))
    if not pairs:
        raise ValueError(f"{path}: no usable conversation (a human turn followed by a gpt turn, within the limits)")
    return [pairs[rng.randrange(len(pairs))] for _ in range(num)]
