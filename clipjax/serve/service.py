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
                 max_pixels: int = 89_478_485, text_lengths: Sequence[int] = (16, 32)):
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
        """faiss settings for a server: `threads` OpenMP threads (few: concurrent queries
        are batched, and oversubscribed OpenMP threads spin), and BLAS for any batch of 2
        or more queries (one pass over the index for the whole batch; faiss's default
        scans it once per query below 20)."""
        import faiss

        faiss.omp_set_num_threads(max(1, int(threads)))
        faiss.cvar.distance_compute_blas_threshold = 2

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
        """`model.encode_texts(texts)`, on the shortest of `text_lengths` positions that
        holds every text's pooled token (a short query costs a fraction of the full
        context; the embedding is the same)."""
        ids = np.asarray(self.model.tokenize(list(texts)))
        length = ids.shape[1]
        if len(self.text_lengths) > 1:
            pool = self.model.model_config.text.pool
            need = int(ids.argmax(axis=1).max()) + 1 if pool == "argmax" else 1
            length = next(n for n in self.text_lengths if n >= need)
        return self.model.encode_texts(ids[:, :length])

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

