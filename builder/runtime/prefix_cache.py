"""A prefix cache that keeps PyramidDrop exact: several questions about one image share its work.

PyramidDrop ranks the image tokens by the attention of the LAST instruction token, so what a layer
holds after the first boundary depends on the question. Before it, it does not: the keys and values
of the prompt's prefix up to the end of the image span, in the layers of the first stage, and the
prefix's hidden states at the first boundary are the same for every question that follows. An entry
holds exactly that (plus the image's projected features): a hit runs only the new text through the
first stage, against the cached blocks, then joins the cached hidden states at the boundary and
ranks with its own last token. With nothing dropped (drop 0) no layer depends on the question, and
an entry holds the prefix in every layer.

Entries are keyed by the image (a hash of its preprocessed pixels, and the client's id for it when
it sends one: an id never stands for pixels it was not sent with), the
prefix's token ids and the depth the entry covers. Only whole blocks are shared: the prefix is cut
down to a multiple of the block size, and the tail is recomputed by each request. The blocks come
from the KV pool and are shared read-only (a request writes only past them); an entry is reference
counted by the requests running on it and evicted, least recently used first, only when none is.
Its features and hidden states stay in host memory (on a GPU, outside the memory the plan divides)
and are copied to the device for each hit.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .paged_kv import BlockPool, SequenceKV


def image_key(pixel_values: torch.Tensor, size: tuple[int, int]) -> str:
    """The image as the model sees it: its preprocessed tiles and original size."""
    digest = hashlib.blake2b(pixel_values.contiguous().numpy().tobytes(), digest_size=16)
    digest.update(repr((tuple(pixel_values.shape), size)).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Key:
    image: str  # image_key(), after "id:<n>:" when a client names the image (prompt_table_extra_id)
    prefix: tuple[int, ...]  # the prompt's token ids up to the end of the image span
    depth: int  # the layers whose blocks the entry holds: the first stage's, or all with nothing dropped


@dataclass
class Entry:
    key: Key
    tokens: int  # the shared prefix: whole blocks of it
    blocks: list[list[int]]  # per layer below key.depth, the prefix's blocks
    features: tuple  # (image features, layout) as Engine.image_features gives them, in host memory
    hidden: torch.Tensor | None  # (1, tokens, dim) at the first boundary, in host memory; None when the
    # entry spans every layer
    users: int = 0  # running requests reading its blocks

    @property
    def n_blocks(self) -> int:
        return sum(len(b) for b in self.blocks)


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    evicted: int = 0  # entries


@dataclass
class PrefixCache:
    """The entries, least recently used first; at most `budget` blocks held while nothing uses them."""
    pool: BlockPool
    n_layers: int
    budget: int  # blocks
    entries: OrderedDict = field(default_factory=OrderedDict)
    stats: Stats = field(default_factory=Stats)

    @property
    def n_blocks(self) -> int:
        return sum(e.n_blocks for e in tuple(self.entries.values()))  # a copy: stats are read from other threads

    @property
    def n_evictable(self) -> int:
        """Blocks of entries no request uses: free for any admission (as vLLM and TensorRT-LLM count them)."""
        return sum(e.n_blocks for e in tuple(self.entries.values()) if e.users == 0)

    def key(self, req, image: str | None) -> Key | None:
        """The key of a prepared request (engine.Request) whose image is `image`; None when it has
        no prefix to share: no image, or less than a whole block up to the end of its image span,
        or no token after the shared blocks."""
        end = req.image_start + req.n_image
        tokens = self.shareable(end)
        if image is None or not req.n_image or tokens == 0 or tokens >= req.prompt_tokens:
            return None
        schedule = req.schedule
        depth = schedule.layers[0] if schedule.active else self.n_layers
        return Key(image, tuple(req.input_ids[:end].tolist()), depth)

    def shareable(self, prefix_tokens: int) -> int:
        return prefix_tokens // self.pool.block_size * self.pool.block_size

    def get(self, key: Key) -> Entry | None:
        return self.entries.get(key)

    def use(self, entry: Entry) -> None:
        """A hit: one more request reads `entry`'s blocks."""
        self.stats.hits += 1
        self.entries.move_to_end(entry.key)
        entry.users += 1

    def missed(self) -> None:
        self.stats.misses += 1

    def release(self, entry: Entry) -> None:
        entry.users -= 1

    def features(self, image: str) -> tuple | None:
        """An image's features from any entry of it (another prefix, another depth)."""
        return next((e.features for e in self.entries.values() if e.key.image == image), None)

    def insert(self, key: Key, seq: SequenceKV, features: tuple, hidden: torch.Tensor) -> Entry | None:
        """Make the prefix blocks of `seq`, prefilled up to key.depth, an entry (they move from the
        sequence to the cache, which the sequence then uses as any hit does), with its image's
        `features` and, unless the entry spans every layer, the prefix's rows of its hidden states
        `hidden` (1, L, dim) there; None when the key is taken or the budget cannot hold it."""
        if key in self.entries:
            return None
        tokens = self.shareable(len(key.prefix))
        per_layer = tokens // self.pool.block_size
        size = per_layer * key.depth
        if size > self.budget or not self.evict(self.n_blocks + size - self.budget):
            return None
        blocks = [seq.tables[i, :per_layer].tolist() for i in range(key.depth)]
        # the host copies first: if one fails, the blocks are still the sequence's, freed at its end
        at_boundary = None if key.depth == self.n_layers else hidden[:, :tokens].to("cpu", copy=True)
        entry = Entry(key, tokens, blocks, (features[0].cpu(), features[1]), at_boundary, users=1)
        seq.shared = [per_layer if i < key.depth else 0 for i in range(self.n_layers)]
        self.entries[key] = entry
        return entry

    def evict(self, blocks: int) -> bool:
        """Give at least `blocks` blocks back to the pool by dropping unused entries, least recently
        used first; False (and nothing dropped) when the unused entries do not hold that many."""
        if blocks <= 0:
            return True
        unused = [e for e in self.entries.values() if e.users == 0]
        if sum(e.n_blocks for e in unused) < blocks:
            return False
        for e in unused:
            if blocks <= 0:
                break
            del self.entries[e.key]
            self.pool.release([b for layer in e.blocks for b in layer])
            self.stats.evicted += 1
            blocks -= e.n_blocks
        return True
