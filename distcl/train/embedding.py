"""The embedding passes of the Train workers: a rank's exact share of shards read, decoded
(here or in DataLoader processes) and embedded in batches sized for its device. Used at the
end of each task (``distcl.train.endtask``), by FCT's transformation (``distcl.train.transform``)
and by the partial re-index (``distcl.reindex``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from distcl.data.readers import iter_items
from distcl.data.shards import item_split
from distcl.train.precision import Precision

# Images per forward pass of the end-of-task embedding. On CPU small batches are faster: a
# batch's activations stay in cache (ResNet-32 on 28x28 images, one thread, 1000 images:
# 0.73 s at 64, 1.17 s at 256; the embeddings are bitwise the same). A GPU wants large ones.
EMBED_BATCH = {"cpu": 64, "cuda": 256}


def _kind(device) -> str:
    """The type ("cpu", "cuda", ...) of a torch device or of its name."""
    return getattr(device, "type", str(device))


def embed_batch(device) -> int:
    """``EMBED_BATCH`` for ``device`` (a torch device or its name)."""
    return EMBED_BATCH.get(_kind(device), EMBED_BATCH["cuda"])


def embed_batches(pieces, size: int):
    """(images uint8, keys, labels, tasks) batches of ``size`` of ``pieces`` (``item_split``);
    a shard that yields fewer samples than its manifest count is an error naming it."""
    images, keys, labels, tasks = [], [], [], []
    for key, img, lab, meta in iter_items(pieces):
        images.append(img)
        keys.append(key)
        labels.append(lab)
        tasks.append(meta["task"])
        if len(images) == size:
            yield np.stack(images), keys, labels, tasks
            images, keys, labels, tasks = [], [], [], []
    if images:
        yield np.stack(images), keys, labels, tasks


def _inference_model(model, device):
    """On CPU, a channels-last copy of ``model`` (a module) for the embedding passes: oneDNN's
    convolutions run faster on it (ResNet-32 on 28x28 images, one thread, 1024 images:
    0.82-1.05 -> 0.72-0.81 s; embeddings within 2e-7 of the default layout's). ``model``
    itself elsewhere (on a GPU the layout is left as trained)."""
    if _kind(device) != "cpu" or not isinstance(model, torch.nn.Module):
        return model
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


class _EmbedStream(torch.utils.data.IterableDataset):
    """A rank's items for a DataLoader: each loader worker reads and decodes its own part
    of the rank's range."""

    def __init__(self, shards, rank: int, world: int, size: int):
        self.shards, self.rank, self.world, self.size = list(shards), rank, world, size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        pieces = item_split(self.shards, self.rank, self.world, w, n)
        yield from embed_batches(pieces, self.size)


@torch.no_grad()
def embed_shards(
    model, shards: Sequence[tuple[str, int]], device, loader_workers: int = 0,
    rank: int = 0, world: int = 1, precision: Precision | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Rank ``rank``'s share (of ``world``; ``item_split``) of the samples of ``shards``
    ((path, manifest count) pairs) embedded by ``model``, decoded here
    (``loader_workers=0``) or in that many DataLoader worker processes. ``precision``: the
    training's (autocast); the rows are float32 whatever it is."""
    pieces = item_split(shards, rank, world)
    workers = min(loader_workers, sum(stop - start for _, _, start, stop in pieces))
    size = embed_batch(device)
    batches = (
        embed_batches(pieces, size)
        if workers == 0
        else torch.utils.data.DataLoader(
            _EmbedStream(shards, rank, world, size), batch_size=None, num_workers=workers,
            pin_memory=_kind(device) == "cuda",
        )
    )  # fmt: skip
    net = _inference_model(model, device)
    precision = precision or Precision("fp32", _kind(device))
    keys, labels, tasks, embs = [], [], [], []
    for images, k, lab, tk in batches:
        x = torch.as_tensor(images).to(device, non_blocking=True).float().div_(255.0)
        if x.dim() == 4 and (net is not model or precision.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            emb = net.embed(x)  # (B, D), L2-normalised in float32 (EmbeddingModel.embed)
        embs.append(emb.float().cpu().numpy())
        keys += list(k)
        labels += [int(v) for v in lab]
        tasks += [int(v) for v in tk]
    d = model.embedding_dim
    return {
        "keys": np.asarray(keys, dtype=str),
        "labels": np.asarray(labels, np.int64),
        "tasks": np.asarray(tasks, np.int32),
        "emb": np.concatenate(embs) if embs else np.zeros((0, d), np.float32),
    }
