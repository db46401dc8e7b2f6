"""Caption tokens stored beside the teacher's text embeddings, reused by text students with the same tokenizer.

open_clip's `SimpleTokenizer` is pure Python (ftfy, regex, BPE): about 30 µs a caption, most of the text loader's
time. The build tokenises every caption anyway (the teacher's text tower needs the tokens), so it stores them
(`tokens` in caption blocks, `caption_tokens` in image shards) and records what produced them in
`attrs["build"]["tokens"]`. A student whose tokenizer provably gives the same tokens reads them instead:

    ctx = reusable_context(cache.attrs["build"].get("tokens"), student_tokenizer)   # None: tokenise as usual
    batch_tokens = fit(stored_rows, ctx, eot=...)                                   # == student_tokenizer(texts)

"Provably" is narrow on purpose: only open_clip's `SimpleTokenizer` itself (not a subclass), without a reduction
strategy, with the same vocabulary size and the same tokens for a probe set of texts that exercises its cleaning,
case, unicode and truncation, at a context length no longer than the stored one. Anything else is tokenised.
"""

from __future__ import annotations

import hashlib

import numpy as np
from open_clip.tokenizer import SimpleTokenizer

# Texts whose tokens tell tokenizers apart: case and cleaning ("lower" vs "whitespace" vs "canonicalize"), html
# entities and mojibake (ftfy), punctuation, digits, non-Latin scripts, a literal special token, and a text longer
# than any context (truncation).
PROBE = (
    "A photo of a Dog.", "two  cats\tsleeping on a sofa!!", "&amp; caf\u00e9 na\u00efve \u00c3\u00a9t\u00e9",
    "\u72ac\u3068\u732b \u0441\u043e\u0431\u0430\u043a\u0430 \u0643\u0644\u0628", "route 66, 1999-12-31; 3.14%",
    "it's <end_of_text> here", "", " ".join(f"word{i} and more" for i in range(120)),
)


def _plain(tokenizer) -> bool:
    return type(tokenizer) is SimpleTokenizer and getattr(tokenizer, "reduction_fn", None) is None


def _probe_digest(tokenizer, context_length: int) -> str:
    tokens = np.asarray(tokenizer(list(PROBE), context_length=context_length), dtype="<i8")
    return "sha256:" + hashlib.sha256(tokens.tobytes()).hexdigest()[:32]


def describe(tokenizer) -> dict | None:
    """What a cache records about the teacher's tokenizer when its tokens can be stored for reuse; None when they
    cannot (another tokenizer class, a reduction strategy): the cache then holds no token arrays."""
    if not _plain(tokenizer):
        return None
    ctx, vocab = int(tokenizer.context_length), int(tokenizer.vocab_size)
    return {"class": "open_clip.tokenizer.SimpleTokenizer", "context_length": ctx, "vocab_size": vocab,
            "eot": int(tokenizer.eot_token_id), "dtype": "uint16" if vocab <= 2**16 else "int32",
            "probe": _probe_digest(tokenizer, ctx)}


def reusable_context(recorded: dict | None, tokenizer) -> int | None:
    """The student's context length when the cache's stored tokens, cut with `fit`, are exactly what `tokenizer`
    gives; None when they may not be (then the loader tokenises)."""
    if not recorded or not _plain(tokenizer):
        return None
    ctx = int(tokenizer.context_length)
    if (ctx > recorded["context_length"] or int(tokenizer.vocab_size) != recorded["vocab_size"]
            or int(tokenizer.eot_token_id) != recorded["eot"]):
        return None
    if _probe_digest(tokenizer, recorded["context_length"]) != recorded["probe"]:
        return None
    return ctx


def store(tokens, recorded: dict) -> np.ndarray:
    """Tokenizer output [N, C] (int64) in the stored dtype."""
    return np.asarray(tokens).astype(recorded["dtype"])


def fit(rows: np.ndarray, context_length: int, *, eot: int) -> np.ndarray:
    """Stored rows [N, C] -> int64 [N, context_length <= C], as SimpleTokenizer truncates: a sequence (start token,
    text, end token) longer than the context is cut to it and its last token replaced by the end token. A stored
    row's sequence ends at its last end token (padding is 0, and a literal end token in the text comes before it)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = rows[:, :context_length].copy()
    if context_length < rows.shape[1]:
        is_eot = rows == eot
        length = rows.shape[1] - np.argmax(is_eot[:, ::-1], axis=1)  # index of the last end token, + 1
        out[(length > context_length) & is_eot.any(axis=1), context_length - 1] = eot
    return out
