"""Tiny random models built in-process from transformers configs, a byte-level tokenizer, and
correlated-input layer problems for operator quality floors."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")


@pytest.fixture(autouse=True, scope="session")
def _databases_in_a_temporary_folder(tmp_path_factory):
    """Level databases the tests build without --db go to a temporary folder, not the user's cache."""
    old = os.environ.get("MODELPRESS_DB")
    os.environ["MODELPRESS_DB"] = str(tmp_path_factory.mktemp("db"))
    yield
    if old is None:
        os.environ.pop("MODELPRESS_DB", None)
    else:
        os.environ["MODELPRESS_DB"] = old


@pytest.fixture
def float32_forwards():
    """For tests of exact plumbing (a runner's inputs equal the model's own hidden states): the
    forwards in float32, whatever the machine's default compute dtype (tests/utils/test_device.py
    and the bf16 tests check the other path)."""
    from modelpress.utils.device import compute_dtype

    with compute_dtype("float32"):
        yield


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 3, vocab: int = 256):
    """A deterministic random causal LM of a few blocks."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, max_position_embeddings=512)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, vocab_size=vocab)
    else:
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
               "mistral": tf.MistralConfig}[arch]
        cfg = cls(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, **common)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    # random init is tiny (std 0.02): spread weights so compression errors are visible
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in n and "wte" not in n and "wpe" not in n:
                p.mul_(4.0)
    return model


@pytest.fixture(params=ARCHS)
def any_tiny(request):
    return tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer made in-process (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 20)


def bpe_tokenizer():
    """byte_tokenizer plus four merges (260 symbols): llama.cpp loads a BPE vocabulary only with merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 20)


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


def correlated_inputs(n: int, d: int, seed: int = 0, outliers: int = 2) -> torch.Tensor:
    """Inputs with strongly correlated features and a few outlier channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=g) / d ** 0.5
    scales = torch.logspace(0, -2, d)
    x = (torch.randn(n, d, generator=g) * scales) @ basis
    x[:, :outliers] *= 30
    return x


def layer_problem(out_f: int = 96, in_f: int = 144, n: int = 2048, seed: int = 0):
    """A weight and correlated calibration inputs; returns (W, X, LinearStats)."""
    from modelpress.calib.stats import LinearStats

    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    x = correlated_inputs(n, in_f, seed)
    st = LinearStats(in_f, want_xtx=True)
    st.add(x)
    return w, x, st


def rel_out_err(w, w_hat, x) -> float:
    return float(((x @ (w - w_hat).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())
