"""Records -> token ids + loss masks, one function per format.

`encode_record(record, fmt, tokenizer, max_len=...)` returns `{'tokens': [...], 'loss_mask':
[...], ...}` where `loss_mask[t] = 1` marks token t as a target (predicted from t-1; the first
token is never a target). Formats and their fields:

  text               {"text"}                          loss on every token
  instruction        {"instruction", "input"?, "output"}  loss on the output (+ eos)
  prompt_completion  {"prompt", "completion"}          loss on the completion (+ eos)
  chat               {"messages": [{"role", "content"}]}  loss on every assistant turn (+ end)
                     (ShareGPT {"conversations": [{"from", "value"}]} is accepted too)
  preference         {"prompt", "chosen", "rejected"}  -> chosen_* / rejected_* fields
  ranking            {"prompt", "responses": [K], "ranking": [K]}  ranking[i] = rank of
                     responses[i], 0 = best  -> cand_tokens (K lists), cand_loss_mask, ranks
  classification     {"text", "label"} (int class, float regression, or a name in label_names)
                     or {"text", "labels": [...]} (multi-label -> multi-hot over label_names)

The default instruction template (Alpaca style, every field after a space; the "### Input"
line is left out when the record has no input):

    ### Instruction: {instruction}
    ### Input: {input}
    ### Response: {output}

Fields follow a space, not a newline, and a space that ends the prompt moves to the start of the
response (`_encode_spans`): tokenizers mark a word start with the space before it ("▁word",
" word"), so a word right after a newline, or split from its space, becomes different (often
character-level) tokens than the same word inside text — copying a word from the input to the
answer would then mean learning a second spelling of every word. Generation prompts end without
that space; the model produces it as part of its first token.

A custom `template` string uses the same `{instruction}`, `{input}`, `{output}` placeholders:
everything before `{output}` is the prompt, `{output}` and anything after it are targets, and
the tokenizer's eos id ends the response. For `chat`, `template` (or else the tokenizer's
`chat_template`) is a HuggingFace jinja chat template; without one a simple default is used:
`<|system|> ...\\n<|user|> ...\\n<|assistant|> ` + reply + eos. In preference, ranking and
prompt_completion records a `prompt` that is a list of messages is rendered as a chat prompt; a
string prompt is used as is, or through the instruction `template` when one is given.

Over-long examples (> max_len tokens): truncation='prompt' cuts the prompt side first (from its
start, keeping bos), then the end of the response; 'drop' returns None; for `text` only, 'split'
returns a list of max_len chunks. Truncated examples carry `'truncated': True`; callers count
them and the drops.
"""

from __future__ import annotations

import functools
import numbers
import re
from collections.abc import Sequence

from fft.config_lib import FFTError
from fft.data.sources import BadRecordError

FORMATS = (
    "text",
    "instruction",
    "prompt_completion",
    "chat",
    "preference",
    "ranking",
    "classification",
)
TRUNCATION = ("prompt", "drop", "split")

DEFAULT_INSTRUCTION_TEMPLATE = (
    "### Instruction: {instruction}\n### Input: {input}\n### Response: {output}"
)
DEFAULT_INSTRUCTION_TEMPLATE_NO_INPUT = "### Instruction: {instruction}\n### Response: {output}"
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user"}

Span = tuple  # (str | list[int], is_target: bool)


def _field(record: dict, name: str, fmt: str, types=(str,)):
    if name not in record or record[name] is None:
        raise BadRecordError(f"{fmt} record is missing field {name!r} (has {sorted(record)})")
    value = record[name]
    if not isinstance(value, types):
        raise BadRecordError(
            f"{fmt} record field {name!r} is {type(value).__name__}, expected "
            + "/".join(t.__name__ for t in types)
        )
    return value


def _optional_str(record: dict, name: str, fmt: str) -> str:
    """An optional string field ('' when absent or null); another type is a BadRecordError."""
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecordError(f"{fmt} record field {name!r} is {type(value).__name__}, expected str")
    return value


# ------------------------------------------------------------------------------------------------
# Spans -> tokens
# ------------------------------------------------------------------------------------------------


def _special_pattern(tokenizer):
    specials = getattr(tokenizer, "special_tokens", None) or {}
    if not specials:
        return None, specials
    alternatives = sorted(specials, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in alternatives)), specials


def _unicode(text: str) -> str:
    """`text`, or a BadRecordError when it holds a lone surrogate: JSON may carry "\\ud800"
    escapes, which no tokenizer encodes (sentencepiece raises a bare RuntimeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecordError(f"record text is not valid Unicode ({e.reason})") from None
    return text


def _encode_text(tokenizer, text: str) -> list[int]:
    """Encodes text in which special token strings (e.g. '</s>' from a template) map to their id."""
    _unicode(text)
    pattern, specials = _special_pattern(tokenizer)
    if pattern is None:
        return tokenizer.encode(text)
    ids, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            ids += tokenizer.encode(text[pos : m.start()])
        ids.append(specials[m.group()])
        pos = m.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:])
    return ids


def _space_to_target(spans: Sequence[Span]) -> list[Span]:
    """Moves the spaces that end a prompt span onto the target text span after it.

    "Response: " + "word" would encode the space alone and "word" without its word-start marker;
    "Response:" + " word" encodes like the same word inside text (see the module docstring).
    """
    out = list(spans)
    for i in range(len(out) - 1):
        (piece, is_target), (nxt, nxt_target) = out[i], out[i + 1]
        if isinstance(piece, str) and isinstance(nxt, str) and not is_target and nxt_target:
            stripped = piece.rstrip(" ")
            if stripped != piece and nxt and not nxt[0].isspace():
                out[i], out[i + 1] = (stripped, False), (piece[len(stripped) :] + nxt, True)
    return out


def _encode_spans(tokenizer, spans: Sequence[Span]) -> tuple[list[int], list[int], int]:
    """Concatenates encoded spans. Returns (tokens, loss_mask, index of the first target token)."""
    tokens, mask, first_target = [], [], -1
    for piece, is_target in _space_to_target(spans):
        ids = _encode_text(tokenizer, piece) if isinstance(piece, str) else list(piece)
        if not ids:
            continue
        if is_target and first_target < 0:
            first_target = len(tokens)
        tokens += ids
        mask += [int(is_target)] * len(ids)
    return tokens, mask, (len(tokens) if first_target < 0 else first_target)


def _specials(tokenizer) -> tuple[list[int], list[int]]:
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    return bos, eos


def _finish(tokens, mask, protect_from, *, max_len, truncation, bos_id, train_on_prompt):
    """Applies train_on_prompt, truncation and the first-token rule. None = dropped."""
    if train_on_prompt:
        mask = [1] * len(tokens)
    out = {}
    if len(tokens) > max_len:
        if truncation == "drop":
            return None
        keep_head = 1 if tokens and tokens[0] == bos_id else 0
        excess = len(tokens) - max_len
        cut = max(0, min(excess, protect_from - keep_head))  # prompt side first
        tokens = tokens[:keep_head] + tokens[keep_head + cut :]
        mask = mask[:keep_head] + mask[keep_head + cut :]
        tokens, mask = tokens[:max_len], mask[:max_len]  # then the end of the response
        out["truncated"] = True
    if mask:
        mask = [0] + list(mask[1:])
    out["tokens"], out["loss_mask"] = tokens, mask
    return out


# ------------------------------------------------------------------------------------------------
# Templates
# ------------------------------------------------------------------------------------------------


def instruction_spans(instruction: str, input_text: str, output: str | None, template=None):
    """Prompt and response spans of an instruction record (response omitted if output is None)."""
    if template is None:
        template = (
            DEFAULT_INSTRUCTION_TEMPLATE if input_text else DEFAULT_INSTRUCTION_TEMPLATE_NO_INPUT
        )
    if "{output}" not in template:
        raise FFTError(f"instruction template must contain {{output}}: {template!r}")
    head, tail = template.split("{output}", 1)
    # str.replace, not str.format: data and templates may hold literal braces.
    prompt = head.replace("{instruction}", instruction).replace("{input}", input_text)
    spans = [(prompt, False)]
    if output is not None:
        spans.append((output + tail, True))
    return spans


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render_chat_template(template: str, messages, *, add_generation_prompt=False, tokenizer=None):
    """Renders a HuggingFace jinja chat template to a string."""
    inverse = {v: k for k, v in (getattr(tokenizer, "special_tokens", None) or {}).items()}
    bos = inverse.get(getattr(tokenizer, "bos_id", -1), "")
    eos = inverse.get(getattr(tokenizer, "eos_id", -1), "")
    try:
        return _compile_chat_template(template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
        )
    except Exception as e:  # jinja errors: report as a data/template problem, not a traceback
        raise BadRecordError(f"chat template failed to render: {e}") from None


def _messages(record: dict, fmt: str) -> list[dict]:
    if "messages" not in record and "conversations" in record:
        msgs = []
        for i, m in enumerate(_field(record, "conversations", fmt, (list,))):
            if not isinstance(m, dict) or not isinstance(m.get("from"), str):
                raise BadRecordError(
                    f"{fmt} record: conversations entry {i} needs string 'from' and 'value'"
                )
            msgs.append(
                {"role": _SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value")}
            )
    else:
        msgs = _field(record, "messages", fmt, (list,))
    return check_messages(msgs, fmt)


def check_messages(msgs, fmt: str = "chat", name: str = "message") -> list[dict]:
    """`msgs` if it is a list of {'role': str, 'content': str}; else a BadRecordError."""
    if not isinstance(msgs, list):
        raise BadRecordError(f"{fmt} record: {name}s must be a list, got {type(msgs).__name__}")
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadRecordError(f"{fmt} record: {name} {i} needs string 'role' and 'content'")
    return msgs


def chat_spans(messages, tokenizer, template=None, *, add_generation_prompt=False):
    """Spans of a conversation; assistant turns (with their end marker) are targets.

    With a jinja template, each assistant turn's text is found by rendering prefixes of the
    conversation: messages[:i] with the generation prompt, then messages[:i+1]; the difference is
    the turn. This needs a prefix-stable template (true of the common ones).
    """
    template = template or getattr(tokenizer, "chat_template", None)
    bos, eos = _specials(tokenizer)
    if not template:
        spans = [(bos, False)]
        for m in messages:
            if m["role"] == "assistant":
                spans += [("<|assistant|> ", False), (m["content"], True), (eos, True)]
            else:
                spans.append((f"<|{m['role']}|> {m['content']}\n", False))
        if add_generation_prompt:
            spans.append(("<|assistant|> ", False))
        return spans

    def render(msgs, gen):
        return render_chat_template(template, msgs, add_generation_prompt=gen, tokenizer=tokenizer)

    full = render(messages, add_generation_prompt)
    spans, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        if start < pos or end < start or not full.startswith(render(messages[: i + 1], False)):
            raise FFTError(
                "chat template is not prefix-stable (rendering a conversation prefix does not "
                "give a prefix of the full rendering), so assistant turns cannot be located; "
                "pass a simpler template with config data.template"
            )
        spans += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    spans.append((full[pos:], False))
    return spans


def _prompt_spans(record: dict, fmt: str, tokenizer, template) -> list[Span]:
    """Prompt of prompt_completion / preference / ranking records (see the module docstring)."""
    prompt = _field(record, "prompt", fmt, (str, list))
    if isinstance(prompt, list):
        check_messages(prompt, fmt, "prompt message")
        chat_template = template if template and "{output}" not in template else None
        return chat_spans(prompt, tokenizer, chat_template, add_generation_prompt=True)
    bos, _ = _specials(tokenizer)
    if template and "{output}" in template:
        return [(bos, False)] + instruction_spans(prompt, "", None, template)
    return [(bos, False), (prompt, False)]


def encode_prompt(record: dict, fmt: str, tokenizer, *, template=None) -> list[int]:
    """Token ids of the prompt exactly as training saw it (for generation and eval)."""
    bos, _ = _specials(tokenizer)
    if fmt == "instruction":
        spans = [(bos, False)] + instruction_spans(
            _field(record, "instruction", fmt), _optional_str(record, "input", fmt), None, template
        )
    elif fmt == "chat":
        msgs = _messages(record, fmt)
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]  # the reference answer is not part of the prompt
        spans = chat_spans(msgs, tokenizer, template, add_generation_prompt=True)
    elif fmt in ("prompt_completion", "preference", "ranking"):
        spans = _prompt_spans(record, fmt, tokenizer, template)
    else:
        raise FFTError(f"encode_prompt: format {fmt!r} has no prompt")
    # Training moved a prompt's final space onto the response; the model generates it.
    if spans and isinstance(spans[-1][0], str):
        spans = [*spans[:-1], (spans[-1][0].rstrip(" "), spans[-1][1])]
    return _encode_spans(tokenizer, spans)[0]


# ------------------------------------------------------------------------------------------------
# encode_record
# ------------------------------------------------------------------------------------------------


def _label(value, label_names, fmt):
    if isinstance(value, int) and not isinstance(value, bool) and label_names is not None:
        if not 0 <= value < len(label_names):
            raise BadRecordError(
                f"{fmt} record: label {value} is not a class index in [0, {len(label_names)})"
            )
        return value
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, str) and label_names is not None:
        if value not in label_names:
            raise BadRecordError(f"{fmt} record: unknown label {value!r} (known: {label_names})")
        return list(label_names).index(value)
    raise BadRecordError(f"{fmt} record: label {value!r} needs label_names to map it to a class")


def encode_record(
    record: dict,
    fmt: str,
    tokenizer,
    *,
    max_len: int,
    template: str | None = None,
    train_on_prompt: bool = False,
    truncation: str = "prompt",
    label_names: Sequence[str] | None = None,
):
    """Encodes one record (see the module docstring for formats and fields).

    Args:
      record: the record dict.
      fmt: one of FORMATS.
      tokenizer: a fft Tokenizer.
      max_len: the longest example allowed (usually seq_len).
      template: instruction template string or jinja chat template (see module docstring).
      train_on_prompt: put loss on prompt tokens too.
      truncation: 'prompt' | 'drop' | 'split' (text only).
      label_names: class names, for string labels of classification records.

    Returns:
      A dict with 'tokens' and 'loss_mask' (lists of ints), or the format's fields (chosen_*,
      rejected_*, cand_*, ranks, label), plus 'truncated': True when cut; None when dropped;
      a list of such dicts for text with truncation='split'.

    Raises:
      BadRecordError naming the missing or malformed field.
    """
    if not isinstance(record, dict):
        raise BadRecordError(f"record is a {type(record).__name__}, expected an object")
    if fmt not in FORMATS:
        raise FFTError(f"unknown data format {fmt!r}; choose one of {FORMATS}")
    if truncation not in TRUNCATION or (truncation == "split" and fmt != "text"):
        raise FFTError(
            f"truncation must be 'prompt' or 'drop' (or 'split' for text), got {truncation!r}"
        )
    finish = functools.partial(
        _finish,
        max_len=max_len,
        truncation="prompt" if truncation == "split" else truncation,
        bos_id=tokenizer.bos_id,
        train_on_prompt=train_on_prompt,
    )
    bos, eos = _specials(tokenizer)

    if fmt == "text":
        spans = [(bos, True), (_field(record, "text", fmt), True), (eos, True)]
        tokens, mask, _ = _encode_spans(tokenizer, spans)
        if truncation == "split" and len(tokens) > max_len:
            return [
                finish(tokens[i : i + max_len], mask[i : i + max_len], 0)
                for i in range(0, len(tokens), max_len)
                if len(tokens[i : i + max_len]) > 1  # a lone token has no target
            ]
        return finish(tokens, mask, 0)

    if fmt == "instruction":
        spans = [(bos, False)] + instruction_spans(
            _field(record, "instruction", fmt),
            _optional_str(record, "input", fmt),
            _field(record, "output", fmt),
            template,
        )
        return finish(*_encode_spans(tokenizer, spans + [(eos, True)]))

    if fmt == "chat":
        tokens, mask, _ = _encode_spans(
            tokenizer, chat_spans(_messages(record, fmt), tokenizer, template)
        )
        if not any(mask):
            raise BadRecordError("chat record has no assistant turn to train on")
        # Protect the last assistant turn and what leads to it; earlier turns are cut first.
        last_target = max(i for i, m in enumerate(mask) if m)
        start = last_target
        while start > 0 and mask[start - 1]:
            start -= 1
        return finish(tokens, mask, start)

    if fmt == "classification":
        if "label" in record:
            label = _label(record["label"], label_names, fmt)
        elif "labels" in record:
            if label_names is None:
                raise BadRecordError("classification record with 'labels' needs label_names")
            label = [0.0] * len(label_names)
            for value in _field(record, "labels", fmt, (list,)):
                if not isinstance(value, int | str) or isinstance(value, bool):
                    raise BadRecordError(
                        f"{fmt} record: 'labels' entries must be class names or indices, got "
                        f"{value!r}"
                    )
                label[_label(value, label_names, fmt)] = 1.0
        else:
            raise BadRecordError(
                f"classification record is missing field 'label' (has {sorted(record)})"
            )
        ids = tokenizer.encode(_unicode(_field(record, "text", fmt)))
        room = max_len - len(bos) - len(eos)
        out = {}
        if len(ids) > room:
            if truncation == "drop":
                return None
            ids, out["truncated"] = ids[:room], True
        tokens = bos + ids + eos
        return out | {"tokens": tokens, "loss_mask": [0] * len(tokens), "label": label}

    # prompt_completion, preference, ranking: a prompt and one or more responses.
    prompt = _prompt_spans(record, fmt, tokenizer, template)
    if fmt == "prompt_completion":
        response = _field(record, "completion", fmt)
        return finish(*_encode_spans(tokenizer, prompt + [(response, True), (eos, True)]))
    if fmt == "preference":
        names = ("chosen", "rejected")
        responses = [_field(record, n, fmt) for n in names]
    else:
        responses = _field(record, "responses", fmt, (list,))
        ranks = _field(record, "ranking", fmt, (list,))
        if len(ranks) != len(responses) or not responses:
            raise BadRecordError(
                f"ranking record: 'ranking' has {len(ranks)} entries for {len(responses)} responses"
            )
        if not all(
            isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 0 for r in ranks
        ):
            raise BadRecordError(
                f"ranking record: 'ranking' must hold ints >= 0, got {ranks!r:.80}"
            )
    encoded = []
    for response in responses:
        if not isinstance(response, str):
            raise BadRecordError(
                f"{fmt} record: responses must be strings, got {type(response).__name__}"
            )
        ex = finish(*_encode_spans(tokenizer, prompt + [(response, True), (eos, True)]))
        if ex is None:
            return None
        encoded.append(ex)
    truncated = {"truncated": True} if any(e.get("truncated") for e in encoded) else {}
    if fmt == "preference":
        out = {}
        for name, ex in zip(names, encoded, strict=True):
            out[f"{name}_tokens"], out[f"{name}_loss_mask"] = ex["tokens"], ex["loss_mask"]
        return out | truncated
    return {
        "cand_tokens": [e["tokens"] for e in encoded],
        "cand_loss_mask": [e["loss_mask"] for e in encoded],
        "ranks": [int(r) for r in ranks],
    } | truncated
