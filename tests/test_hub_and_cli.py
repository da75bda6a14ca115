"""Model resolution through the real huggingface_hub offline cache, bad ids, and the README's command."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ptp
from helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = (
    "import ptp\n"
    "llm = ptp.LLM({model!r}, device='cpu', dtype='float32')\n"
    "print(llm.generate('Paris', ptp.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids)\n"
)


def _run(code: str, env: dict, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_hub_id_resolves_from_the_offline_cache(ckpt_root, tmp_path):
    folder = make_checkpoint(ckpt_root, "qwen2", seed=5)
    # The Hugging Face cache layout: models--{org}--{name}/refs/main and snapshots/{commit}/
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PTP_LOG_LEVEL": "WARNING"}

    # ptp.LLM in a program that configured no logging says what start-up is doing, as the command lines do
    from_hub = _run(SNIPPET.format(model="tiny-org/tiny-qwen"), {**env, "PTP_LOG_LEVEL": "INFO"})
    assert from_hub.returncode == 0, from_hub.stderr
    for step in ("fetching tiny-org/tiny-qwen from the Hugging Face Hub", "loading", "GiB of weights",
                 "building the KV cache"):
        assert step in from_hub.stderr, f"{step!r} not logged:\n{from_hub.stderr}"
    from_folder = _run(SNIPPET.format(model=str(folder)), env)
    assert from_hub.stdout.strip() == from_folder.stdout.strip() != ""

    missing = _run(SNIPPET.format(model="tiny-org/not-cached"), env)
    assert missing.returncode != 0
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" in missing.stderr


def test_bad_model_paths_say_what_is_wrong(ckpt_root, tmp_path):
    with pytest.raises(ptp.ModelNotFoundError, match="does not exist"):
        ptp.LLM(str(tmp_path / "nothing.gguf"))
    with pytest.raises(ptp.ModelNotFoundError, match="neither a folder"):
        ptp.LLM("./no/such/folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ptp.ModelNotFoundError, match="no config.json"):
        ptp.LLM(str(empty))
    folder = make_checkpoint(ckpt_root, "llama", seed=6)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(folder, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ptp.ModelNotFoundError, match=r"no \*.safetensors"):
        ptp.LLM(str(no_weights))
    other = tmp_path / "gpt2ish"
    shutil.copytree(folder, other)
    text = (other / "config.json").read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel")
    (other / "config.json").write_text(text)
    with pytest.raises(ptp.UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
        ptp.LLM(str(other))


def test_sharded_checkpoint_with_index(ckpt_root, tmp_path):
    """A checkpoint split into several safetensors files with an index loads the same."""
    import transformers

    folder = make_checkpoint(ckpt_root, "mistral", seed=7)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for f in folder.glob("tokenizer*"):
        shutil.copy(f, sharded)
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    greedy = ptp.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = ptp.LLM(str(folder), dtype="float32", device="cpu").generate("Paris", greedy)[0].token_ids
    b = ptp.LLM(str(sharded), dtype="float32", device="cpu").generate("Paris", greedy)[0].token_ids
    assert a == b


def _broken_checkpoint(ckpt_root, tmp_path) -> Path:
    """A checkpoint that resolves but cannot load: its weights lack the final norm."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(make_checkpoint(ckpt_root, "llama", seed=9), broken)
    weights = next(broken.glob("*.safetensors"))
    tensors = load_file(weights)
    del tensors["model.norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    return broken


@pytest.mark.parametrize("where", ["generate", "generate in a spawned rank", "serve in a replica"])
def test_cli_errors_are_one_line(ckpt_root, tmp_path, where):
    """An error ptp raises reaches the command line as its message (exit status 2), not as a traceback
    through the libraries below, also where it is raised in a rank or replica process of its own."""
    common = ["--device", "cpu", "--dtype", "float32"]
    if where == "generate":
        cmd = ["ptp.generate", "--model", str(tmp_path / "no-such-folder")]
        expected = "is neither a folder"
    else:
        broken = str(_broken_checkpoint(ckpt_root, tmp_path))
        cmd = (["ptp.generate", "--model", broken, "--tp", "2"] if where == "generate in a spawned rank"
               else ["ptp.serve", "--model", broken, "--port", "0"])
        expected = "the checkpoint has no tensor 'model.norm.weight'"
    out = subprocess.run([sys.executable, "-m", *cmd, *common], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PTP_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr


@pytest.mark.slow
def test_readme_generation_command_runs():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python -m ptp\.generate.*)$", readme, re.M).group(1)
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "tokens/s" in out.stdout


@pytest.mark.slow
def test_torchrun_generate_at_tp2(ckpt_root):
    folder = make_checkpoint(ckpt_root, "llama", seed=8)
    greedy = ptp.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = ptp.LLM(str(folder), dtype="float32", device="cpu").generate("Paris is", greedy)[0].text
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ptp.generate",
           "--model", str(folder), "--prompt", "Paris is", "--max-tokens", "12", "--ignore-eos",
           "--dtype", "float32", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"> Paris is\n{expected}\n" in out.stdout
    assert "tp=2" in out.stdout
