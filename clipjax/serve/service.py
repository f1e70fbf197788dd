"""The model and the index behind the server: a checked query in, hits out.

Text queries go through the `MicroBatcher` (embedded together, searched as one
faiss call); image, embedding and "more like this" queries run on the same model
thread between batches. The encoders are compiled for every batch shape at
start-up, so no request waits for a compile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipjax import imageio
from clipjax.apps.search import Hit, ImageIndex
from clipjax.serve.batcher import MicroBatcher
from clipjax.serve.queries import BadRequest, Query


class SearchService:
    def __init__(self, model, index: ImageIndex, *, max_batch: int = 32,
                 max_pixels: int = 89_478_485, text_lengths: Sequence[int] = (8, 16, 32)):
        self.model = model
        self.index = index
        self.max_pixels = max_pixels
        self.batcher = MicroBatcher(self._text_batch, max_batch)
        context = model.context_length
        if model.model_config.text.pool not in ("argmax", "first"):
            text_lengths = ()  # the pooled token is the last: every position counts
        self.text_lengths = sorted({n for n in text_lengths if 0 < n < context} | {context})

    @property
    def dim(self) -> int:
        return int(self.index.cache.dim or self.model.embed_dim)

    @staticmethod
    def tune_search(threads: int) -> None:
        """`threads` faiss OpenMP threads: few, because concurrent queries are batched and
        oversubscribed OpenMP threads spin. (vector_index.search picks the kernel per
        call: a scan per query for one to three queries, one BLAS product for more.)"""
        import faiss

        faiss.omp_set_num_threads(max(1, int(threads)))

    def warm_up(self) -> None:
        """Compiles the text encoder for each batch size the batcher can form, and the
        image encoder for one image."""
        b = 1
        while True:
            for length in self.text_lengths:
                self.model.encode_texts(np.zeros((b, length), np.int32))
            if b >= self.batcher.max_batch:
                break
            b = min(2 * b, self.batcher.max_batch)
        s = self.model.image_size
        self.model.encode_images(np.zeros((1, s, s, 3), np.uint8))

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def search(self, query: Query) -> list[tuple[int, Hit]]:
        if query.kind == "text":
            hits = await self.batcher.submit((query.value, query.k))
        elif query.kind == "image":
            hits = await self.batcher.call(self._image_search, query.value, query.k)
        elif query.kind == "embedding":
            hits = await self.batcher.call(self._vector_search, query.value, query.k)
        else:
            hits = await self.batcher.call(self._like_search, query.value, query.k)
        if query.threshold is not None:
            hits = [(i, h) for i, h in hits if h.score >= query.threshold]
        return hits

    def info(self) -> dict:
        cache = self.index.cache
        return {"model": cache.model.get("workdir") or getattr(self.model, "workdir", None),
                "step": cache.model.get("step", getattr(self.model, "step", None)),
                "fingerprint": cache.model.get("fingerprint"),
                "size": len(self.index), "dim": self.dim, "index": self.index.kind,
                "revision": cache.revision, "micro_batching": self.batcher.stats()}

    # ------------------------------------------------------------ on the model thread

    def _text_batch(self, items: Sequence[tuple[str, int]]) -> list[list[tuple[int, Hit]]]:
        vectors = self.encode_texts([text for text, _ in items])
        rows = self._search(vectors, max(k for _, k in items))
        return [row[:k] for row, (_, k) in zip(rows, items)]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """`model.encode_texts(texts)`, each text on the shortest of `text_lengths`
        positions that holds its pooled token: a short query costs a fraction of the
        full context, with the same embedding. On a CPU a call costs batch x positions,
        so one long text must not put a whole batch on its length: texts run as one call
        per length, longest first, and shorter texts fill the padding rows of a longer
        call (free) instead of making a call of their own."""
        ids = np.asarray(self.model.tokenize(list(texts)))
        if len(self.text_lengths) == 1:
            return self.model.encode_texts(ids)
        pool = self.model.model_config.text.pool
        need = ids.argmax(axis=1) + 1 if pool == "argmax" else np.ones(len(ids), int)
        bucket = np.searchsorted(self.text_lengths, need)
        order = np.argsort(-bucket, kind="stable")
        out = np.empty((len(ids), self.model.embed_dim), np.float32)
        i = 0
        while i < len(order):
            b = bucket[order[i]]
            n = int(np.count_nonzero(bucket[order[i:]] == b))  # some may be fillers already
            rows = order[i:i + n + (-n) % self.model.batch_for(n)]
            out[rows] = self.model.encode_texts(ids[rows, :self.text_lengths[b]])
            i += len(rows)
        return out

    def _image_search(self, raw: bytes, k: int) -> list[tuple[int, Hit]]:
        try:  # the one image reader, with the pipeline's bomb guard
            image = imageio.decode(raw, max_pixels=self.max_pixels, rgb=False)
        except imageio.UnreadableImage as e:
            raise BadRequest(f"image: {_reason(e)}", status=422) from None
        try:
            vector = self.model.encode_images([image])
        except Exception as e:  # noqa: BLE001 - e.g. a mode the preprocessing cannot convert
            raise BadRequest(f"image: cannot preprocess ({type(e).__name__}: {e})",
                             status=422) from None
        return self._search(vector, k)[0]

    def _vector_search(self, vector: np.ndarray, k: int) -> list[tuple[int, Hit]]:
        return self._search(vector[None], k)[0]

    def _like_search(self, row: int, k: int) -> list[tuple[int, Hit]]:
        vector = np.asarray(self.index.cache.embeddings[row], np.float32)
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return self._search(vector[None], k)[0]

    def _search(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, Hit]]]:
        from clipjax.apps import vector_index

        scores, ids = vector_index.search(self.index.index, vector_index.as_rows(vectors), k)
        paths = self.index.paths
        return [[(int(i), Hit(paths[i], float(s))) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]


def _reason(e: imageio.UnreadableImage) -> str:
    text = str(e)
    return text.replace("decompression_bomb", "too many pixels (a decompression bomb?)") \
        .replace("decode_error", "not an image")

