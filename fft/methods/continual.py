"""Continual pre-training: keep a model current on a stream of shards whose facts change by era.

    stream   a directory of JSONL shards read in name order by the streaming loader
             (`ShardStream`), new shards picked up as they appear; era k's shards are named
             `era<kk>-<jjjjj>.jsonl`. Without `continual.stream_dir` the method plays the
             producer: it writes the synthetic world's era-k fact shards into WORKDIR/stream when
             training reaches era k (so the data really arrives while the run is live).
    eras     era k is training steps [k*S, (k+1)*S), S = steps // eras. At an era's first step the
             loader moves on to that era's first shard (what is left of the previous era is
             skipped: the model trains on the newest data), and the replay pool grows.
    mixture  [stream, replay of earlier eras' shards, general text] with weights
             [1 - replay - general, replay, general] (no replay in era 0).
    schedule optim.schedule='rewarm' re-warms and re-decays at every era boundary (filled in
             from the eras when optim.rewarm_steps is empty); 'wsd' and 'constant' are the
             "infinite" alternatives.
    evals    at the end of every era (and before): current_fact_acc (cloze questions as of the
             current era), past_fact_acc (earlier eras' questions with their own era's answers:
             forgetting), new_fact_acc (facts changed in the current era), general_ppl,
             fact_loss/era<k> (held-out fact text of each era). Per-era rows go to eras.json and
             results.json["eras"].

Resume is exact: the data state is (batches delivered, era, the era's loader state: shard,
offset, mixture counts), saved with every checkpoint; after a SIGKILL the restarted run rebuilds
the same era's loader and continues with exactly the next example (tested).
"""

from __future__ import annotations

import copy
import json
import os

import jax

from fft import config_lib
from fft.data import pipeline, sources
from fft.data.synthetic import World
from fft.eval import facts as facts_eval
from fft.eval import perplexity
from fft.train import lm
from fft.train.recipe import Recipe, lm_batch_spec

# =============================================================================================
# The stream directory: era shards (written here when the method is the producer)
# =============================================================================================


def era_prefix(era: int) -> str:
    """Shard names of era `era` start with this (they sort by era, then shard)."""
    return f"era{era:02d}-"


def write_era_shards(directory: str, world: World, era: int, docs: int, shards: int) -> None:
    """Writes era `era`'s fact documents as `shards` JSONL shards (atomically; idempotent)."""
    os.makedirs(directory, exist_ok=True)
    names = [f"{era_prefix(era)}{j:05d}.jsonl" for j in range(shards)]
    if all(os.path.exists(os.path.join(directory, n)) for n in names):
        return
    texts = world.fact_corpus(era, docs, "train")
    per = -(-docs // shards)
    for j, name in enumerate(names):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            continue
        # Every process of a multi-process run writes the same shards into the shared workdir:
        # each through its own temporary file, so the renames never collide.
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for t in texts[j * per : (j + 1) * per]:
                f.write(json.dumps({"text": t}) + "\n")
        os.replace(tmp, path)  # the loader never sees a half-written shard


def _era_records(directory: str, eras: range) -> list[dict]:
    """Every record of the shards of `eras` (the replay pool), in shard order."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".jsonl"))
    paths = [
        os.path.join(directory, n) for n in names if any(n.startswith(era_prefix(e)) for e in eras)
    ]
    if not paths:
        return []
    src = sources.JsonlSource(paths)
    return [src[i] for i in range(len(src))]


def _skip_to_era(stream_state: dict, directory: str, era: int) -> dict:
    """A ShardStream state positioned at the end of the last shard before era `era`'s first.

    Only ever moves forward: a stream already in era `era` (or later) is left where it is.
    """
    prefix = era_prefix(era)
    current = stream_state.get("shard")
    if current is not None and current >= prefix:
        return stream_state
    before = sorted(
        n for n in os.listdir(directory) if n.endswith(".jsonl") and n < prefix
    )  # fmt: skip
    if not before or (current is not None and before[-1] < current):
        return stream_state
    last = os.path.join(directory, before[-1])
    with open(last, "rb") as f:
        data = f.read()
    lines = data.count(b"\n")
    records = sum(1 for line in data.split(b"\n") if line.strip())
    return {"shard": before[-1], "record": records, "line": lines, "byte": len(data)}


# =============================================================================================
# The era-aware iterator
# =============================================================================================


class EraIterator:
    """Batches of era `batches // steps_per_era`, each era its own mixture; exact state.

    Args:
      make_inner: `era -> DataIterator` over [stream, replay of eras < era, general].
      steps_per_era: batches per era.
      n_eras: number of eras (the last one continues past its steps, if asked for more).
      on_era: `era -> None`, called before an era's data is read (the producer writes shards).
      stream_dir: the shard directory (to skip to an era's first shard).
    """

    # The evals read `current_era` / `batches` mid-run: they must be the consumed position, so
    # the loop does not prefetch this iterator (fft.data.prefetch.maybe_prefetch).
    no_prefetch = True

    def __init__(self, make_inner, *, steps_per_era: int, n_eras: int, on_era, stream_dir: str):
        self.make_inner, self.steps_per_era, self.n_eras = make_inner, steps_per_era, n_eras
        self.on_era, self.stream_dir = on_era, stream_dir
        self.batches, self.era, self.inner = 0, None, None

    @property
    def stats(self):
        return getattr(self.inner, "stats", None)

    def __iter__(self):
        return self

    def _enter(self, era: int) -> None:
        previous = self.inner.get_state() if self.inner is not None else None
        self.on_era(era)
        inner = self.make_inner(era)
        if previous is not None:
            state = copy.deepcopy(previous)
            mix = state["mixture"]
            mix["streams"][0] = _skip_to_era(mix["streams"][0], self.stream_dir, era)
            mix["streams"][1] = {"pos": 0}  # a new replay pool, read from its start
            mix["exhausted"] = [False] * len(mix["exhausted"])  # new shards may have arrived
            inner.set_state(state)
        self.era, self.inner = era, inner

    def __next__(self):
        era = min(self.batches // self.steps_per_era, self.n_eras - 1)
        if era != self.era:
            self._enter(era)
        batch = next(self.inner)
        self.batches += 1
        return batch

    def get_state(self) -> dict:
        inner = self.inner.get_state() if self.inner is not None else None
        return {"batches": self.batches, "era": self.era, "inner": inner}

    def set_state(self, state: dict) -> None:
        self.batches, self.era, self.inner = int(state["batches"]), None, None
        if state.get("era") is not None:
            era = int(state["era"])
            for e in range(era + 1):
                self.on_era(e)
            self.inner = self.make_inner(era)
            self.inner.set_state(state["inner"])
            self.era = era

    @property
    def current_era(self) -> int:
        """The era of the last batch delivered (0 before any)."""
        return 0 if self.era is None else self.era


# =============================================================================================
# Evals
# =============================================================================================


def _make_evaluate(config, world, tokenizer, it: EraIterator, workdir: str):
    c = config.continual
    eras = range(c.eras)
    questions = {e: world.fact_questions(e) for e in eras}
    candidates = facts_eval.candidates_by_relation([q for e in eras for q in questions[e]])
    encode = lm.text_encoder(tokenizer, config.seq_len, truncation="split")

    def batches(texts):
        return pipeline.make_eval_batches(
            [[{"text": t} for t in texts]], encode, seq_len=config.seq_len,
            batch_size=config.batch_size, shard_index=0, shard_count=1,
        )  # fmt: skip

    general = batches(world.general_corpus(c.eval_docs, "test"))
    fact_text = {e: batches(world.fact_corpus(e, c.eval_docs, "test")) for e in eras}
    path = os.path.join(workdir, "eras.json")

    def acc(model, qs):
        return facts_eval.fact_accuracy(
            model, tokenizer, qs, mode=c.fact_eval, candidates=candidates
        )["accuracy"]  # fmt: skip

    def evaluate(model) -> dict:
        era = it.current_era
        out = {"era": float(era), "current_fact_acc": acc(model, questions[era])}
        if era > 0:
            out["past_fact_acc"] = acc(model, [q for e in range(era) for q in questions[e]])
            out["new_fact_acc"] = acc(model, [q for q in questions[era] if q["changed"]])
        out.update(perplexity.evaluate(model, general, prefix="general_"))
        for e in eras:
            out[f"fact_loss/era{e}"] = perplexity.evaluate(model, fact_text[e])["loss"]
        if jax.process_index() == 0:
            rows = {}
            if os.path.exists(path):
                with open(path) as f:
                    rows = json.load(f)
            rows["before" if it.batches == 0 else str(era)] = out
            with open(path, "w") as f:
                json.dump(rows, f, indent=1)
        return out

    return evaluate


# =============================================================================================
# The method
# =============================================================================================


class EraShardStream(sources.ShardStream):
    """A ShardStream that reads only the shards of eras <= `max_era`.

    A later era's shards may already be on disk (a restarted run, or an outside producer ahead
    of the trainer); they belong to a later era, so this stream ends before them. For the same
    reason a waiting stream (stop_at_end=False) stops waiting once a later era has begun to arrive.
    """

    def __init__(self, directory: str, max_era: int, **kwargs):
        self.max_era = max_era
        super().__init__(directory, **kwargs)

    def _all_shards(self) -> list[str]:
        return super().shards()

    def shards(self) -> list[str]:
        return [s for s in self._all_shards() if s < era_prefix(self.max_era + 1)]

    @property
    def stop_at_end(self) -> bool:
        limit = era_prefix(self.max_era + 1)
        return self._stop_at_end or any(s >= limit for s in self._all_shards())

    @stop_at_end.setter
    def stop_at_end(self, value: bool) -> None:
        self._stop_at_end = value


def _weights(c, era: int) -> list[float]:
    replay = c.replay if era > 0 else 0.0
    return [1.0 - replay - c.general, replay, c.general]


def stream_dir_of(config, workdir: str) -> str:
    """The shard directory: continual.stream_dir, or WORKDIR/stream (the method writes it)."""
    c = config.continual
    return os.path.abspath(c.stream_dir) if c.stream_dir else os.path.join(workdir, "stream")


def build_train_data(config, workdir: str, world: World, tokenizer) -> EraIterator:
    """The era-aware training iterator of a continual run (independent of the model)."""
    c = config.continual
    steps_per_era = config.steps // c.eras
    stream_dir = stream_dir_of(config, workdir)
    if c.stream_dir:
        on_era = lambda era: None  # noqa: E731 - an outside producer writes the shards
    else:
        os.makedirs(stream_dir, exist_ok=True)

        def on_era(era):
            write_era_shards(stream_dir, world, era, c.docs_per_era, c.shards_per_era)

    encode = lm.text_encoder(tokenizer, config.seq_len, truncation="split")
    general = [{"text": t} for t in world.general_corpus(c.general_docs)]

    def make_inner(era: int):
        stream = EraShardStream(
            stream_dir, era, poll_interval_s=c.poll_interval_s, stop_at_end=c.stop_at_end,
            on_bad_record=config.data.on_bad_record, timeout_s=c.timeout_s or None,
        )  # fmt: skip
        replay = _era_records(stream_dir, range(era)) if era > 0 else []
        # Era 0 has no replay; a placeholder with weight 0 keeps the mixture's shape fixed.
        return pipeline.make_train_iterator(
            [stream, replay or general[:1], general], encode, seq_len=config.seq_len,
            batch_size=config.batch_size, packing=config.data.packing,
            shuffle=config.data.shuffle, seed=config.seed + era, weights=_weights(c, era),
            on_bad_record=config.data.on_bad_record,
        )  # fmt: skip

    return EraIterator(
        make_inner, steps_per_era=steps_per_era, n_eras=c.eras, on_era=on_era,
        stream_dir=stream_dir,
    )  # fmt: skip


def recipe(config, workdir=None, *, base: lm.Base | None = None) -> Recipe:
    """The continual pre-training Recipe: `continual.eras` eras of streamed shards."""
    del workdir  # the stream and eras.json live in the run's workdir (Context.workdir)
    c = config.continual
    if c.replay < 0 or c.general < 0 or c.replay + c.general >= 1:
        raise config_lib.ConfigError(
            f"continual.replay={c.replay} + continual.general={c.general} must be in [0, 1)."
        )
    world = World(c.world_seed)
    if not 1 <= c.eras <= world.n_eras:
        raise config_lib.ConfigError(f"continual.eras={c.eras} must be in [1, {world.n_eras}].")
    steps_per_era = config.steps // c.eras
    if steps_per_era < 1:
        raise config_lib.ConfigError(f"config.steps={config.steps} < continual.eras={c.eras}.")
    if config.optim.schedule == "rewarm" and not config.optim.rewarm_steps:
        config.optim.rewarm_steps = tuple(e * steps_per_era for e in range(1, c.eras))
    base = base or lm.load_base(config)
    tokenizer = base.tokenizer
    with config.unlocked():
        config.eval_every = steps_per_era  # an eval at the end of every era
    built: dict[str, EraIterator] = {}

    def train_data(ctx):
        built["workdir"] = ctx.workdir
        built["it"] = build_train_data(config, ctx.workdir, world, tokenizer)
        return built["it"]

    def evaluate(ctx):
        return _make_evaluate(config, world, tokenizer, built["it"], ctx.workdir)

    def finalize(results: dict) -> dict:
        rows = _era_rows(built.get("workdir"))
        return {"eras": rows} if rows is not None else {}

    return Recipe(
        method="continual",
        model=lm.model_spec(base, config),
        loss_fn=lm.next_token_loss_fn(),
        train_data=train_data,
        batch_spec=lm_batch_spec(config.seq_len),
        evaluate=evaluate,
        trainable=lm.trainable_filter(config),
        tokenizer=tokenizer,
        finalize=finalize,
    )


def _era_rows(workdir) -> dict | None:
    """The per-era eval rows of eras.json (this method's own file), or None."""
    path = os.path.join(workdir, "eras.json") if workdir else None
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
