"""kubeinfer: a vLLM-class LLM engine and the Kubernetes operator that deploys it."""
__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutputKind", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy, so `kubeinfer operator` and `kubeinfer render` never import torch.
    if name == "LLM":
        from kubeinfer.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from kubeinfer.engine.sampling_params import SamplingParams
        return SamplingParams
    if name == "RequestOutputKind":
        from kubeinfer.engine.sampling_params import RequestOutputKind
        return RequestOutputKind
    raise AttributeError(f"module 'kubeinfer' has no attribute {name!r}")
