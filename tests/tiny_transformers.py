"""Hugging Face models from tiny configs: hidden size 32, 2 layers, a vocabulary of 100, random weights.

Nothing is downloaded. Shared by the ModeCheck tests on third-party code and the language-model loss tests.
"""

from __future__ import annotations

import transformers
from torch import nn

VOCAB = 100
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.1, **SPECIAL))


def gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **SPECIAL))


def _bert_config(**kwargs: object) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, **kwargs)


def bert() -> nn.Module:
    return transformers.BertForSequenceClassification(_bert_config(num_labels=3))


def bert_mlm() -> nn.Module:
    return transformers.BertForMaskedLM(_bert_config())


def t5() -> nn.Module:
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=2))
