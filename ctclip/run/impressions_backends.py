"""Text generation backends for `ctclip.run.impressions`: Hugging Face transformers and vLLM.

Both take finished prompt strings and return the raw generated text, one per prompt, and expose the
tokenizer that prompts are built and measured with (chat template, token counts) and the model's
context length. Weights always come from local files: nothing here downloads.

- ``transformers``: any local causal LM, CPU or GPU (bf16 on GPU), batched with left padding.
- ``vllm``: the offline engine (GPU). vLLM is an optional extra (``uv sync --extra llm``) and is
  imported only inside `VLLMBackend`; no other module may import it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")
# The model starting one of these is writing the next few-shot example: stop there (the text is also
# cut at them afterwards, see impressions.clean_generation).
STOP_MARKERS = ("###", "Findings:")
_NO_DOWNLOAD = ("this tool never downloads weights: give a local model folder, or a name already in the "
                "Hugging Face cache")


class BackendError(ValueError):
    """The backend cannot be used: not installed, or the model cannot be loaded."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 42


class Backend(Protocol):
    name: str
    tokenizer: Any
    max_length: int | None  # prompt + generated tokens the model takes; None = unknown

    def count_tokens(self, prompt: str, add_special_tokens: bool) -> int: ...

    def generate(self, prompts: list[str], add_special_tokens: bool) -> list[str]: ...


def context_length(model_config: Any, tokenizer: Any, override: int | None) -> int | None:
    """The model's context in tokens: the override, else the model config, else the tokenizer's own."""
    if override:
        return int(override)
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    # tokenizers without a limit report a huge sentinel (1e30)
    return value if isinstance(value, int) and 0 < value < 10_000_000 else None


def count_tokens(tokenizer: Any, prompt: str, add_special_tokens: bool) -> int:
    return len(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise BackendError("--backend transformers needs the transformers package: install the `hf` extra "
                           "(`uv sync --extra hf`)") from e
    return transformers


def _marker_stopper(transformers: Any, tokenizer: Any, prompt_len: int) -> Any:
    """A per-row stopping criterion: generation of a row ends once its new text holds a stop marker."""

    class StopOnMarkers(transformers.StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            # the tail is enough to see a marker appear; decoding all new tokens each step would be quadratic
            tails = tokenizer.batch_decode(input_ids[:, prompt_len:][:, -16:], skip_special_tokens=True)
            hits = [any(m in t for m in STOP_MARKERS) for t in tails]
            return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)

    return StopOnMarkers()


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: str, settings: GenerationSettings, device: str | None = None,
                 max_model_len: int | None = None) -> None:
        transformers = _import_transformers()
        self._transformers = transformers
        self.settings = settings
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise BackendError(f"--device {device!r}: {e}") from e
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
            raise BackendError(f"cannot load model {model!r} with transformers: {e} ({_NO_DOWNLOAD})") from e
        self.model.to(self.device).eval()
        # decoder-only models continue from the last position: pad on the left so every row ends there
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise BackendError(f"model {model!r}: the tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = context_length(self.model.config, self.tokenizer, max_model_len)
        if settings.temperature > 0:
            # seeded once per run: the same run order gives the same samples
            transformers.set_seed(settings.seed)
        log.info("transformers backend: %s on %s (%s), context %s tokens", model, self.device, dtype, self.max_length)

    def count_tokens(self, prompt: str, add_special_tokens: bool) -> int:
        return count_tokens(self.tokenizer, prompt, add_special_tokens)

    def generate(self, prompts: list[str], add_special_tokens: bool) -> list[str]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        prompt_len = enc["input_ids"].shape[1]
        kwargs: dict[str, Any] = {"max_new_tokens": self.settings.max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if self.settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.settings.temperature, top_p=self.settings.top_p)
        else:
            kwargs["do_sample"] = False
        if self.model.generation_config.eos_token_id is None:
            kwargs["eos_token_id"] = self.tokenizer.eos_token_id
        stop = self._transformers.StoppingCriteriaList([_marker_stopper(self._transformers, self.tokenizer, prompt_len)])
        with torch.inference_mode():
            out = self.model.generate(**enc, stopping_criteria=stop, **kwargs)
        return self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, settings: GenerationSettings, max_model_len: int | None = None,
                 tensor_parallel_size: int = 1) -> None:
        # offline: vLLM resolves names through huggingface_hub, which reads this when it is imported
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import vllm
        except ImportError as e:
            raise BackendError("--backend vllm needs the vllm package, which is not installed: install the `llm` "
                               "extra (`uv sync --extra llm`, CUDA GPU required) or use --backend transformers") from e
        self.settings = settings
        kwargs: dict[str, Any] = {"model": model, "seed": settings.seed, "tensor_parallel_size": tensor_parallel_size}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        try:
            self.llm = vllm.LLM(**kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise BackendError(f"cannot load model {model!r} with vLLM: {e} ({_NO_DOWNLOAD})") from e
        self.tokenizer = self.llm.get_tokenizer()
        engine = getattr(self.llm, "llm_engine", None)
        engine_config = getattr(engine, "model_config", None) or getattr(getattr(engine, "vllm_config", None),
                                                                         "model_config", None)
        self.max_length = max_model_len or getattr(engine_config, "max_model_len", None)
        self.params = vllm.SamplingParams(
            temperature=settings.temperature, top_p=settings.top_p if settings.temperature > 0 else 1.0,
            max_tokens=settings.max_new_tokens, seed=settings.seed, stop=list(STOP_MARKERS))
        log.info("vllm backend: %s, context %s tokens, tensor parallel %d", model, self.max_length, tensor_parallel_size)

    def count_tokens(self, prompt: str, add_special_tokens: bool) -> int:
        return count_tokens(self.tokenizer, prompt, add_special_tokens)

    def generate(self, prompts: list[str], add_special_tokens: bool) -> list[str]:
        # token ids, not strings: vLLM would add special tokens again to chat-templated text, and the
        # context check measured exactly these ids
        inputs = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]}
                  for p in prompts]
        outputs = self.llm.generate(inputs, self.params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


def load_backend(name: str, model: str, settings: GenerationSettings, *, device: str | None = None,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1) -> Backend:
    if name == "transformers":
        return TransformersBackend(model, settings, device=device, max_model_len=max_model_len)
    if name == "vllm":
        if device is not None:
            log.warning("--device is ignored by the vllm backend (it uses the visible CUDA devices)")
        return VLLMBackend(model, settings, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
