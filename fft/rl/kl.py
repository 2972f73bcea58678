"""KL to the reference policy: per-token estimators and the KL-coefficient controllers.

Estimators (Schulman, "Approximating KL divergence", 2020) of KL(pi || pi_ref) from tokens
sampled from pi, with log-ratio  d = log pi(x) - log pi_ref(x):

    k1 = d                         unbiased, high variance, can be negative
    k2 = d^2 / 2                   biased, low variance, >= 0
    k3 = exp(-d) - 1 + d           unbiased, low variance, >= 0

Controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec 2.2)
give the coefficient beta of the per-token penalty  r_t = score * [t last] - beta * kl_t.
They are plain Python objects (the penalty is applied in the rollout, outside jit) whose value is
saved with the prompt stream's state, so a resumed run continues with the same beta.
"""

from __future__ import annotations

import jax.numpy as jnp

ESTIMATORS = ("k1", "k2", "k3")


def kl_k1(logp, ref_logp):
    """k1 = log pi - log pi_ref (per token)."""
    return logp - ref_logp


def kl_k2(logp, ref_logp):
    """k2 = (log pi - log pi_ref)^2 / 2 (per token)."""
    return 0.5 * jnp.square(logp - ref_logp)


def kl_k3(logp, ref_logp):
    """k3 = exp(log pi_ref - log pi) - 1 - (log pi_ref - log pi) (per token, >= 0)."""
    r = ref_logp - logp
    return jnp.exp(r) - 1.0 - r


def kl_penalty(logp, ref_logp, estimator: str = "k1"):
    """Per-token KL estimate by name ('k1' | 'k2' | 'k3').

    Args:
      logp: log pi(x_t) of the sampled tokens under the policy, [B, N].
      ref_logp: log pi_ref(x_t) of the same tokens under the reference, [B, N].
      estimator: which estimator.

    Returns:
      kl_bn [B, N].
    """
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k2":
        return kl_k2(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl estimator {estimator!r} is not one of {ESTIMATORS}")


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (same signature as the adaptive controller)."""
        del current_kl, n_steps

    def get_state(self) -> dict:
        return {"value": self.value}

    def set_state(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller driving the observed KL toward `target` (Ziegler et al. 2019).

        e_t    = clip(KL_t / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    where KL_t is the mean per-sequence KL of the last rollout and n_steps the number of samples
    (sequences) it used.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController: target and horizon must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scales beta up when KL is above target, down when below (at most 20% of K_beta).

        Args:
          current_kl: observed KL (per sequence, summed over tokens) of the last batch.
          n_steps: how many samples that batch held.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * float(n_steps) / self.horizon

    def get_state(self) -> dict:
        return {"value": self.value}

    def set_state(self, state: dict) -> None:
        self.value = float(state["value"])


def make_controller(kind: str, init_kl_coef: float, target: float = 6.0, horizon: int = 10000):
    """'fixed' -> FixedKLController, 'adaptive' -> AdaptiveKLController."""
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(init_kl_coef, target, horizon)
    raise ValueError(f"KL controller {kind!r} is not one of ('fixed', 'adaptive')")
