"""The peer: HuggingFace transformers (PyTorch, eager, CPU) on the same Llama config.

Mirrors /work/shared/peers/hf_torch.py (LlamaForCausalLM, sdpa attention, torch AdamW,
`torch.set_num_threads(2)`, `model.generate` greedy with a KV cache). torch and transformers
are imported only here, lazily: they are in the `test` extra, not fft's own dependencies.

The peer runs in a worker process of the same benchmark run (`PeerProcess`), driven in
interleaved rounds over a pipe, not inside the JAX process: with JAX's thread pool in the same
process, torch's two OpenMP threads ran a micro train step ~100x slower (2.7 s instead of
30 ms on a loaded 2-core machine), which measured the interference rather than the peer.
While one side runs, the other waits on the pipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from fft.bench.common import stats, token_vocab
from fft.config_lib import FFTError


def _import():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise FFTError(
            f"--vs=transformers needs torch and transformers ({e}); pip install -e '.[test]'."
        ) from None
    return torch, transformers


def hf_llama_config(cfg, torch):
    """An HF LlamaConfig of an fft ModelConfig (Llama family: rope, rms, swiglu, no biases)."""
    from transformers import LlamaConfig

    from fft.interop.hf import real_config

    cfg = real_config(cfg)  # transformers has no vocabulary padding rows
    if cfg.mlp != "swiglu" or cfg.norm != "rms" or cfg.pos != "rope":
        raise FFTError("--vs=transformers compares Llama-shaped presets only (rope, rms, swiglu).")
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=max(cfg.max_seq_len, 1024),
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.qkv_bias,
        mlp_bias=cfg.mlp_bias,
    )
    hf._attn_implementation = "sdpa"
    return hf


# peft names of fft.models.lora.DEFAULT_TARGETS in a LlamaForCausalLM.
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class HFPeer:
    """LlamaForCausalLM + torch AdamW; `threads` intra-op threads (the peers' setting: 2);
    `lora_rank` > 0 wraps it in peft LoRA of that rank on fft's default targets (alpha 2r,
    no dropout, as fft.bench's LoRA) and trains the adapters only."""

    def __init__(self, cfg, *, threads: int = 2, lr: float = 1e-4, seed: int = 0,
                 lora_rank: int = 0):  # fmt: skip
        torch, transformers = _import()
        from transformers import LlamaForCausalLM

        self.torch = torch
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.model = LlamaForCausalLM(hf_llama_config(cfg, torch)).float()
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            lc = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=list(PEFT_TARGETS))  # fmt: skip
            self.model = get_peft_model(self.model, lc)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in trainable)
        self.opt = torch.optim.AdamW(trainable, lr=lr)
        self.settings = {
            "peer": "transformers",
            "peer_version": transformers.__version__,
            "torch": torch.__version__,
            "peer_threads": threads,
        }

    def train_step(self, tokens_bt: np.ndarray) -> float:
        """One eager step (forward with labels, backward, AdamW); returns its seconds."""
        ids = self.torch.from_numpy(np.asarray(tokens_bt, np.int64))
        self.model.train()
        t = time.perf_counter()
        out = self.model(input_ids=ids, labels=ids)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(out.loss.detach())
        return time.perf_counter() - t

    def generate(self, prompt_bp: np.ndarray, new_tokens: int) -> float:
        """Greedy `model.generate` of exactly `new_tokens` tokens; returns its seconds."""
        torch = self.torch
        self.model.eval()
        ids = torch.from_numpy(np.asarray(prompt_bp, np.int64))
        kw = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
            attention_mask=torch.ones_like(ids),
        )
        with torch.inference_mode():
            t = time.perf_counter()
            out = self.model.generate(ids, **kw)
            dt = time.perf_counter() - t
        assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
        return dt


def summary(ts: list[float], units: float) -> dict:
    """Median-based rate of `units` per call plus min/max (like the peer scripts)."""
    s = stats(ts)
    return {
        "rate": units / s["median"],
        "rate_min": units / s["max"],
        "rate_max": units / s["min"],
        "s_median": s["median"],
        "s_min": s["min"],
        "s_max": s["max"],
        "n": s["n"],
    }


# =============================================================================================
# Worker process
# =============================================================================================


class PeerProcess:
    """An HFPeer in a child process; `train(steps)` / `generate(reps)` return per-call seconds.

    Args:
      cfg: the fft ModelConfig to mirror.
      batch, seq: train batch shape; prompt, new: generation shape (random tokens, seed 0,
        the same draw as the fft side).
      threads: torch intra-op threads.
    """

    def __init__(self, cfg, *, threads: int = 2, batch=8, seq=256, prompt=64, new=128,
                 lora_rank: int = 0):  # fmt: skip
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fft.bench.peers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        init = dict(cfg=cfg.to_dict(), threads=threads, batch=batch, seq=seq, prompt=prompt,
                    new=new, lora_rank=lora_rank)  # fmt: skip
        reply = self._call("init", **init)
        self.n_params = reply["n_params"]
        self.n_trainable = reply["n_trainable"]
        self.settings = reply["settings"]

    def _call(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise FFTError(f"the transformers peer process died (exit {self.proc.wait()}).")
        reply = json.loads(line)
        if "error" in reply:
            raise FFTError(f"transformers peer: {reply['error']}")
        return reply

    def train(self, steps: int) -> list[float]:
        return self._call("train", steps=steps)["times"]

    def generate(self, reps: int) -> list[float]:
        return self._call("generate", reps=reps)["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self._call("quit")
            self.proc.wait(timeout=60)


def _worker() -> None:
    """stdin/stdout JSON-lines loop of PeerProcess (stdout carries replies only)."""
    from fft.models.config import ModelConfig

    out = sys.stdout
    sys.stdout = sys.stderr  # keep library prints off the reply channel
    peer, tokens, prompt, new = None, None, None, 0
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "init":
                cfg = ModelConfig.from_dict(msg["cfg"])
                peer = HFPeer(cfg, threads=msg["threads"], lora_rank=msg.get("lora_rank", 0))
                rng = np.random.default_rng(0)
                vocab = token_vocab(cfg)
                tokens = rng.integers(0, vocab, (msg["batch"], msg["seq"]))
                prompt = rng.integers(0, vocab, (msg["batch"], msg["prompt"]))
                new = msg["new"]
                settings = {**peer.settings, "peer_lora_rank": msg.get("lora_rank", 0)}
                reply = {"n_params": peer.n_params, "n_trainable": peer.n_trainable,
                         "settings": settings}  # fmt: skip
            elif msg["cmd"] == "train":
                reply = {"times": [peer.train_step(tokens) for _ in range(msg["steps"])]}
            elif msg["cmd"] == "generate":
                reply = {"times": [peer.generate(prompt, new) for _ in range(msg["reps"])]}
            elif msg["cmd"] == "quit":
                out.write(json.dumps({"ok": True}) + "\n")
                out.flush()
                return
            else:
                reply = {"error": f"unknown command {msg['cmd']!r}"}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _worker()
