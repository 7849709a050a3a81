"""SFT data as users have it: chat rows (``{"messages": [{"role", "content"}, ...]}``, ESFT's released format) and
prompt/completion rows (``{"prompt", "completion"}``), with the loss on the assistant / completion tokens only.

Two stages, because the tokenizer is built after the texts are read (it may even be trained on them):

- reading (:func:`parse_sft_record`, called by :mod:`desmoe.data.sources` for every row): a row in either form
  is checked (clear :class:`DataSourceError` naming the file, the row and the field) and becomes an
  :class:`SFTDoc`, a ``str`` (its built-in ChatML rendering, or prompt + completion: what the tokenizer trains on
  and the splits hash) that keeps the turns;
- tokenizing (:func:`render_sft`, called by :func:`desmoe.data.tokenize_domains`): an :class:`SFTDoc` becomes a
  :class:`SupervisedDoc`, the token ids plus one supervision flag per token.

Chat rows are rendered with the tokenizer's own chat template when it has one, else with :data:`CHAT_TEMPLATE`
(ChatML-style, the same as :mod:`desmoe.train.trl_trainer`'s). An assistant turn's supervised tokens are its
content and the template's end-of-turn text (found as the difference between the conversation rendered up to the
turn with the generation prompt and up to the end of the turn, from the content on; trailing whitespace is left
out; a token that straddles the boundary, e.g. a BPE token holding the space before the content, is a target). A string
prompt/completion row is ``prompt + completion`` (no template, as in TRL), its completion and the EOS the packer
appends supervised. A conversational prompt/completion row (both lists of messages) is a chat whose completion
turns are supervised. The first token of every SFT document is never supervised, so the loss never crosses from
one packed document into the next. Chat templates run in transformers' sandboxed Jinja environment.
"""
from __future__ import annotations

from .builtin import DataSourceError

# ChatML-style; the {% generation %} markers are what TRL's assistant_only_loss reads (desmoe finds the assistant
# spans by rendering prefixes, so a template without the markers works as well)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


class SFTDoc(str):
    """One SFT row, read: a ``str`` (the built-in rendering, or prompt + completion) that keeps its parts.

    ``turns``: ``((role, content, trained), ...)`` for a chat (``trained``: the turn is supervised);
    ``prompt`` / ``completion``: the strings of a prompt/completion row (``turns`` is then None)."""

    turns: tuple | None = None
    prompt: str | None = None
    completion: str | None = None
    where: str = "an SFT row"  # the file and row it came from, for errors

    @classmethod
    def chat(cls, turns) -> "SFTDoc":
        turns = tuple(turns)
        doc = cls("".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c, _ in turns))
        doc.turns = turns
        return doc

    @classmethod
    def prompt_completion(cls, prompt: str, completion: str) -> "SFTDoc":
        doc = cls(prompt + completion)
        doc.prompt, doc.completion = prompt, completion
        return doc

    def __reduce__(self):  # a plain value again when pickled (e.g. to a DataLoader worker)
        return (_rebuild, (str(self), self.turns, self.prompt, self.completion, self.where))


def _rebuild(s, turns, prompt, completion, where):
    doc = SFTDoc(s)
    doc.turns, doc.prompt, doc.completion, doc.where = turns, prompt, completion, where
    return doc


class SupervisedDoc(list):
    """Token ids (a ``list`` of int) of one SFT document with ``mask``: bytes, 1 where the token is a target;
    ``eos_target``: whether the EOS the packer appends after it is a target (prompt/completion rows)."""

    __slots__ = ("mask", "eos_target")

    def __init__(self, ids, mask, eos_target: bool = False):
        super().__init__(ids)
        self.mask = bytes(mask)
        if len(self.mask) != len(self):
            raise ValueError(f"SupervisedDoc: {len(self)} tokens but {len(self.mask)} mask entries")
        self.eos_target = bool(eos_target)


def is_sft_record(record: dict, text_field: str = "text") -> bool:
    """Whether a row is in chat or prompt/completion form (a row with ``text_field`` stays raw text, unless the
    text field is ``messages`` itself)."""
    if text_field in record and record[text_field] is not None and text_field != "messages":
        return False
    return record.get("messages") is not None or ("prompt" in record and "completion" in record)


def _messages(msgs, where: str, field: str, trained_role: str | None) -> list[tuple]:
    if not isinstance(msgs, list) or not msgs:
        raise DataSourceError(f"{where}: {field!r} must be a non-empty list of {{'role', 'content'}} messages, "
                              f"got {type(msgs).__name__ if not isinstance(msgs, list) else 'an empty list'}")
    out = []
    for j, m in enumerate(msgs):
        f = f"{field}[{j}]"
        if not isinstance(m, dict):
            raise DataSourceError(f"{where}: {f} is a {type(m).__name__}, expected an object with 'role' and "
                                  f"'content'")
        for key in ("role", "content"):
            if key not in m:
                raise DataSourceError(f"{where}: {f} has no {key!r} (keys: {sorted(m)})")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataSourceError(f"{where}: {f}.role is {role!r}, expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataSourceError(f"{where}: {f}.content is a {type(content).__name__}, expected a string")
        if role == "assistant" and not content.strip():
            raise DataSourceError(f"{where}: {f} is an empty assistant turn (nothing to train on)")
        out.append((role, content, role == "assistant" if trained_role is None else trained_role == "all"))
    return out


def parse_sft_record(record: dict, where: str) -> SFTDoc:
    """The :class:`SFTDoc` of a chat or prompt/completion row; ``where`` names it in errors ("file: line 3")."""
    doc = _parse(record, where)
    doc.where = where
    return doc


def _parse(record: dict, where: str) -> SFTDoc:
    if record.get("messages") is not None:
        turns = _messages(record["messages"], where, "messages", None)
        if not any(t for _, _, t in turns):
            raise DataSourceError(f"{where}: 'messages' has no assistant turn (roles: {[r for r, _, _ in turns]}); "
                                  f"the loss is on the assistant turns only")
        return SFTDoc.chat(turns)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion (TRL's form)
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise DataSourceError(f"{where}: 'prompt' and 'completion' must both be strings or both be lists of "
                                  f"messages, got {type(prompt).__name__} and {type(completion).__name__}")
        p = _messages(prompt, where, "prompt", "none")
        c = _messages(completion, where, "completion", "all")
        if not any(r == "assistant" for r, _, _ in c):
            raise DataSourceError(f"{where}: 'completion' has no assistant message")
        return SFTDoc.chat(p + c)
    for key, v in (("prompt", prompt), ("completion", completion)):
        if not isinstance(v, str):
            raise DataSourceError(f"{where}: {key!r} is a {type(v).__name__}, expected a string (or a list of "
                                  f"messages)")
    if not completion.strip():
        raise DataSourceError(f"{where}: 'completion' is empty (nothing to train on)")
    return SFTDoc.prompt_completion(prompt, completion)


# --- tokenizing ----------------------------------------------------------------------------------------------------
def _encode_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and a 0/1 flag per token: 1 where the token overlaps a character span in ``spans``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = list(enc["input_ids"]), enc["offset_mapping"]
        mask = [int(any(s < b and a < e for a, b in spans)) if e > s else 0 for s, e in offs]
        return ids, mask
    # slow tokenizer (no offsets): tokenize the pieces between span boundaries one by one
    cuts = sorted({0, len(text), *(x for ab in spans for x in ab)})
    ids, mask = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(any(s <= a and b <= e for s, e in spans))] * len(piece)
    return ids, mask


def _chat_spans(tokenizer, doc: SFTDoc, template: str | None) -> tuple[str, list[tuple[int, int]]]:
    msgs = [{"role": r, "content": c} for r, c, _ in doc.turns]

    def render(upto: int, gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs[:upto], chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)

    try:
        full = render(len(msgs), False)
    except Exception as e:  # a template that refuses the conversation (jinja's raise_exception, ...)
        raise DataSourceError(f"{doc.where}: the tokenizer's chat template cannot render this conversation "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(full, str):
        raise DataSourceError(f"{doc.where}: the tokenizer's chat template rendered a {type(full).__name__}, "
                              f"expected text")
    spans, pos = [], 0
    for i, (role, content, trained) in enumerate(doc.turns):
        if not trained:
            continue
        try:  # a prefix may not render (a template that needs a user turn first): then find the content
            before, after = render(i, True), render(i + 1, False)
        except Exception:
            before = after = None
        if before is not None and full.startswith(after) and after.startswith(before):
            a, b = len(before), len(after)
            seg = full[a:b]
            k = seg.find(content)
            end = a + len(seg.rstrip())
            if k >= 0:  # start at the content (not at text the template puts before it); keep its own whitespace
                a, end = a + k, max(end, a + k + len(content))
        else:  # the template rewrites earlier turns (e.g. drops reasoning): find the content itself
            a = full.find(content, pos)
            if a < 0:
                raise DataSourceError(f"{doc.where}: the tokenizer's chat template does not reproduce turn {i}'s "
                                      f"content; cannot tell which tokens to supervise")
            end = a + len(content)
        spans.append((a, end))
        pos = end
    return full, spans


def render_sft(tokenizer, doc: SFTDoc) -> SupervisedDoc:
    """Token ids and supervision mask of one SFT document (see the module docstring)."""
    if doc.turns is not None:
        # the tokenizer's own template(s) as it picks them; the built-in one for a tokenizer without any
        template = None if getattr(tokenizer, "chat_template", None) else CHAT_TEMPLATE
        text, spans = _chat_spans(tokenizer, doc, template)
        eos_target = False  # the template's end-of-turn text is the stop signal
    else:
        text, spans = str(doc), [(len(doc.prompt), len(doc))]
        eos_target = True  # as TRL: the completion ends with EOS
    ids, mask = _encode_spans(tokenizer, text, spans)
    if mask:
        mask[0] = 0  # predicted from the previous packed document: never a target
    return SupervisedDoc(ids, mask, eos_target)


def tokenize_texts(tokenizer, texts) -> list[list[int]]:
    """Token ids (no special tokens) of every text; :class:`SFTDoc` items become :class:`SupervisedDoc`. A list
    without SFT documents is tokenized in one call, exactly as before SFT support."""
    texts = list(texts)
    if not texts:
        return []
    sft = [i for i, t in enumerate(texts) if isinstance(t, SFTDoc)]
    if not sft:
        return list(tokenizer(texts, add_special_tokens=False)["input_ids"])
    out: list = [None] * len(texts)
    plain = [i for i, t in enumerate(texts) if not isinstance(t, SFTDoc)]
    if plain:
        for i, ids in zip(plain, tokenizer([texts[i] for i in plain], add_special_tokens=False)["input_ids"]):
            out[i] = ids
    for i in sft:
        out[i] = render_sft(tokenizer, texts[i])
    return out
