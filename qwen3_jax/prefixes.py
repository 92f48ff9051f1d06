"""Which token ids the texts of a call share at their start, and the keys and values of those prefixes,
computed once and kept.

Qwen3-Embedding's queries begin with the same instruction, the reranker's documents with the same
system prompt and query: attention is causal, so the hidden states of a shared prefix do not depend on
what follows it, and the texts can attend to one copy of its keys and values (attention/prefix.py) while
only their own tokens are computed. Sharing is decided on token ids alone (every text is tokenized as
it always is): a text shares the leading ids it has in common with a known prefix or with other texts,
so a prompt that tokenizes differently where the text joins it shares everything before that token.

Known prefixes are registered (the prompts of `config_sentence_transformers.json`, a server's default
instruction, the reranker's system prompt: `register`) and kept for the model's life; prefixes found
among a call's texts, or shared with a recent call's (an instruction seen again), are kept while the
memory they take stays under a bound, the least recently used dropped first.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from qwen3_jax.attention.prefix import PrefixTable
from qwen3_jax.packing import coarse_length

MIN_SHARED = 8              # the fewest leading ids worth sharing
TABLE_LENGTHS = (64, 128, 256, 512)   # a server's prefix tables (fixed shapes, compiled ahead)
TABLE_LIMIT = TABLE_LENGTHS[-1]       # the most prefix tokens one call's texts attend to
RECENT_TEXTS = 64           # texts of earlier calls a new text is compared with (an instruction seen again)
RECENT_IDS = 256            # the leading ids kept of each
CACHE_BYTES = 256 << 20     # the keys and values of found prefixes kept between calls


@dataclasses.dataclass
class Prefix:
    """A prefix's token ids and, once computed, each layer's keys and values [L, P, K, H] (kept on the host:
    a batch's table is assembled there and sent once, with no device program per prefix length)."""

    ids: tuple[int, ...]
    keys: np.ndarray | None = None
    values: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


@dataclasses.dataclass
class Sharing:
    """A call's texts split into the prefixes they share and their own ids.

    `own[i]`: text i's ids after its shared part; `entry[i]`: the index + 1 into `prefixes` of the
    prefix it continues (0: none); `offset[i]`: how many of that prefix's ids it shares (its own
    positions start there)."""

    own: list[Sequence[int]]
    entry: list[int]
    offset: list[int]
    prefixes: list[Prefix]

    @property
    def table_tokens(self) -> int:
        return sum(len(p.ids) for p in self.prefixes)

    def table(self, length: int | None = None) -> PrefixTable | None:
        """The prefix table of these prefixes (numpy), padded to `length` tokens (default: the coarse
        length of their tokens), its `text_entry` and `offset` left for each batch to fill (None: no prefix)."""
        if not self.prefixes:
            return None
        length = length or table_length(self.table_tokens)
        entry = np.zeros(length, np.int32)
        position = np.zeros(length, np.int32)
        start = 0
        for index, prefix in enumerate(self.prefixes):
            entry[start:start + len(prefix.ids)] = index + 1
            position[start:start + len(prefix.ids)] = np.arange(len(prefix.ids))
            start += len(prefix.ids)
        keys, values = (_padded(np.concatenate([getattr(p, name) for p in self.prefixes], axis=1), length)
                        for name in ("keys", "values"))
        return PrefixTable(keys, values, entry, position, None, None)


def unshared(texts: Sequence[Sequence[int]]) -> Sharing:
    """Every text its own: nothing shared."""
    return Sharing(list(texts), [0] * len(texts), [0] * len(texts), [])


def table_length(tokens: int, fixed: bool = False) -> int:
    """The table length that holds `tokens` prefix tokens: a coarse length (packing.coarse_length), or
    with `fixed` one of the server's TABLE_LENGTHS."""
    return next(n for n in TABLE_LENGTHS if n >= tokens) if fixed else coarse_length(tokens)


def _padded(x: np.ndarray, length: int) -> np.ndarray:
    """[L, P, ...] padded with zeros to [L, length, ...]."""
    return np.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` have in common."""
    return len(os.path.commonprefix([list(a), list(b)]))


def shared_groups(texts: Sequence[Sequence[int]], current: int | None = None) -> list[tuple[int, list[int]]]:
    """Groups of texts (indices) with the prefix length they share, at least MIN_SHARED ids and two
    texts a group, chosen to save the most tokens. The first `current` texts (default: all) are the ones
    being computed, the rest remembered from earlier calls: a group of n current texts sharing p ids
    saves (n - 1) p, plus p if remembered texts share it too (it is computed once and kept for the next
    call instead of with a text); a group splits where its texts' common ids end if its parts save more."""
    current = len(texts) if current is None else current
    order = sorted(range(len(texts)), key=lambda i: tuple(texts[i][:RECENT_IDS]))
    common = [common_length(texts[a], texts[b]) for a, b in zip(order, order[1:])]

    def best(lo: int, hi: int) -> tuple[int, list[tuple[int, list[int]]]]:
        """The most tokens saved by texts order[lo:hi + 1] and their groups (common[lo:hi] between them)."""
        if hi <= lo:
            return 0, []
        shared = min(common[lo:hi])
        now = sum(order[j] < current for j in range(lo, hi + 1))
        whole = (now - 1 + (now <= hi - lo)) * shared if shared >= MIN_SHARED and now else 0
        cuts = [lo - 1] + [j for j in range(lo, hi) if common[j] == shared] + [hi]
        saved, groups = 0, []
        for start, end in zip(cuts, cuts[1:]):
            part_saved, part_groups = best(start + 1, end)
            saved += part_saved
            groups += part_groups
        if whole >= saved and whole > 0:
            return whole, [(shared, [order[j] for j in range(lo, hi + 1)])]
        return saved, groups

    return best(0, len(texts) - 1)[1] if texts else []


class PrefixCache:
    """The prefixes a model's texts share, their keys and values computed by `compute` (a list of id
    tuples -> their [L, P, K, H] keys and values each) and kept (see the module's text)."""

    def __init__(self, compute: Callable[[list[tuple[int, ...]]], list[tuple[np.ndarray, np.ndarray]]], *,
                 max_bytes: int = CACHE_BYTES, table_limit: int = TABLE_LIMIT):
        self._compute = compute
        self.max_bytes = max_bytes
        self.table_limit = table_limit
        self._known: dict[tuple[int, ...], Prefix] = {}
        self._found: collections.OrderedDict[tuple[int, ...], Prefix] = collections.OrderedDict()
        self._recent: collections.deque[tuple[int, ...]] = collections.deque(maxlen=RECENT_TEXTS)
        self.prefix_tokens_computed = 0

    def register(self, ids: Sequence[int]) -> None:
        """Keeps the prefix `ids` (a prompt's or an instruction's token ids) for the model's life; its
        keys and values are computed when a text first shares it."""
        ids = tuple(int(i) for i in ids)
        if len(ids) >= MIN_SHARED and ids not in self._known:
            self._known[ids] = self._found.pop(ids, None) or Prefix(ids)

    def forget(self) -> None:
        """Drops every computed key and value (the model's parameters changed); known prefixes stay known."""
        for prefix in self._known.values():
            prefix.keys = prefix.values = None
        self._found.clear()

    @property
    def known(self) -> list[tuple[int, ...]]:
        """The registered prefixes' ids."""
        return list(self._known)

    @property
    def kept(self) -> int:
        """How many prefixes are known or kept."""
        return len(self._known) + len(self._found)

    def shared_length(self, text: Sequence[int]) -> int:
        """How many leading ids of `text` a known or kept prefix holds (0 if fewer than MIN_SHARED): what
        a scheduler (which remembers, see `share`) can count before deciding a batch."""
        text = tuple(int(i) for i in text)
        shared = max((common_length(p, text) for p in (*self._known, *self._found)
                      if p[:MIN_SHARED] == text[:MIN_SHARED]), default=0)
        shared = min(shared, len(text) - 1)
        return shared if shared >= MIN_SHARED else 0

    def share(self, texts: Sequence[Sequence[int]], *, compute: bool = True, remember: bool = False) -> Sharing:
        """Which prefix each text continues and its own ids (see Sharing); the keys and values of
        every prefix used are computed here if they were not yet (`compute=False`: left for `fill`).

        Without `remember` the choice depends on the texts and the known prefixes alone, so a call's
        vectors are the same bits whatever was computed before (a corpus job's resumed shard equals its
        first run); with it (a server's scheduler), prefixes found in earlier calls and the leading ids
        of recent texts count too: a client's instruction is shared from its second use on."""
        texts = [tuple(int(i) for i in t) for t in texts]
        candidates: dict[tuple[int, ...], int] = {}          # prefix ids -> tokens it would save
        best: list[tuple[int, tuple[int, ...]] | None] = [None] * len(texts)

        def offer(i: int, prefix: tuple[int, ...], shared: int, saving: int) -> None:
            shared = min(shared, len(texts[i]) - 1)
            if shared >= MIN_SHARED and (best[i] is None or shared > best[i][0]):
                best[i] = (shared, prefix)
                candidates[prefix] = candidates.get(prefix, 0) + saving

        by_start = collections.defaultdict(list)
        for prefix in (*self._known, *(self._found if remember else ())):
            by_start[prefix[:MIN_SHARED]].append(prefix)
        for i, text in enumerate(texts):
            for prefix in by_start.get(text[:MIN_SHARED], ()):
                offer(i, prefix, common_length(prefix, text), len(prefix))
        seen = {t[:RECENT_IDS] for t in texts}             # a text computed again is no instruction seen again
        recent = [t for t in self._recent if t not in seen] if remember else []
        kept = [0 if pick is None else pick[0] for pick in best]      # what kept prefixes already share
        for shared, members in shared_groups(texts + recent, len(texts)):
            # A new prefix must share at least MIN_SHARED ids more than a kept one gives its texts: a
            # query whose first words a recent one had does not compute the instruction again for them.
            members = [i for i in members if i < len(texts) and shared >= kept[i] + MIN_SHARED]
            if not members:
                continue
            prefix = texts[members[0]][:shared]
            for i in members:
                offer(i, prefix, shared, shared)
        if remember:
            self._recent.extend(t[:RECENT_IDS] for t in texts)
        return self._assign(texts, best, candidates, compute)

    def _assign(self, texts, best, candidates, compute: bool) -> Sharing:
        """The prefixes that save most, up to `table_limit` tokens, computed; each text's share of one."""
        chosen, tokens = [], 0
        for prefix in sorted(candidates, key=candidates.get, reverse=True):
            if tokens + len(prefix) <= self.table_limit and candidates[prefix] > 0:
                chosen.append(prefix)
                tokens += len(prefix)
        prefixes = [self._known.get(ids) or self._found.get(ids) or Prefix(ids) for ids in chosen]
        if compute:
            self.fill(prefixes)
        index = {p.ids: n + 1 for n, p in enumerate(prefixes)}
        own, entry, offset = [], [], []
        for text, pick in zip(texts, best):
            shared, prefix = pick if pick is not None and pick[1] in index else (0, None)
            own.append(text[shared:])
            entry.append(index[prefix] if prefix else 0)
            offset.append(shared)
        used = {e for e in entry if e}
        if len(used) < len(prefixes):            # a prefix every text found a longer one for
            keep = [p for n, p in enumerate(prefixes) if n + 1 in used]
            renumber = {index[p.ids]: n + 1 for n, p in enumerate(keep)}
            entry = [renumber.get(e, 0) for e in entry]
            prefixes = keep
        return Sharing(own, entry, offset, prefixes)

    def fill(self, prefixes: list[Prefix]) -> None:
        """Computes the keys and values of the prefixes that lack them (in one pass) and keeps them."""
        missing = [p for p in prefixes if p.keys is None]
        if missing:
            for prefix, (keys, values) in zip(missing, self._compute([p.ids for p in missing])):
                prefix.keys, prefix.values = keys, values
            self.prefix_tokens_computed += sum(len(p.ids) for p in missing)
        for prefix in prefixes:
            if prefix.ids not in self._known:
                self._found[prefix.ids] = prefix
                self._found.move_to_end(prefix.ids)
        while self._found and sum(p.nbytes for p in self._found.values()) > self.max_bytes:
            self._found.popitem(last=False)
