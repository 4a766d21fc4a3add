"""What each category decodes and scores for one model's tokenizer: text chunked llama-perplexity's
way, or chat transcripts rendered with the model's template (``chat.py``); and the prompts that
generation divergence decodes from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .chat import ChatError, ChatTemplate, generation_prompts, label_positions, render_transcript, template_source
from .corpus import Corpus, CorpusError, chunk_tokens
from .engine.protocol import ModelFacts, TokenPieces
from .sequences import Sequences

#: prompts per category when a threshold gates a generation metric and --kv-gen did not say
DEFAULT_GEN_PROMPTS = 16


@dataclass(frozen=True)
class CategoryPlan:
    """One category: the sequences scored, and every prompt generation could start from."""

    sequences: Sequences
    prompts: Sequences

    @property
    def rows_per_block(self) -> int:
        """Scored rows per block of the gate bounds: a chunk's (text), the mean per transcript (chat:
        batch means over consecutive scored tokens, transcripts kept whole in order)."""
        per = self.sequences.rows_per_sequence()
        return max(1, round(float(per.mean()))) if per.size else 1

    def pick_prompts(self, n: int) -> Sequences:
        """``n`` prompts spread evenly over the category (all when it has fewer)."""
        k = len(self.prompts)
        idx = np.unique(np.linspace(0, k - 1, min(n, k)).round().astype(int)) if k else np.zeros(0, int)
        return Sequences(self.prompts.tokens[idx], self.prompts.lengths[idx], self.prompts.spans[idx])


def text_plan(tokens: np.ndarray, n_ctx: int, max_chunks: int | None, category: str) -> CategoryPlan:
    chunks = chunk_tokens(tokens, n_ctx, max_chunks, category)
    half = n_ctx // 2
    prompts = Sequences(np.ascontiguousarray(chunks[:, :half]), np.full(len(chunks), half, np.int32),
                        np.zeros((len(chunks), half), np.uint8))
    return CategoryPlan(Sequences.halves(chunks), prompts)


def chat_plans(corpus: Corpus, facts: ModelFacts, model: str, tokenize: Callable[[str], TokenPieces],
               max_transcripts: int | None, template_name: str | None = None) -> dict[str, CategoryPlan]:
    """Every chat category rendered, tokenized and labelled; errors name the record. The template is
    ``template_name`` (``--kv-chat-template``, a registry entry's) where given, else the GGUF's."""
    try:
        source = template_source(template_name) if template_name else facts.chat_template
        template = ChatTemplate(source, facts.bos_token, facts.eos_token, model)
    except ChatError as e:
        raise CorpusError(str(e)) from e
    plans = {}
    for cat, records in corpus.chats.items():
        seqs, labels, prompts = [], [], []
        for t in records[:max_transcripts]:
            try:
                rendered = render_transcript(t, template)
            except ChatError as e:
                raise CorpusError(str(e)) from e
            pieces = tokenize(rendered.text)
            if pieces.tokens.size > facts.n_ctx_train:
                raise CorpusError(f"{t.source}: the transcript is {pieces.tokens.size} tokens, longer than {model}'s "
                                  f"training context of {facts.n_ctx_train}")
            span = label_positions(rendered, pieces.tokens, pieces.starts, t.score)
            if not span.any():
                raise CorpusError(f"{t.source}: no token of the transcript is scored (the assistant's turns "
                                  "rendered to nothing)")
            seqs.append(pieces.tokens)
            labels.append(span)
            prompts += [pieces.tokens[:k] for k in generation_prompts(rendered, pieces.starts) if k > 0]
        plans[cat] = CategoryPlan(Sequences.of(seqs, labels),
                                  Sequences.of(prompts, [np.zeros(p.size, np.uint8) for p in prompts]))
    return plans
