"""EncoderRunner: the model runner's multimodal half. It keeps each request's images (sent once with
the request), runs the vision encoder for the images the scheduler lists in a step (before the
forward that first needs them; all of them in one `embed_images` call), keeps the outputs in an
`EncoderOutputStore` until the scheduler frees them, and builds the step's input embeddings: the
token embeddings with each image's rows written at its placeholder positions of the step's chunks
(one index write per step). Nothing here reads a device tensor back: the step in flight under
async scheduling keeps running while the next one is prepared.

Every rank runs the same calls on the same plain step, like the rest of the runner.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from kubeinfer.engine.multimodal.encoder_batch import to_device
from kubeinfer.engine.multimodal.encoder_outputs import EncoderOutputStore
from kubeinfer.engine.multimodal.inputs import ImageFeature
from kubeinfer.engine.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)


class EncoderRunner:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.store = EncoderOutputStore()
        self._features: dict[str, tuple[ImageFeature, ...]] = {}
        # req id -> the end of its last image's placeholder: a chunk that starts there or later
        # (every decode step) needs no embeddings, found without walking the request's images
        self._images_end: dict[str, int] = {}

    def add_request(self, req_id: str, features: tuple[Any, ...]) -> None:
        if features:
            self._features[req_id] = tuple(features)
            self._images_end[req_id] = max(f.placeholder.end for f in features)

    def remove_request(self, req_id: str) -> None:
        self._features.pop(req_id, None)
        self._images_end.pop(req_id, None)

    def run_encoders(self, out: SchedulerOutput) -> list[str]:
        """Drop the outputs the scheduler freed, then compute this step's (in that order: a hash
        freed and scheduled in one step is an image computed again). All the step's images go to
        the model in one `embed_images` call (it stacks or packs them); should that call fail,
        each image runs alone, so that only the requests whose image fails fail (the runner leaves
        them out of the step), as a request whose inputs cannot be prepared does; every rank fails
        the same ones. Returns those requests."""
        self.store.free(out.freed_encoder_hashes)
        todo: list[tuple[str, ImageFeature]] = []
        unique: dict[str, ImageFeature] = {}  # two requests with one image: it runs once
        for req_id, indices in out.scheduled_encoder_inputs.items():
            features = self._features.get(req_id)
            if features is None:
                continue  # the request failed to join this step
            for k in indices:
                f = features[k]
                if f.image_hash not in self.store:
                    todo.append((req_id, f))
                    unique.setdefault(f.image_hash, f)
        if not todo:
            return []
        if len(unique) > 1 and hasattr(self.model, "embed_images"):
            try:
                batch = list(unique.values())
                outputs = self.model.embed_images([f.encoder_inputs for f in batch])
                for f, output in zip(batch, outputs):
                    self.store.put(f, output)
                return []
            except Exception:
                logger.warning("the batched vision encoder call over %d images failed; running "
                               "them one at a time to find the failing one", len(todo),
                               exc_info=True)
        failed: list[str] = []
        for req_id, f in todo:  # a shared image that fails fails every request that has it
            if req_id in failed:
                continue
            try:
                if f.image_hash not in self.store:
                    self.store.put(f, self.model.embed_image(f.encoder_inputs))
            except Exception:
                logger.exception("request %s: the vision encoder failed on its image; it fails, "
                                 "the others go on", req_id)
                failed.append(req_id)
        return failed

    def needs_embeds(self, req_ids: list[str], starts: list[int], query_lens: list[int]) -> bool:
        """Whether a chunk of the step covers image positions."""
        ends = self._images_end
        for req_id, start, n in zip(req_ids, starts, query_lens):
            if start >= ends.get(req_id, 0):
                continue
            for f in self._features[req_id]:
                if f.placeholder.offset < start + n and f.placeholder.end > start:
                    return True
        return False

    def input_embeds(self, input_ids: torch.Tensor, req_ids: list[str], starts: list[int],
                     query_lens: list[int]) -> torch.Tensor:
        """[T, hidden]: token embeddings of the step's flattened ids, image rows merged in: the
        positions and rows of every chunk gathered on the host, then one index copy to the device
        and one row write (not one per image)."""
        embeds = self.model.embed_input_ids(input_ids)
        positions: list[int] = []
        rows: list[torch.Tensor] = []
        offset = 0
        for req_id, start, n in zip(req_ids, starts, query_lens):
            if start >= self._images_end.get(req_id, 0):
                offset += n
                continue
            for f in self._features[req_id]:
                if f.placeholder.offset < start + n and f.placeholder.end > start:
                    if f.image_hash not in self.store:
                        raise RuntimeError(f"request {req_id}: the encoder output of image "
                                           f"{f.image_hash[:12]} is needed but was not computed")
                    self.store.gather_chunk(f, start, start + n, offset, positions, rows)
            offset += n
        if positions:
            host = torch.tensor(positions, dtype=torch.long, device="cpu")
            index = to_device(host, embeds.device)
            src = torch.cat(rows) if len(rows) > 1 else rows[0]
            embeds.index_copy_(0, index, src.to(embeds.dtype))
        return embeds
