"""fft: fine-tuning foundation models in JAX.

Public API (imported lazily so `import fft` stays cheap):
  fft.load(source) -> (model, tokenizer)
  fft.generate(model, tokenizer, prompts, max_new_tokens=…, temperature=…, top_k=…, top_p=…)
  fft.export(workdir_or_model, out_dir, format="hf"|"peft"|"gguf", merge=False)
Each is the plain function (`help(fft.generate)` shows its signature); the sampler's module is
`fft.sampling`, and `fft.export`'s command line is `python -m fft.export`.
"""

import os
import sys
import types

import flax

# flax >= 0.12 shards variables eagerly when they carry sharding names; fft places state itself
# (jax.jit with out_shardings from config rules), so creation must stay mesh-free.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
__all__ = ["load", "generate", "export"]


def cache_dir() -> str:
    """Root of fft's cache: `$FFT_CACHE`, default `~/.cache/fft` (base models, built kernels)."""
    return os.path.abspath(os.path.expanduser(os.environ.get("FFT_CACHE", "~/.cache/fft")))


class _Package(types.ModuleType):
    """The `fft` package: importing the CLI module `fft.export` (as `python -m fft.export`'s
    tests do) must not rebind the public function `fft.export` to that module."""

    def __setattr__(self, name, value):
        if name in __all__ and isinstance(value, types.ModuleType):
            return  # the import system binding a submodule; the function stays public
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in __all__:
        from fft import api

        return getattr(api, name)
    raise AttributeError(f"module 'fft' has no attribute {name!r}")
