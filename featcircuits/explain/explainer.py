"""Feature explanations from a language model behind any OpenAI-compatible chat endpoint (vLLM, ollama, hosted),
and their detection score with the same model as the scorer. Optional and off by default: the offline labels
(:mod:`.labels`) are what every feature has; an explainer that is down, slow or answers garbage leaves them in
place and says why.

The client speaks ``POST {url}/chat/completions`` with ``{"model", "messages", "temperature"}`` and reads
``choices[0].message.content``; the key, if the endpoint needs one, comes from an environment variable
(``OPENAI_API_KEY`` by default), never from the command line.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ChatClient", "ExplainerError", "explain_features", "llm_detection_score", "llm_fuzzing_score",
           "highlighted_text", "held_out_texts", "llm_score_features"]


class ExplainerError(RuntimeError):
    """The endpoint could not be reached, timed out, or answered something that is not a chat completion."""


@dataclass
class ChatClient:
    """An OpenAI-compatible chat endpoint: ``url`` is the API base (``http://localhost:8000/v1``)."""

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 30.0

    def complete(self, prompt: str, system: str = "You explain neural network features tersely.") -> str:
        body = json.dumps({"model": self.model, "temperature": 0.0,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]})
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", data=body.encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                data = json.loads(response.read().decode("utf-8", errors="replace"))
        except urllib.error.HTTPError as err:
            raise ExplainerError(f"{self.url} answered HTTP {err.code} ({err.reason}).") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ExplainerError(f"{self.url} could not be reached or timed out after {self.timeout:g} s ({reason}).") from None
        except json.JSONDecodeError:
            raise ExplainerError(f"{self.url} answered something that is not JSON.") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ExplainerError(f"{self.url} answered JSON without choices[0].message.content.") from None
        if not isinstance(content, str) or not content.strip():
            raise ExplainerError(f"{self.url} answered an empty completion.")
        return content.strip()


def _context_text(context: Mapping[str, Any]) -> str:
    """A context with its activating token marked ``<<token>>``."""
    tokens = [str(t).replace("▁", " ").replace("Ġ", " ") for t in context.get("tokens", [])]
    focus = int(context.get("focus", -1))
    if 0 <= focus < len(tokens):
        tokens[focus] = f"<<{tokens[focus]}>>"
    return "".join(tokens)


def _explain_prompt(entry: Mapping[str, Any], n_contexts: int) -> str:
    contexts = [_context_text(c) for c in (entry.get("top_contexts") or [])[:n_contexts]]
    promoted = [str(pair[0]) for pair in (entry.get("top_logits") or [])[:8]]
    lines = ["Texts where a feature of a language model activates; the most active token is marked <<like this>>:"]
    lines += [f"{i + 1}. {text}" for i, text in enumerate(contexts)]
    if promoted:
        lines.append(f"Tokens the feature makes more likely: {', '.join(repr(t) for t in promoted)}")
    lines.append("Answer with one short phrase (at most 8 words) saying what the feature detects. No preamble.")
    return "\n".join(lines)


_GARBAGE = re.compile(r"^[\W_]*$")


def _first_line(answer: str, limit: int = 120) -> str:
    """The answer's first line, without quotes wrapped around the whole of it."""
    line = answer.strip().splitlines()[0].strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()
    return line[:limit]


def explain_features(dashboards: Any, client: ChatClient, keys: Sequence[str] | None = None,
                     n_contexts: int = 8) -> dict[str, str]:
    """Ask ``client`` for an explanation of each feature in ``keys`` (default: all); stored as
    ``entry["explanation"]``, with ``entry["explanation_source"]`` saying where it came from. When the endpoint
    fails or answers garbage, the offline label stands (computed if missing) and the reason is recorded; the
    first failure stops further requests (an endpoint that is down stays down for the rest of the run)."""
    from .labels import label_entry

    explanations, failure = {}, None
    for key in keys if keys is not None else list(dashboards.features):
        entry = dashboards.features[key]
        entry.setdefault("label", label_entry(entry))
        text = None
        if failure is None:
            try:
                text = _first_line(client.complete(_explain_prompt(entry, n_contexts)))
                if _GARBAGE.match(text):
                    raise ExplainerError(f"{client.url} answered no words for feature {key}.")
            except ExplainerError as err:
                failure, text = str(err), None
        if text is None:
            entry["explanation"] = entry["label"]
            entry["explanation_source"] = f"offline label (explainer failed: {failure})"
        else:
            entry["explanation"] = text
            entry["explanation_source"] = f"{client.model} at {client.url}"
        explanations[key] = entry["explanation"]
    return explanations


def _numbered_choice(client: ChatClient, question: str, positives: Sequence[str], negatives: Sequence[str],
                     seed: int) -> float:
    """Balanced accuracy of ``client`` picking the ``positives`` out of a shuffled, numbered list of both."""
    items = [(text, True) for text in positives] + [(text, False) for text in negatives]
    random.Random(seed).shuffle(items)
    listing = "\n".join(f"{i + 1}. {text}" for i, (text, _) in enumerate(items))
    answer = client.complete(f"{question}\n{listing}\nAnswer with the numbers of those texts, comma-separated, or 'none'.")
    if answer.strip().lower().startswith("none"):
        chosen: set[int] = set()
    else:
        numbers = re.findall(r"\d+", answer)
        if not numbers:
            raise ExplainerError(f"The scorer answered {answer[:60]!r}, which lists no context numbers.")
        chosen = {int(n) - 1 for n in numbers if 0 < int(n) <= len(items)}
    true_positive = sum(1 for i, (_, yes) in enumerate(items) if yes and i in chosen) / len(positives)
    true_negative = sum(1 for i, (_, yes) in enumerate(items) if not yes and i not in chosen) / len(negatives)
    return 0.5 * (true_positive + true_negative)


def llm_detection_score(client: ChatClient, explanation: str, active: Sequence[str], inactive: Sequence[str],
                        seed: int = 0) -> float:
    """Balanced accuracy of ``client`` telling ``active`` held-out contexts from ``inactive`` ones, given only
    the explanation (delphi's detection scoring). The contexts are shuffled and numbered; the scorer answers
    with the numbers of the contexts it thinks activate. Raises :class:`ExplainerError` on a garbled answer."""
    if not active or not inactive:
        raise ValueError("Detection needs at least one activating and one non-activating context.")
    return _numbered_choice(client, f"A language model feature is described as: {explanation}\n"
                            "Which of these texts make it activate?", active, inactive, seed)


def llm_fuzzing_score(client: ChatClient, explanation: str, correct: Sequence[str], wrong: Sequence[str],
                      seed: int = 0) -> float:
    """Balanced accuracy of ``client`` telling activating contexts with the feature's own tokens marked
    ``<<like this>>`` (``correct``) from ones with other tokens marked (``wrong``), given the explanation
    (delphi's fuzzing scoring; examples from :func:`featcircuits.explain.fuzzing.fuzzing_examples`)."""
    if not correct or not wrong:
        raise ValueError("Fuzzing needs at least one correctly and one wrongly highlighted context.")
    return _numbered_choice(client, f"A language model feature is described as: {explanation}\n"
                            "In each text some tokens are marked <<like this>>. In which texts are the marked tokens "
                            "the ones the description says the feature fires on?", correct, wrong, seed)


def highlighted_text(pieces: Sequence[str], highlight: Sequence[bool]) -> str:
    """A context as text with its highlighted tokens marked ``<<token>>`` (what the scorer reads for fuzzing)."""
    from .labels import readable_piece

    return "".join(f"<<{readable_piece(p)}>>" if mark else readable_piece(p)
                   for p, mark in zip(pieces, highlight, strict=True))


def held_out_texts(tokens: Any, acts: Any, pieces: Sequence[str], special: Sequence[int] = (), n: int = 5,
                   seed: int = 0) -> dict[str, list[str]]:
    """Texts for the language-model scorer from held-out ``tokens [n_seq, seq_len]`` and one feature's ``acts``
    there: ``active``/``inactive`` rows (detection) and the first ``n`` activating rows with correct and wrong
    highlights (fuzzing), at most ``n`` of each. ``pieces``: every token id's string."""
    from .fuzzing import fuzzing_examples

    ids: list[list[int]] = tokens.tolist()
    fired = ((acts > 0) & ~_isin(tokens, special)).any(1)
    active, inactive = fired.nonzero().squeeze(1).tolist()[:n], (~fired).nonzero().squeeze(1).tolist()[:n]
    examples = fuzzing_examples(tokens, acts, special, seed=seed, max_rows=n)
    plain = [False] * tokens.shape[1]

    def text(row: int, marks: Sequence[bool]) -> str:
        return highlighted_text([str(pieces[t]) for t in ids[row]], marks)

    return {"active": [text(r, plain) for r in active], "inactive": [text(r, plain) for r in inactive],
            "correct": [text(int(r), m) for r, m in zip(examples.rows, examples.correct.tolist(), strict=True)],
            "wrong": [text(int(r), m) for r, m in zip(examples.rows, examples.wrong.tolist(), strict=True)]}


def _isin(tokens: Any, ids: Sequence[int]) -> Any:
    import torch

    return torch.isin(tokens, torch.tensor(list(ids), dtype=tokens.dtype, device=tokens.device))


def llm_score_features(dashboards: Any, client: ChatClient, texts: Mapping[str, Mapping[str, Sequence[str]]],
                       seed: int = 0) -> tuple[dict[str, dict[str, float]], str | None]:
    """Detection and fuzzing scores by ``client`` of every entry in ``texts`` (:func:`held_out_texts` per
    dashboard key) that the explainer explained: stored as ``entry["llm_detection"]`` and ``entry["llm_fuzzing"]``
    (with ``entry["llm_scorer"]``). Returns the scores and, when the endpoint failed, why (the first failure
    stops further requests; the offline scores stand)."""
    scores: dict[str, dict[str, float]] = {}
    for key, sets in texts.items():
        entry = dashboards.features[key]
        if str(entry.get("explanation_source", "")).startswith("offline"):
            continue
        pair = {}
        try:
            if sets["active"] and sets["inactive"]:
                pair["llm_detection"] = llm_detection_score(client, entry["explanation"], sets["active"],
                                                            sets["inactive"], seed)
            if sets["correct"] and sets["wrong"]:
                pair["llm_fuzzing"] = llm_fuzzing_score(client, entry["explanation"], sets["correct"], sets["wrong"],
                                                        seed)
        except ExplainerError as err:
            return scores, str(err)
        entry.update(pair, llm_scorer=f"{client.model} at {client.url}")
        scores[key] = pair
    return scores, None
