"""Hugging Face causal language models as lab models: continual pre-training of real LMs.

An experiment file names one as

    model: {name: hf, path: EleutherAI/pythia-14m}           # a hub id (needs internet once)
    model: {name: hf, path: /models/pythia-14m}              # a local folder (save_pretrained's)
    model: {name: hf, config: {model_type: gpt_neox, hidden_size: 64, num_hidden_layers: 2,
                               num_attention_heads: 4, intermediate_size: 256}}   # from scratch

`path` loads a pre-trained model with `AutoModelForCausalLM.from_pretrained` (a local folder
never touches the network; a hub id is fetched, or read from the hub cache when
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set or `local_files_only: true`). `config` builds one
from scratch: `AutoConfig.for_model(**config)` then `AutoModelForCausalLM.from_config`, its
weights drawn from torch's global generator, which the run seeds (`seed_everything(cfg.seed)`)
just before it builds the model, so a run's initial weights follow its `seed`.
`vocab_size` defaults to the stream's vocabulary, `max_position_embeddings` to at least the
stream's `block_size`. Remote code (`trust_remote_code`) is never run.

The vocabulary must cover the stream's: the lab passes `n_classes` = the stream's vocabulary
(256 for `token_stream`, the shard manifest's `vocab_size` for `shard_stream`), and a model
whose embedding (or config `vocab_size`) is smaller is refused. A larger one (embeddings padded
to a multiple of 64 or 128, as Pythia's) is kept whole, and its logits are cut to the stream's
`n_classes` columns: the padded rows are no token of the stream.

What the lab expects of a sequence model (`cl.models.ByteGPT` is the other): `forward(x)` of
token ids (B, T) gives plain next-token logits (B, T, n_classes); timm's feature API:
`forward_features(x)` is the last hidden state (B, T, d) after the final norm,
`forward_head(f, pre_logits=False)` the LM head over it, `get_classifier()` the LM head module
(untied or tied to the input embedding, as the model has it), `num_features` = d. Parameters
are float32 whatever the checkpoint's dtype; `training.precision: bf16-mixed` runs the forward
pass under autocast. Attention is the model's own implementation: `attn_implementation`
"sdpa" or "eager" (default: what transformers picks, sdpa where the model has it).

Checkpoints. The HF model is the wrapper's one child, `self.model`, so the lab's state dict
(what `cl run --checkpoint-dir` saves under `state["model"]`) is the HF model's own with the
prefix `model.`, key for key: `hf_state_dict` strips it, and
`AutoModelForCausalLM.from_config(config).load_state_dict(hf_state_dict(state["model"]))`
gives the trained model back in transformers. `export_hf(model, folder)` (or the wrapper's
`save_pretrained`) writes a folder `from_pretrained` reads, which `path:` takes again.

Needs the optional extra: `pip install "cl-lab[lm]"` (transformers, tokenizers).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

INSTALL = 'pip install "cl-lab[lm]"'
PREFIX = "model."  # the HF model's keys in the lab's state dict: "model." + its own
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_TRUE = {"1", "true", "yes", "on"}


class HFModelError(ValueError):
    """A Hugging Face model that cannot be built for this stream (one line, saying why)."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise HFModelError(f"model hf needs the transformers library, which is not installed: {INSTALL}") from None
    return transformers


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def _offline() -> bool:
    """The hub's offline switches, read now (huggingface_hub reads them once, at import)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_a_path(path: str) -> bool:
    """A name that can only be a folder: absolute, ~, ./, ../, a backslash, or more than one '/'."""
    return not _HUB_ID.fullmatch(path) or path.startswith((".", "~"))


def config_from_dict(config: dict, n_classes: int, block_size: int):
    """A transformers config from an experiment's `config:` mapping (`model_type` and the model's
    own keys), checked: an unknown model type or key is refused (transformers would keep a typo
    as an attribute and ignore it), a vocabulary smaller than the stream's too."""
    transformers = _transformers()
    config = dict(config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise HFModelError("model hf: config needs model_type (gpt_neox, llama, gpt2, ...): the architecture to build")
    mapping = transformers.models.auto.configuration_auto.CONFIG_MAPPING
    if model_type not in mapping:
        raise HFModelError(f"model hf: config.model_type {model_type!r} is not a model type transformers "
                           f"{transformers.__version__} knows (e.g. gpt_neox, llama, gpt2)")
    cls = mapping[model_type]
    unknown = sorted(set(config) - _config_keys(cls))
    if unknown:
        raise HFModelError(f"model hf: config.{unknown[0]}: unknown key for {cls.__name__} "
                           f"(model_type {model_type})")
    vocab = config.setdefault("vocab_size", n_classes)
    if not isinstance(vocab, int) or vocab < n_classes:
        raise HFModelError(f"model hf: config.vocab_size {vocab!r} is smaller than the stream's vocabulary of "
                           f"{n_classes} tokens: give at least {n_classes} (or leave it out)")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # defaults of a larger vocabulary (GPT-2's 50256)
        default = _default(cls, key)
        if key not in config and isinstance(default, int) and default >= vocab:
            config[key] = None
    try:
        built = transformers.AutoConfig.for_model(model_type, **config)
    except (TypeError, ValueError) as err:
        raise HFModelError(f"model hf: config: {_first_line(err)}") from None
    positions = _max_positions(built)
    if positions is not None and positions < block_size:
        if "max_position_embeddings" in config or "n_positions" in config:
            raise HFModelError(f"model hf: config.max_position_embeddings {positions} is shorter than the stream's "
                               f"block_size {block_size}")
        setattr(built, "max_position_embeddings", block_size)
    return built


def _config_keys(cls) -> set[str]:
    """What a config class takes: its constructor's arguments, the base class's, every attribute
    of a default instance, and their aliases (`attribute_map`, GPT-2's n_embd for hidden_size)."""
    import inspect

    keys: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            try:
                keys |= {n for n, p in inspect.signature(init).parameters.items()
                         if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
            except (TypeError, ValueError):
                pass
    try:
        keys |= set(_default_config(cls).to_dict())
    except Exception:  # a config that cannot be made with its defaults: its signature has to do
        pass
    keys |= set(getattr(cls, "attribute_map", {}) or {})
    return keys - {"model_type", "transformers_version", "architectures", "auto_map"}


def _default(cls, key: str):
    """A config class's default for `key` (None where it cannot be made with its defaults)."""
    try:
        return getattr(_default_config(cls), key, None)
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def _default_config(cls):
    return cls()


def _max_positions(config) -> int | None:
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) else None


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM (transformers' AutoModelForCausalLM) as a lab language model:
    pre-trained from `path` (a local folder or a hub id), or new from `config` (model_type and
    its sizes). The HF model is `self.model`: the lab's state-dict keys are its own prefixed
    `model.` (`hf_state_dict` strips it); `save_pretrained`/`export_hf` write a transformers folder."""

    def __init__(self, input_shape: Sequence[int], n_classes: int, path: str | None = None,
                 config: dict[str, Any] | None = None, attn_implementation: str | None = None,
                 revision: str | None = None, local_files_only: bool = False):
        super().__init__()
        if (path is None) == (config is None):
            raise HFModelError("model hf: give either path (a pre-trained model: a local folder or a hub id) "
                               "or config (a new model: model_type and its sizes), not " +
                               ("both" if path is not None else "neither"))
        if attn_implementation not in (None, "sdpa", "eager"):
            raise HFModelError(f"model hf: attn_implementation {attn_implementation!r}: use 'sdpa' or 'eager' "
                               f"(or leave it out)")
        transformers = _transformers()
        block_size = int(input_shape[0])
        self.n_classes = n_classes
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        if config is not None:
            cfg = config_from_dict(config, n_classes, block_size)
            try:
                model = transformers.AutoModelForCausalLM.from_config(cfg, **extra)
            except (ValueError, ImportError) as err:  # e.g. an architecture without sdpa, or a config it refuses
                raise HFModelError(f"model hf: config: {_first_line(err)}") from None
            self.source = f"config {cfg.model_type}"
        else:
            model = self._pretrained(transformers, str(path), revision, local_files_only, extra)
            positions = _max_positions(model.config)
            if positions is not None and positions < block_size:
                raise HFModelError(f"model hf: the stream's block_size {block_size} is longer than {self.source}'s "
                                   f"max_position_embeddings {positions}: give a block_size of at most {positions}")
        model = model.float()  # parameters and optimizer state in float32; autocast lowers the forward pass
        self.model = model
        vocab = model.get_input_embeddings().num_embeddings
        head = model.get_output_embeddings()
        out = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [vocab])[0]
        if min(vocab, out) < n_classes:
            raise HFModelError(f"model hf: {self.source} has a vocabulary of {min(vocab, out)} tokens, smaller than "
                               f"the stream's {n_classes}: the stream was tokenized with another tokenizer than the "
                               f"model's (give shard_stream the model's tokenizer)")
        self.vocab_size = out
        self.num_features = int(getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim)
        self.block_size = block_size

    def _pretrained(self, transformers, path: str, revision, local_files_only: bool, extra: dict):
        folder = Path(path).expanduser()
        if folder.is_dir():
            self.source = f"folder {folder}"
            try:
                return transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **extra)
            except (OSError, ValueError, KeyError) as err:
                raise HFModelError(f"model hf: path {folder} is not a model folder transformers can load "
                                   f"(save_pretrained's: config.json and weights): {_first_line(err)}") from None
        if folder.exists():
            raise HFModelError(f"model hf: path {folder} is a file; give the folder that holds config.json and the "
                               f"weights, or a hub id")
        if _looks_like_a_path(path):
            raise FileNotFoundError(f"model hf: path {path}: no such folder (a pre-trained model is a local "
                                    f"folder or a hub id such as EleutherAI/pythia-14m)")
        offline = local_files_only or _offline()
        self.source = f"hub model {path}"
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(
                path, revision=revision, local_files_only=offline, **extra)
        except (OSError, ValueError) as err:
            why = ("offline (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or local_files_only) and not in the hub cache"
                   if offline else f"{_first_line(err)}")
            raise HFModelError(f"model hf: path {path!r} is no local folder, and the Hugging Face hub model of that id "
                               f"could not be loaded: {why}. Download it where there is internet "
                               f"(`hf download {path} --local-dir DIR`) and give path: DIR") from None

    # ------------------------------------------------------------------ the lab's interface
    def _cut(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if logits.shape[-1] == self.n_classes else logits[..., : self.n_classes]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden state (B, T, d), after the model's final norm."""
        return self.model.base_model(input_ids=x, use_cache=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self._cut(self.model.get_output_embeddings()(x))

    def get_classifier(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, n_classes) of token ids (B, T): the HF model's own forward pass
        (any logit scaling or soft-capping it does included), as a plain tensor."""
        out = self.model(input_ids=x, use_cache=False)
        return self._cut(out.logits if hasattr(out, "logits") else out[0])

    # ------------------------------------------------------------------ export
    def save_pretrained(self, folder: str | os.PathLike, **kwargs) -> Path:
        """Write the HF model as transformers' `save_pretrained` does (config.json, safetensors
        weights): `AutoModelForCausalLM.from_pretrained(folder)`, or `path: folder`, reads it."""
        folder = Path(folder)
        self.model.save_pretrained(str(folder), **kwargs)
        return folder


def hf_state_dict(lab_state: dict) -> dict:
    """The HF model's state dict from the lab's (`state["model"]` of a checkpoint, or
    `HFCausalLM.state_dict()`): the keys without their `model.` prefix."""
    if not all(k.startswith(PREFIX) for k in lab_state):
        other = next(k for k in lab_state if not k.startswith(PREFIX))
        raise HFModelError(f"not an hf model's state dict: key {other!r} lacks the prefix {PREFIX!r}")
    return {k[len(PREFIX):]: v for k, v in lab_state.items()}


def export_hf(model: nn.Module, folder: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """Save a trained `hf` model (compiled or not) as a transformers folder; with `tokenizer`
    (a shard folder of `cl tokenize`, or a tokenizer folder or hub id), its tokenizer beside it, so
    the folder is a complete model for `from_pretrained` and `pipeline`."""
    inner = getattr(model, "_orig_mod", model)
    if not isinstance(inner, HFCausalLM):
        raise HFModelError(f"export_hf: a {type(inner).__name__} is not an hf model; only `model: {{name: hf}}` "
                           f"exports to transformers")
    folder = inner.save_pretrained(folder)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, folder)
    return folder


def _save_tokenizer(tokenizer: str | os.PathLike, folder: Path) -> None:
    source = Path(tokenizer).expanduser()
    if (source / "manifest.json").is_file():  # a shard folder: the tokenizer it was written with
        for name in ("tokenizer.json", "tokenizer"):
            if (source / name).exists():
                source = source / name
                break
        else:
            return  # byte shards: no tokenizer to save
    transformers = _transformers()
    if source.is_file() and source.suffix == ".json":
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(source))
    else:
        tok = transformers.AutoTokenizer.from_pretrained(str(source if source.exists() else tokenizer))
    tok.save_pretrained(str(folder))
