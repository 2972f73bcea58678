"""Write the synthetic world as JSONL files.

    python -m fft.data.synthetic --out DIR [--seed 0] [--scale 1.0]

Layout under DIR (sizes at --scale 1; every count is multiplied by --scale, at least 1):

  general/train.jsonl, general/test.jsonl            {"text"}                 20000 / 1000
  domain/<domain>/train.jsonl, test.jsonl            {"text"}                  3000 / 300
  domain/<domain>/terms.txt                          one compound term a line
  facts/era_<k>/shard_<j>.jsonl                      {"text"}       4 shards x 500 per era
  facts/stream/shard_<i>.jsonl                       the same shards, era-ordered (i = k*4+j)
  facts/test/era_<k>.jsonl                           {"text"}                   200
  facts/questions/era_<k>.jsonl                      {"prompt","answer","era","changed",...}
  instructions/train.jsonl, test.jsonl               {"instruction","input","output","task"}
                                                                              20000 / 1500
  chat/train.jsonl, test.jsonl                       {"messages"}              5000 / 500
  preferences/train.jsonl, test.jsonl                {"prompt","responses","ranking",...}
                                                                              5000 / 500
  pairwise/train.jsonl, test.jsonl                   {"prompt","chosen","rejected",...}
                                                                              5000 / 500
  reviews/train.jsonl, test.jsonl                    {"text","label","label_id"} 4000 / 1000
  world.json                                         seed, sizes, tasks, domains, labels
"""

from __future__ import annotations

import argparse
import json
import os

from . import World

SIZES = dict(
    general=(20000, 1000),
    domain=(3000, 300),
    fact_shards=4,
    fact_shard_docs=500,
    fact_test=200,
    instructions=(20000, 1500),
    chat=(5000, 500),
    preferences=(5000, 500),
    pairwise=(5000, 500),
    reviews=(4000, 1000),
)


def _write(path: str, records) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_world(out: str, seed: int = 0, scale: float = 1.0) -> dict:
    """Write every part of `World(seed)` under `out` (layout in the module docstring).

    Returns:
      the sizes used (also written to `out/world.json`).
    """
    w = World(seed)

    def n(x):
        return max(1, round(x * scale))

    sizes = {k: (tuple(n(x) for x in v) if isinstance(v, tuple) else v) for k, v in SIZES.items()}
    sizes["fact_shard_docs"] = n(SIZES["fact_shard_docs"])
    sizes["fact_test"] = n(SIZES["fact_test"])
    j = os.path.join
    for split, i in (("train", 0), ("test", 1)):
        _write(
            j(out, "general", f"{split}.jsonl"),
            ({"text": t} for t in w.general_corpus(sizes["general"][i], split)),
        )
        for d in w.domains:
            _write(
                j(out, "domain", d, f"{split}.jsonl"),
                ({"text": t} for t in w.domain_corpus(d, sizes["domain"][i], split)),
            )
        _write(
            j(out, "instructions", f"{split}.jsonl"),
            w.instruction_data(split, sizes["instructions"][i]),
        )
        _write(j(out, "chat", f"{split}.jsonl"), w.chat_data(split, sizes["chat"][i]))
        _write(
            j(out, "preferences", f"{split}.jsonl"),
            w.preference_data(split, sizes["preferences"][i]),
        )
        _write(j(out, "pairwise", f"{split}.jsonl"), w.pairwise_data(split, sizes["pairwise"][i]))
        _write(j(out, "reviews", f"{split}.jsonl"), w.reviews(split, sizes["reviews"][i]))
    for d in w.domains:
        with open(j(out, "domain", d, "terms.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(w.domain_terms(d)) + "\n")
    per_shard = sizes["fact_shard_docs"]
    for era in range(w.n_eras):
        docs = w.fact_corpus(era, per_shard * sizes["fact_shards"], "train")
        for s in range(sizes["fact_shards"]):
            shard = [{"text": t} for t in docs[s * per_shard : (s + 1) * per_shard]]
            _write(j(out, "facts", f"era_{era}", f"shard_{s:05d}.jsonl"), shard)
            # The same shards as one era-ordered stream, for a growing-directory loader.
            k = era * sizes["fact_shards"] + s
            _write(j(out, "facts", "stream", f"shard_{k:05d}.jsonl"), shard)
        _write(
            j(out, "facts", "test", f"era_{era}.jsonl"),
            ({"text": t} for t in w.fact_corpus(era, sizes["fact_test"], "test")),
        )
        _write(j(out, "facts", "questions", f"era_{era}.jsonl"), w.fact_questions(era))
    meta = dict(
        seed=seed,
        scale=scale,
        sizes=sizes,
        n_eras=w.n_eras,
        domains=list(w.domains),
        tasks=list(w.tasks),
        label_names=list(w.label_names),
        prompt_template=w.prompt_template,
    )
    with open(j(out, "world.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return sizes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m fft.data.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every size by this")
    args = p.parse_args(argv)
    sizes = write_world(args.out, args.seed, args.scale)
    print(json.dumps({"out": args.out, "seed": args.seed, "sizes": sizes}))


if __name__ == "__main__":
    main()
