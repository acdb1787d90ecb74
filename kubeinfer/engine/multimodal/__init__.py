"""The multimodal input path, up to the engine's door: media fetching and decoding with limits, the
model's processor, placeholder expansion, image hashing, the encoder cache and its chunk helpers.

Modules (each says its contract): `config.py` (MultiModalConfig, --limit-mm-per-prompt parsing),
`chat_parts.py` (content parts -> template messages + image sources), `data_url.py`,
`media_fetcher.py` (data/https/file URLs under the allow-lists, time and byte caps),
`image_decoder.py` (bytes -> RGB PIL image, pixel cap before decoding), `hashing.py` (image
content hash), `processor.py` (the HF processor on its PIL backend; placeholder ranges; per-image
encoder inputs), `qwen2_vl_processor.py` (Qwen2-VL's processor without a video processor), `inputs.py` (the plain data the engine receives), `preprocessor.py` (the front
door, on a thread pool), `block_keys.py` (image keys of prefix-cache block hashes),
`chunk_images.py` (which images a chunk needs; which encoder rows go where), `encoder_cache.py`
(the scheduler's bookkeeping), `encoder_outputs.py` (the runner's tensors).

How the rest of kubeinfer calls it (wired in: server/serving_chat.py, llm.py, llm_engine.py,
scheduler.py, kv_cache/manager.py, encoder_runner.py):

- Start-up: `mm = MultiModalPreprocessor.from_model(model_path, MultiModalConfig(
  limit_per_prompt=args.limit_mm_per_prompt, allowed_media_domains=args.allowed_media_domains,
  allowed_local_media_path=args.allowed_local_media_path), model_name)`. Flags (vLLM's names):
  `--limit-mm-per-prompt` (JSON, `parse_limit_mm_per_prompt`), `--allowed-media-domains` (nargs="*";
  absent: any host; present with no value: data URLs only, as examples/vlm.yaml sets it),
  `--allowed-local-media-path`. `mm.close()` at shutdown.
- Server, /v1/chat/completions: if `has_media_parts(request.messages)`:
  `inputs = await asyncio.wrap_future(mm.submit_chat(messages, chat_template,
  add_generation_prompt))`; a RequestError (raised at once or from the future) -> 400 with its
  `param`. Then `add_request(prompt_token_ids=inputs.prompt_token_ids, mm_inputs=inputs)`.
- Offline: `LLM.chat(messages)` -> `mm.chat(...)`; `LLM.generate({"prompt": text,
  "multi_modal_data": {"image": img}})` -> `mm.process_prompt(text, data)`.
- Engine: the Request keeps `mm_inputs.features`. The KV manager keeps `mm_inputs.hash_spans()`
  per request and folds `block_image_keys(spans, start, end)` into each block's hash. The scheduler
  uses `images_in_chunk` / `end_before_image` and `EncoderCacheManager` (see its docstring) and
  lists in the SchedulerOutput the features whose encoder runs this step and the freed hashes.
  The runner runs the vision encoder on `feature.encoder_inputs`, `EncoderOutputStore.put`s the
  output, `scatter_into`s each chunk's rows into the input embeddings, and `free`s freed hashes.
"""
from kubeinfer.engine.multimodal.block_keys import block_image_keys
from kubeinfer.engine.multimodal.chat_parts import has_media_parts
from kubeinfer.engine.multimodal.chunk_images import chunk_rows, end_before_image, images_in_chunk
from kubeinfer.engine.multimodal.config import MultiModalConfig, parse_limit_mm_per_prompt
from kubeinfer.engine.multimodal.encoder_cache import EncoderCacheManager
from kubeinfer.engine.multimodal.encoder_outputs import EncoderOutputStore
from kubeinfer.engine.multimodal.hashing import hash_image
from kubeinfer.engine.multimodal.inputs import ImageFeature, MultiModalInputs, PlaceholderRange
from kubeinfer.engine.multimodal.preprocessor import MultiModalPreprocessor

__all__ = ["EncoderCacheManager", "EncoderOutputStore", "ImageFeature", "MultiModalConfig",
           "MultiModalInputs", "MultiModalPreprocessor", "PlaceholderRange", "block_image_keys",
           "chunk_rows", "end_before_image", "has_media_parts", "hash_image", "images_in_chunk",
           "parse_limit_mm_per_prompt"]
