"""Architecture name (config.json `architectures`) -> the model class that runs it.

Native classes (one family a file in this package) come first; any other decoder-only architecture
that transformers implements with its attention interface runs on the transformers backend
(models/transformers.py), as vLLM's `--model-impl auto` picks. `_TRANSFORMERS_MODELS` lists the
architectures the backend is verified on (tests/engine/test_model_registry.py tests every entry);
`_REFUSED` those it cannot run, with the reason.

Pooling architectures (encoders, bare decoders, sequence classifiers) are served by the pooling
runner; a generative decoder in `_EMBEDDABLE` can be too, with `--runner pooling` (an embedder, as
vLLM's `--convert embed`), through `decoder_pooling.as_pooling_model`.
"""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from kubeinfer.engine.config import MODEL_IMPLS, RUNNERS
from kubeinfer.engine.errors import ConfigError

if TYPE_CHECKING:  # the CLI reads this table for --help; torch is not needed for that
    from torch import nn

logger = logging.getLogger(__name__)

# architecture -> (module under kubeinfer.engine.models, class); imported lazily so that listing
# architectures stays cheap.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    # Yi and Solar 10.7B checkpoints say LlamaForCausalLM. Aquila, Xverse and InternLM 1/2/3 are not
    # mapped onto Llama: transformers has no model class of theirs to check their tokens against.
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen_moe", "Qwen3MoeForCausalLM"),
    "GPT2LMHeadModel": ("gpt2", "GPT2LMHeadModel"),
    "GPTBigCodeForCausalLM": ("gpt_bigcode", "GPTBigCodeForCausalLM"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM"),
    "BloomForCausalLM": ("bloom", "BloomForCausalLM"),
    "MptForCausalLM": ("mpt", "MptForCausalLM"),
    "FalconForCausalLM": ("falcon", "FalconForCausalLM"),
    # vision-language: HF's vision tower + projector before a native decoder
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": ("llava", "LlavaNextForConditionalGeneration"),
    "Idefics3ForConditionalGeneration": ("llava", "Idefics3ForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
    # ... with bidirectional attention spans (images; PaliGemma's whole prompt)
    "Gemma3ForConditionalGeneration": ("gemma_vlm", "Gemma3ForConditionalGeneration"),
    "PaliGemmaForConditionalGeneration": ("gemma_vlm", "PaliGemmaForConditionalGeneration"),
}

# Native classes that take images (tested with images in tests/engine/multimodal/test_vlm_models.py)
_VISION_LANGUAGE = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                    "Idefics3ForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                    "Qwen2_5_VLForConditionalGeneration", "Gemma3ForConditionalGeneration",
                    "PaliGemmaForConditionalGeneration")

# Served through the transformers backend; each is checked token for token against transformers.
_TRANSFORMERS_MODELS: tuple[str, ...] = (
    "CohereForCausalLM",
    "Cohere2ForCausalLM",
    "DbrxForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "GlmForCausalLM",
    "GPT2LMHeadModel",
    "GPTBigCodeForCausalLM",
    "GPTJForCausalLM",
    "GPTNeoXForCausalLM",
    "GraniteForCausalLM",
    "GraniteMoeForCausalLM",
    "MiniCPM3ForCausalLM",
    "MixtralForCausalLM",
    "NemotronForCausalLM",
    "OlmoForCausalLM",
    "Olmo2ForCausalLM",
    "OlmoeForCausalLM",
    "OPTForCausalLM",
    "PersimmonForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "PhimoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "StableLmForCausalLM",
    "Starcoder2ForCausalLM",
)

# Architectures transformers implements that no implementation here can run, and why.
_SSM = "a state-space model (no attention, no KV cache)"
_REFUSED: dict[str, str] = {
    "BartForConditionalGeneration": "an encoder-decoder model; kubeinfer serves decoder-only models",
    "MambaForCausalLM": _SSM,
    "FalconMambaForCausalLM": _SSM,
    "JambaForCausalLM": "a hybrid of attention and Mamba state-space layers; kubeinfer has no state "
                        "cache for the Mamba layers",
}

# Pooling architectures, served by the pooling runner, never by the generator: architecture ->
# (module, class, task the decoder class is converted to; None for a class that pools as it is).
_POOLING_MODELS: dict[str, tuple[str, str, str | None]] = {
    "BertModel": ("bert", "BertModel", None),
    "RobertaModel": ("roberta", "RobertaModel", None),
    "XLMRobertaModel": ("roberta", "XLMRobertaModel", None),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification", None),
    "RobertaForSequenceClassification": ("roberta", "RobertaForSequenceClassification", None),
    "XLMRobertaForSequenceClassification": ("roberta", "XLMRobertaForSequenceClassification",
                                            None),
    # bare decoders (e5-mistral-7b-instruct says MistralModel), embedders as they are saved
    "LlamaModel": ("llama", "LlamaForCausalLM", "embed"),
    "MistralModel": ("llama", "MistralForCausalLM", "embed"),
    "Qwen2Model": ("llama", "Qwen2ForCausalLM", "embed"),
    "Qwen3Model": ("llama", "Qwen3ForCausalLM", "embed"),
    # decoder classifiers and reward models: HF's `score` over the last token
    "LlamaForSequenceClassification": ("llama", "LlamaForCausalLM", "classify"),
    "MistralForSequenceClassification": ("llama", "MistralForCausalLM", "classify"),
    "Qwen2ForSequenceClassification": ("llama", "Qwen2ForCausalLM", "classify"),
    "Qwen3ForSequenceClassification": ("llama", "Qwen3ForCausalLM", "classify"),
}

# Generative decoders that --runner pooling turns into embedders (each tested against HF).
_EMBEDDABLE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
               "Gemma2ForCausalLM")

# Configs converted from GGUF, or written by hand, may name only a model_type.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted({*_MODELS, *_TRANSFORMERS_MODELS, *_POOLING_MODELS})


def backend_verified_natives() -> list[str]:
    """Native architectures also verified on the transformers backend (--model-impl transformers)."""
    return sorted(set(_MODELS) & set(_TRANSFORMERS_MODELS))


def architecture_table() -> list[tuple[str, str]]:
    """(architecture, implementation) for every supported architecture, as --model-impl auto picks
    it; implementation is "native", "native (vision-language)", "transformers" (the backend) or
    "native (pooling)"."""
    rows = [(a, "native (vision-language)" if a in _VISION_LANGUAGE else "native") for a in _MODELS]
    rows += [(a, "transformers") for a in _TRANSFORMERS_MODELS if a not in _MODELS]
    rows += [(a, "native (pooling)") for a in _POOLING_MODELS]
    return sorted(rows, key=lambda r: r[0].lower())


def refused_architectures() -> dict[str, str]:
    return dict(_REFUSED)


_IMPL_NOTES = {"native": "kubeinfer's own model code (TP, fused layers)",
               "transformers": "transformers' model code on kubeinfer's paged attention (TP 1)",
               "native (pooling)": "embeddings (`--runner pooling`)",
               "native (vision-language)": "images in chat (`image_url` parts) and "
                                           "`LLM.generate(multi_modal_data=...)`"}
README_BEGIN = "<!-- architectures: generated by `python -m kubeinfer.engine.models.registry` -->"
README_END = "<!-- end of architectures -->"


def architectures_help() -> str:
    """The `kubeinfer serve --help` epilog: every architecture and the implementation it runs on."""
    lines = ["supported architectures (config.json `architectures`; --model-impl auto picks):"]
    for arch, impl in architecture_table():
        lines.append(f"  {arch:28s} {impl}")
    lines.append("not supported:")
    for arch, reason in sorted(_REFUSED.items()):
        lines.append(f"  {arch:28s} {reason.split(' (')[0].split(',')[0].split(';')[0]}")
    return "\n".join(lines)


def architectures_markdown() -> str:
    """The README's table of architectures, between README_BEGIN and README_END."""
    rows = ["| architecture | implementation |", "| --- | --- |"]
    rows += [f"| `{arch}` | {impl}: {_IMPL_NOTES[impl]} |" for arch, impl in architecture_table()]
    rows += [f"| `{arch}` | not supported: {reason} |" for arch, reason in sorted(_REFUSED.items())]
    return "\n".join([README_BEGIN, *rows, README_END])


def write_readme_table(readme: str) -> str:
    """`readme` with its generated block replaced by architectures_markdown()."""
    begin, end = readme.index(README_BEGIN), readme.index(README_END) + len(README_END)
    return readme[:begin] + architectures_markdown() + readme[end:]


def tensor_parallel_refusal(hf_config: Any) -> str | None:
    """Why --tensor-parallel-size > 1 cannot run this config, checked before any worker starts: an
    architecture with no native class runs on the transformers backend, which has no tensor
    parallelism yet (--model-impl transformers is refused when the backend is built)."""
    if any(n in _MODELS or n in _POOLING_MODELS for n in _architectures(hf_config)):
        return None
    names = ", ".join(getattr(hf_config, "architectures", None) or []) or "this model"
    return (f"{names} runs on the transformers backend, which does not support tensor parallelism "
            "yet; serve it with --tensor-parallel-size 1.")


def pipeline_parallel_refusal(hf_config: Any, model_impl: str = "auto") -> str | None:
    """Why --pipeline-parallel-size > 1 cannot run this config: only classes that hold a stage's
    layers (`supports_pp = True`) can, and the message names their architectures."""
    cls = get_model_class(hf_config, "generate", model_impl)
    if getattr(cls, "supports_pp", False):
        return None
    able = sorted(n for n, (module, name) in _MODELS.items()
                  if getattr(_load_class(module, name), "supports_pp", False))
    names = ", ".join(_architectures(hf_config)) or cls.__name__
    return (f"{names} does not support pipeline parallelism; the architectures that do are "
            f"{', '.join(able)}. Serve it with --pipeline-parallel-size 1 (and "
            "--tensor-parallel-size for several GPUs).")


def _architectures(hf_config: Any) -> list[str]:
    names = list(getattr(hf_config, "architectures", None) or [])
    if not names and getattr(hf_config, "model_type", None) in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf_config.model_type]]
    return names


def resolve_runner(runner: str, hf_config: Any) -> str:
    """--runner auto|generate|pooling -> "generate" or "pooling", as vLLM picks: auto is pooling for
    the pooling architectures (BertModel, XLMRobertaModel, *ForSequenceClassification, ...),
    generate otherwise; pooling on a generative decoder makes it an embedder. A runner the
    architecture cannot do is a ConfigError saying which one it can."""
    if runner not in RUNNERS:
        raise ConfigError(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    names = _architectures(hf_config)
    is_pooling = any(n in _POOLING_MODELS for n in names)
    shown = ", ".join(names) or "this model"
    if runner == "auto":
        return "pooling" if is_pooling else "generate"
    if runner == "generate" and is_pooling:
        raise ConfigError(f"{shown} is an embedding or classification model and cannot generate "
                          "text: serve it with --runner pooling (or auto) and call /v1/embeddings "
                          "(or /classify for a classifier).")
    if runner == "pooling" and not is_pooling and not any(n in _EMBEDDABLE for n in names):
        raise ConfigError(f"--runner pooling supports the pooling architectures "
                          f"{', '.join(sorted(_POOLING_MODELS))} and, as embedders, the decoders "
                          f"{', '.join(_EMBEDDABLE)}; {shown} is none of them.")
    return runner


def get_model_class(hf_config: Any, runner: str = "generate",
                    model_impl: str = "auto") -> type[nn.Module]:
    """The class for the config's architecture under a resolved runner ("generate" or "pooling")
    and --model-impl (auto: native when there is one, else the transformers backend; native;
    transformers). ConfigError saying why and what runs otherwise."""
    if model_impl not in MODEL_IMPLS:
        raise ConfigError(f"--model-impl must be one of {', '.join(MODEL_IMPLS)}, got {model_impl!r}")
    names = _architectures(hf_config)
    if runner == "generate":
        resolve_runner("generate", hf_config)  # an embedding model gets the --runner hint
    shown = ", ".join(names) or f"none (model_type {getattr(hf_config, 'model_type', None)!r})"
    if runner == "pooling":
        embedders = {k: (*_MODELS[k], "embed") for k in _EMBEDDABLE}
        for table in (_POOLING_MODELS, embedders):
            for name in names:
                if name in table:
                    return _load_class(*table[name])
        _unsupported(shown)
    if model_impl != "transformers":
        native = next((n for n in names if n in _MODELS), None)
        if native is not None:
            return _load_class(*_MODELS[native])
        if model_impl in ("native", "vllm"):
            raise ConfigError(f"model architecture {shown} has no native implementation in kubeinfer "
                              f"(native: {', '.join(sorted(_MODELS))}). Use --model-impl auto or "
                              "transformers to run it on the transformers backend.")
    return _transformers_backend(hf_config, names, shown, explicit=model_impl == "transformers")


def _load_class(module: str, cls: str, task: str | None = None) -> type[nn.Module]:
    model_cls = getattr(importlib.import_module(f"kubeinfer.engine.models.{module}"), cls)
    if task is None:
        return model_cls
    from kubeinfer.engine.models.decoder_pooling import as_pooling_model

    return as_pooling_model(model_cls, task)


def _transformers_backend(hf_config: Any, names: list[str], shown: str,
                          explicit: bool) -> type[nn.Module]:
    from kubeinfer.engine.models.transformers_support import hf_causal_lm_class, unsupported_reason

    if any(n in _VISION_LANGUAGE for n in names):
        raise ConfigError(f"{shown} is a vision-language model, which kubeinfer runs natively only "
                          "(the transformers backend takes no images and would run Gemma 3's and "
                          "PaliGemma's bidirectional attention causally): use --model-impl auto "
                          "or native.")
    refused = next((_REFUSED[n] for n in names if n in _REFUSED), None)
    if refused:
        raise ConfigError(f"model architecture {shown} is not supported by kubeinfer: it is {refused}. "
                          f"Supported architectures: {', '.join(supported_architectures())}.")
    if hf_causal_lm_class(hf_config) is None:
        _unsupported(shown)
    reason = unsupported_reason(hf_config)
    if reason:
        raise ConfigError(f"model architecture {shown} is not supported by kubeinfer: {reason}. "
                          f"Supported architectures: {', '.join(supported_architectures())}.")
    if not explicit and not any(n in _TRANSFORMERS_MODELS for n in names):
        logger.warning("%s has no native kubeinfer implementation and has not been verified on the "
                       "transformers backend; running it there.", shown)
    from kubeinfer.engine.models.transformers import TransformersForCausalLM

    return TransformersForCausalLM


def _unsupported(shown: str):
    raise ConfigError(f"model architecture {shown} is not supported by kubeinfer. Supported "
                      f"architectures: {', '.join(supported_architectures())}. Serve a model of one of "
                      "these architectures (its config.json `architectures` field names it).")


if __name__ == "__main__":  # regenerate the README's table: python -m kubeinfer.engine.models.registry
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "README.md"
    path.write_text(write_readme_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the architecture table into {path}")
