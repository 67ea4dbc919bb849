"""Tiny offline models and tokenizers for tests: a byte-level BPE trained in-process and a 2-layer Llama."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<s>", "</s>", "<bos>", "<start_of_turn>", "<end_of_turn>",
]

CORPUS = [
    "Thank you for contacting support. I am sorry about the delay with your order.",
    "Your refund has been processed and should appear within five business days.",
    "To reset your password, open Settings, choose Security, and click Reset password.",
    "I cannot help with that request because it could cause serious harm.",
    "I'm sorry, but I can't assist with that. Sure, here is a summary of the article.",
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today?",
    "Sure, here is how to do it: first, second, third. As an AI, I must decline.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
    "system user assistant model inst INST SYS [INST] [/INST] <<SYS>> <</SYS>>",
]


def build_tokenizer(chat_template: str = CHATML, vocab_size: int = 320):
    """A fast byte-level BPE tokenizer with ChatML/Llama/Gemma special tokens; trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token=None)
    tokenizer.chat_template = chat_template
    return tokenizer


def build_model(tokenizer, seed: int = 0, hidden_size: int = 16, layers: int = 2, initializer_range: float = 0.02):
    """A randomly initialised Llama with hidden size 16 and 2 layers (SmolLM2's architecture, shrunk).

    With the default init the tied output layer is so small that every next-token distribution is nearly
    uniform and no LoRA update can make it peaked; tests that need a model that can learn use a larger
    `initializer_range`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=initializer_range)
    return LlamaForCausalLM(config)


def save_moved_adapter(model_dir: Path, directory: Path) -> Path:
    """A LoRA adapter (r 4) for the model in `model_dir` with random B, saved to `directory`: unlike a fresh
    adapter (B = 0), the fine-tuned model differs from its base."""
    import torch

    from guardtune.config import TrainConfig
    from guardtune.models import attach_lora, load_model

    torch.manual_seed(0)
    model = attach_lora(load_model(str(model_dir)).model, TrainConfig(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(str(directory))
    return directory


def save_tiny_model(directory: Path, seed: int = 0, **model_options) -> Path:
    """Write a tiny model + tokenizer to `directory` (a local model spec for guardtune)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, **model_options)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
