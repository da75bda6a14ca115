"""GGUF (llama.cpp) files: model config, tokenizer and de-quantized tensors from one file."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from ptp.config import ModelConfig
from ptp.errors import UnsupportedModelError

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
# gguf tensor name (after "blk.N.") → ptp/Hugging Face name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_reader(path: Path):
    """gguf's reader of the file, over a plain numpy view of its memory map. The reader slices its fields
    element by element (the tokenizer's ~100k strings and merges), and numpy.memmap runs Python code on
    every slice: seconds per process that opens the file. The view reads the same mapped bytes."""
    return _plain_array_reader()(str(path))


@functools.cache
def _plain_array_reader():
    import gguf

    class PlainArrayReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, value: np.ndarray) -> None:  # GGUFReader.__init__ sets it to the np.memmap
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainArrayReader


class GGUFFile:
    def __init__(self, path: Path):
        self.path = path
        self.reader = open_reader(path)
        self.arch = self.field("general.architecture")
        if self.arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {self.arch!r} is not supported; ptp reads GGUF files of "
                f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Llama, Mistral, SmolLM and similar)."
            )
        self.tensors = {self._ptp_name(t.name): t for t in self.reader.tensors}
        self.tensors.pop(None, None)

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def config(self) -> ModelConfig:
        a = self.arch
        heads = self.field(f"{a}.attention.head_count")
        hidden = self.field(f"{a}.embedding_length")
        vocab = self.field(f"{a}.vocab_size") or len(self.field("tokenizer.ggml.tokens"))
        eos = self.field("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            architecture="LlamaForCausalLM",
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=self.field(f"{a}.feed_forward_length"),
            num_layers=self.field(f"{a}.block_count"),
            num_heads=heads,
            num_kv_heads=self.field(f"{a}.attention.head_count_kv", heads),
            head_dim=self.field(f"{a}.attention.key_length", hidden // heads),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=self.field(f"{a}.context_length", 4096),
            tie_word_embeddings="lm_head.weight" not in self.tensors,
            dtype="bfloat16",
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(eos,) if eos is not None else (),
        )

    @staticmethod
    def _ptp_name(name: str) -> str | None:
        if name in GLOBAL_NAMES:
            return GLOBAL_NAMES[name]
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            if rest in LAYER_NAMES:
                return f"model.layers.{index}.{LAYER_NAMES[rest]}"
        return None  # e.g. rope_freqs: derived from the config instead

    def tensor(self, name: str) -> torch.Tensor:
        """The de-quantized float32 tensor under its ptp name, in Hugging Face row order."""
        import gguf

        t = self.tensors[name]
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"GGUF tensor {t.name} is quantized as {t.tensor_type.name}, which the gguf package "
                "cannot de-quantize; use a file quantized as F32, F16, BF16, Q8_0, Q4_0, Q4_1 or a K-quant."
            ) from e
        shape = tuple(int(d) for d in reversed(t.shape))  # gguf lists dims innermost first
        out = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))
        if name.endswith("q_proj.weight"):
            out = _unpermute_rope_rows(out, self.field(f"{self.arch}.attention.head_count"))
        elif name.endswith("k_proj.weight"):
            heads = self.field(f"{self.arch}.attention.head_count")
            out = _unpermute_rope_rows(out, self.field(f"{self.arch}.attention.head_count_kv", heads))
        return out

    def tokenizer(self):
        """A transformers fast tokenizer built from the vocabulary, merges and template in the file."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        kind = self.field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"GGUF tokenizer type {kind!r} is not supported; ptp builds byte-level BPE ('gpt2') tokenizers."
            )
        tokens = list(self.field("tokenizer.ggml.tokens"))
        types = list(self.field("tokenizer.ggml.token_type", [1] * len(tokens)))
        merges = [tuple(m.split(" ", 1)) for m in self.field("tokenizer.ggml.merges")]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        CONTROL = 3
        special = [tokens[i] for i, kind in enumerate(types) if kind == CONTROL]

        def token(key):
            i = self.field(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None else None

        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"),
            pad_token=token("padding"), additional_special_tokens=special,
        )
        tok.chat_template = self.field("tokenizer.chat_template")
        return tok


def _unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp interleaves the two rotary halves of each head's rows; restore the halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
