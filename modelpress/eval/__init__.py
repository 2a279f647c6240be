from .metrics import EvalResult, ReferenceLogprobs, evaluate, kl_divergence, perplexity

__all__ = ["EvalResult", "ReferenceLogprobs", "evaluate", "kl_divergence", "perplexity"]
