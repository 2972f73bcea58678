"""fft: fine-tuning foundation models in JAX.

Public API (imported lazily so `import fft` stays cheap):
  fft.load(source) -> (model, tokenizer)
  fft.generate(model, tokenizer, prompts, max_new_tokens=…, temperature=…, top_k=…, top_p=…)
  fft.export(workdir_or_model, out_dir, format="hf"|"peft", merge=False)
"""

import os
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


class _CallableModule(types.ModuleType):
    """A submodule named like a public function (`fft.generate`, `fft.export`).

    Importing the submodule binds `fft.<name>` to the module, hiding the lazy attribute below;
    calling the module therefore calls the public function, whatever was imported first.
    """

    def __call__(self, *args, **kwargs):
        from fft import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def __getattr__(name):
    if name in __all__:
        from fft import api

        return getattr(api, name)
    raise AttributeError(f"module 'fft' has no attribute {name!r}")
