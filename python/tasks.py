"""The embedded default of ``train_grpo.py``: a digit tokenizer, a tiny random Qwen2 model, digit tasks
and their rewards, all built in code (nothing is downloaded, nothing to prepare).

- Tokenizer: a ``tokenizers`` WordLevel model over 14 words (PAD, BOS, EOS, "=", the digits 0-9; the
  vocabulary is padded to 16 ids), whitespace pre-tokenizer, a template that prepends BOS; wrapped in
  ``PreTrainedTokenizerFast`` so it saves with ``save_pretrained`` and loads with ``AutoTokenizer``.
- Model: ``Qwen2ForCausalLM`` with 2 layers, hidden 128, 4 heads, MLP 256, tied embeddings (~331k
  parameters), randomly initialised from a seed.
- Tasks: a prompt is ``"d1 d2 ... dn ="`` and the answer a digit string derived from it (copy, reverse,
  sort, or the sum of the digits mod 10).
- Reward (:func:`partial_credit`): per-position credit, the fraction of the answer's characters (plus one
  for stopping right after it) that the completion gets right. Exact match alone gives no signal from a
  random model (a few correct samples in 10^5); partial credit gives ~0.06 from the first step.

A reward function has TRL's signature ``fn(prompts, completions, answer, **kwargs) -> list[float]``
(strings in, one finite float per completion out; TRL passes every dataset column, here ``answer``, as a
keyword list, and more keywords such as ``completion_ids`` and ``trainer_state``), so the same function
serves ``trl.GRPOTrainer(reward_funcs=...)`` and ``train_grpo.py --reward module:function``. The older
``fn(prompts, completions, answers)`` (no ``**kwargs``) still loads in ``train_grpo.py``, and the functions
below may also be called positionally that way.
"""

from __future__ import annotations

import random

CONTROL_TOKENS = ("<pad>", "<bos>", "<eos>")
WORDS = CONTROL_TOKENS + ("=",) + tuple(str(d) for d in range(10))
VOCAB_SIZE = 16  # 14 words padded to 16 ids (two unused ids the model learns to avoid)
TASKS = ("copy", "reverse", "sort", "sum")


def build_tokenizer():
    """The 16-id digit tokenizer as a ``transformers.PreTrainedTokenizerFast`` (left padding, for generate)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 128):
    """A randomly initialised ``Qwen2ForCausalLM`` sized for the digit tasks (fp32, eager attention)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="eager",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def answer_for(task: str, digits: list[int]) -> list[int]:
    if task == "copy":
        return list(digits)
    if task == "reverse":
        return digits[::-1]
    if task == "sort":
        return sorted(digits)
    if task == "sum":
        return [sum(digits) % 10]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def make_example(task: str, n_digits: int, rng: random.Random) -> dict:
    """One ``{"prompt": "3 1 4 =", "answer": "3 1 4"}`` row (the fields of a ``--prompts`` JSONL line)."""
    digits = [rng.randrange(10) for _ in range(n_digits)]
    return {"prompt": " ".join(map(str, digits)) + " =", "answer": " ".join(map(str, answer_for(task, digits)))}


def partial_credit(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """Per-position credit in [0, 1]: (#positions i where completion[i] == answer[i], plus 1 if the
    completion has exactly the answer's length, i.e. it stopped in time) / (len(answer) + 1).

    Positions are characters with whitespace removed, so the score does not depend on how a tokenizer
    joins decoded tokens ("1 2 3" and "123" are the same completion; ``AutoTokenizer`` reloads the digit
    tokenizer as a Qwen2 tokenizer, which decodes without spaces). Exact match scores 1.
    """
    rewards = []
    for completion, target in zip(completions, answer, strict=False):
        got, want = "".join(completion.split()), "".join(target.split())
        hits = sum(g == w for g, w in zip(got, want, strict=False)) + (len(got) == len(want))
        rewards.append(hits / (len(want) + 1))
    return rewards
