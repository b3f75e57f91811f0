"""Adding gist tokens: special tokens, resized embeddings, new rows at the mean of the old ones."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gist_dist.config import ModelConfig
from gist_dist.model import load_tokenizer
from gist_dist.tokens import add_gist_tokens, gist_token_strings, init_gist_embeddings


def test_gist_tokens_are_new_special_tokens():
    tok = load_tokenizer(ModelConfig(name="smollm2"))
    n = len(tok)
    ids = add_gist_tokens(tok, 4)
    assert ids == list(range(n, n + 4)) and len(tok) == n + 4
    assert tok.convert_ids_to_tokens(ids) == gist_token_strings(4)
    assert set(ids) <= set(tok.all_special_ids)


def test_new_rows_are_the_mean_in_and_out_when_untied():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    init_gist_embeddings(model, [100, 101, 102], num_old=100, new_size=103)
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert w_in.shape == w_out.shape == (103, 32)
    assert torch.equal(w_in[:100], old_in) and torch.equal(w_out[:100], old_out)
    for row in (100, 101, 102):
        assert torch.allclose(w_in[row], old_in.mean(0)) and torch.allclose(w_out[row], old_out.mean(0))
    assert model.config.vocab_size == 103
