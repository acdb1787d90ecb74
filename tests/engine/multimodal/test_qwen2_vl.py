"""Qwen2-VL and Qwen2.5-VL end to end through `LLM`: greedy token ids equal HF transformers'
`generate` on the processor's output (one image, two images, text only), prefix caching with two
different images after the same text, chunked prefill that cuts an image, preemption (the 3-D
positions recomputed from the prompt); the M-RoPE positions equal HF's `get_rope_index`; the
Qwen2.5-VL 7B shape loads with dummy weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.llm import LLM
from kubeinfer.engine.mrope_positions import MRopePositions, step_positions
from kubeinfer.engine.multimodal.inputs import ImageFeature, PlaceholderRange
from kubeinfer.engine.multimodal.qwen2_vl_processor import load_qwen2_vl_processor
from kubeinfer.engine.sampling_params import SamplingParams
from tests.engine.multimodal.conftest import cached_llms
from tests.engine.multimodal.test_vlm_models import conversation, images, pil_part
from tests.fixtures.tiny_vlm import make_image, save_tiny_vlm_weights

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def qwen(tiny_vlm_dir):
    """family -> (folder with random weights, the HF model, the processor)."""
    built = {}

    def make(family: str):
        if family not in built:
            folder = tiny_vlm_dir(family)
            model = save_tiny_vlm_weights(folder, family)
            built[family] = (folder, model, load_qwen2_vl_processor(folder, family))
        return built[family]

    return make


@pytest.fixture(scope="module")
def llms(qwen):
    with cached_llms(lambda family: qwen(family)[0], max_model_len=512,
                     kv_cache_memory=8 << 20) as make:
        yield make


def hf_inputs(proc, n_images: int, imgs, text: str = "Describe"):
    prompt = proc.apply_chat_template(conversation(n_images, text), tokenize=False,
                                      add_generation_prompt=True)
    return proc(text=[prompt], images=[imgs] if imgs else None, add_special_tokens=False,
                return_tensors="pt")


def hf_greedy(model, proc, n_images: int, imgs, text: str = "Describe",
              max_new: int = MAX_NEW) -> list[int]:
    inputs = hf_inputs(proc, n_images, imgs, text)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_mrope_positions_equal_hf_get_rope_index(family, qwen, llms):
    """Our admission-time positions of a prompt with two images of odd sizes are HF's, and so is
    the rope delta (decode goes on at the prompt's highest position + 1)."""
    _, model, proc = qwen(family)
    imgs = images(2, seed=5)
    inputs = hf_inputs(proc, 2, imgs)
    want, want_delta = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    conv = conversation(2, image_part=pil_part(imgs))
    features = llms(family).mm_preprocessor.chat(conv).features
    ours, delta = MRopePositions(2).prompt_positions(inputs["input_ids"].shape[1], features)
    assert np.array_equal(ours, want[:, 0].numpy())
    assert delta == int(want_delta) < 0


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_equals_hf(family, qwen, llms):
    """The native tower's rows for one image equal HF's `get_image_features` (Qwen2.5-VL: a
    112 x 84 image is 3 x 4 merged cells: four windows of up to 2 x 2, and one full-attention
    block)."""
    _, model, proc = qwen(family)
    img = make_image(109, 83, 77)
    inputs = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[[img]],
                  return_tensors="pt")
    with torch.no_grad():
        want = model.model.get_image_features(inputs["pixel_values"],
                                              inputs["image_grid_thw"]).pooler_output[0]
        ours = llms(family).engine.runner.model.embed_image(
            {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]})
    assert ours.shape == want.shape == (12, 64)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_images_equal_one_at_a_time(family, qwen, llms):
    """Images of different sizes packed into one tower call (windows of unequal lengths go
    through the gathered path, a one-window image through the view) give each image the rows it
    gets alone."""
    _, _, proc = qwen(family)
    model = llms(family).engine.runner.model
    inputs = []
    for w, h, seed in ((109, 83, 1), (56, 56, 2), (83, 109, 3), (109, 83, 4)):
        got = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                   images=[[make_image(w, h, seed)]], return_tensors="pt")
        inputs.append({k: got[k] for k in ("pixel_values", "image_grid_thw")})
    with torch.no_grad():
        packed = model.embed_images(inputs)
        alone = [model.embed_image(inp) for inp in inputs]
    assert [p.shape for p in packed] == [a.shape for a in alone]
    assert [a.shape[0] for a in alone] == [12, 4, 12, 12]
    for p, a in zip(packed, alone):
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5)
    assert not torch.equal(alone[0], alone[3])  # different pixels, different rows


@pytest.mark.parametrize("lengths", [[8, 8, 8], [16, 8, 16, 5, 8], [7]])
def test_segment_attention_equals_one_sdpa_per_segment(lengths):
    """Each row attends only within its segment, whatever the backend's output layout (the
    math backend's is [B, heads, L, d])."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kubeinfer.engine.models.qwen2_vl_vision import Segments

    q, k, v = (torch.randn(sum(lengths), 3, 16) for _ in range(3))
    want, at = [], 0
    for n in lengths:
        s = slice(at, at + n)
        want.append(torch.nn.functional.scaled_dot_product_attention(
            q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1)).transpose(0, 1))
        at += n
    with sdpa_kernel(SDPBackend.MATH):
        got = Segments.of(lengths, "cpu").attend(q, k, v)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)


def test_step_positions_cut_chunks_and_decode_from_the_delta():
    """Chunks of a prompt read the whole prompt's ids wherever they are cut; tokens after the
    prompt continue at the highest position + 1."""
    merge = MRopePositions(2)

    # a 2x4 grid of merged patches at positions 3..10 of a 14-token prompt
    feature = ImageFeature("hash", PlaceholderRange(3, 8),
                           {"image_grid_thw": torch.tensor([[1, 4, 8]])})
    ids, delta = merge.prompt_positions(14, [feature])
    assert ids[:, :3].tolist() == [[0, 1, 2]] * 3
    assert ids[:, 3:11].tolist() == [[3] * 8, [3, 3, 3, 3, 4, 4, 4, 4], [3, 4, 5, 6] * 2]
    assert ids[:, 11:].tolist() == [[7, 8, 9]] * 3  # 3 + max(2, 4)
    assert delta == 10 - 14
    cuts = [(0, 5), (5, 4), (9, 5), (14, 1), (15, 1)]  # three chunks, then two decode tokens
    got = np.concatenate([step_positions(np.arange(s, s + n), [s], [n], [ids], [delta])
                          for s, n in cuts], axis=1)
    assert got[:, :14].tolist() == ids.tolist()
    assert got[:, 14:].tolist() == [[10, 11]] * 3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_images", [1, 2, 0])
def test_greedy_ids_equal_hf(family, n_images, qwen, llms):
    _, model, proc = qwen(family)
    imgs = images(n_images)
    want = hf_greedy(model, proc, n_images, imgs)
    out = llms(family).chat(conversation(n_images, image_part=pil_part(imgs)), GREEDY)
    assert out[0].outputs[0].token_ids == want


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_keeps_two_images_apart(family, qwen, llms):
    _, model, proc = qwen(family)
    text = "Look closely at every detail of the following picture and then answer " * 3
    llm = llms(family)
    for seed in (11, 12):
        imgs = images(1, seed=seed)
        want = hf_greedy(model, proc, 1, imgs, text)
        out = llm.chat(conversation(1, text, pil_part(imgs)), GREEDY)
        assert out[0].outputs[0].token_ids == want
    assert out[0].num_cached_tokens > 0
    image_start = out[0].prompt_token_ids.index(llm.mm_preprocessor.processor.image_token_id)
    assert out[0].num_cached_tokens <= image_start


@pytest.mark.parametrize("family, async_scheduling", [("qwen2_vl", False), ("qwen2_5_vl", True)])
def test_chunked_prefill_splits_an_image(family, async_scheduling, qwen, llms):
    """A step budget smaller than the prompt cuts an image's placeholder across steps, with a
    second request in the batch; Qwen2.5-VL under the one-step-ahead loop (the CUDA default).
    Each chunk's positions come from its own request's prompt and delta."""
    _, model, proc = qwen(family)
    imgs, other = images(2, seed=3), images(1, seed=83)
    want = [hf_greedy(model, proc, 2, imgs), hf_greedy(model, proc, 1, other)]
    budget = 10
    llm = llms(family, max_num_batched_tokens=budget, max_num_seqs=2, enable_prefix_caching=False,
               async_scheduling=async_scheduling)
    assert llm.engine.config.scheduler.async_scheduling == async_scheduling
    conv = conversation(2, image_part=pil_part(imgs))
    outs = llm.chat([conv, conversation(1, image_part=pil_part(other))], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want
    # the first request, admitted first, takes the whole budget until its prompt is done
    ranges = [f.placeholder for f in llm.mm_preprocessor.chat(conv).features]
    boundaries = range(budget, len(outs[0].prompt_token_ids), budget)
    assert any(r.offset < k < r.end for r in ranges for k in boundaries)
    assert llm.engine.scheduler.encoder_cache.num_free == budget


def test_preemption_recomputes_the_positions(qwen):
    """A KV cache too small for both requests preempts one; it comes back from its prompt and
    images (positions and delta computed again) and its tokens are still HF's."""
    family = "qwen2_5_vl"
    folder, model, proc = qwen(family)
    batch = [images(2, seed=61), images(1, seed=63)]
    max_new = 16
    want = [hf_greedy(model, proc, len(imgs), imgs, max_new=max_new) for imgs in batch]
    llm = LLM(str(folder), dtype="float32", max_model_len=80, block_size=8,
              num_gpu_blocks_override=10, enable_prefix_caching=False)
    try:
        outs = llm.chat([conversation(len(imgs), image_part=pil_part(imgs)) for imgs in batch],
                        SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True))
        assert llm.engine.scheduler._num_preemptions > 0
        assert [o.outputs[0].token_ids for o in outs] == want
    finally:
        llm.shutdown()


def small_7b_shape(folder: Path, mrope_section=(2, 3, 3)) -> Path:
    """benchmarks/models/qwen2.5-vl-7b-shape with the same keys and tiny sizes."""
    config = json.loads((REPO / "benchmarks/models/qwen2.5-vl-7b-shape/config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, layer_types=["full_attention"] * 2,
                max_position_embeddings=1024, bos_token_id=1, eos_token_id=1)
    if mrope_section is None:
        del text["rope_parameters"]["mrope_section"]
    else:
        text["rope_parameters"]["mrope_section"] = list(mrope_section)
    vision.update(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1, 3])
    for i, key in enumerate(("image_token_id", "video_token_id", "vision_start_token_id",
                             "vision_end_token_id")):
        config[key] = 500 + i
    config["bos_token_id"] = config["eos_token_id"] = 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def dummy_llm(folder: Path) -> LLM:
    return LLM(str(folder), dtype="float32", load_format="dummy", skip_tokenizer_init=True,
               num_gpu_blocks_override=16, block_size=8, max_model_len=128)


def test_the_7b_shape_loads_with_dummy_weights(tmp_path):
    """The benchmark's config (scaled down) loads with --load-format dummy and generates from
    token ids, as the GPU benchmark runs it."""
    llm = dummy_llm(small_7b_shape(tmp_path))
    try:
        assert type(llm.engine.runner.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        outs = llm.generate([{"prompt_token_ids": list(range(3, 20))}],
                            SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert len(outs[0].outputs[0].token_ids) == 4
    finally:
        llm.shutdown()


@pytest.mark.parametrize("section, words", [(None, "no mrope_section"),
                                            ((2, 3, 4), "summing to half")])
def test_a_bad_mrope_section_fails_the_start(section, words, tmp_path):
    with pytest.raises(ConfigError, match=words):
        dummy_llm(small_7b_shape(tmp_path, section))



def test_the_processor_refuses_videos_and_a_folder_without_settings(qwen, tmp_path):
    from kubeinfer.engine.errors import RequestError

    _, _, proc = qwen("qwen2_vl")
    with pytest.raises(RequestError, match="videos are not supported"):
        proc(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[[images(1)[0]] * 2])
    with pytest.raises(ConfigError, match="no image processor settings"):
        load_qwen2_vl_processor(tmp_path, "qwen2_vl")


def test_tensor_parallel_with_images_equals_hf(qwen):
    """Two ranks on gloo: each holds half the decoder's heads and the whole vision tower, runs the
    encoder on the same images and computes the same 3-D positions; the tokens are HF's."""
    family = "qwen2_5_vl"
    folder, model, proc = qwen(family)
    imgs = images(2, seed=91)
    want = hf_greedy(model, proc, 2, imgs)
    with LLM(str(folder), dtype="float32", device="cpu", max_model_len=256, block_size=8,
             num_gpu_blocks_override=40, tensor_parallel_size=2) as llm:
        assert llm.engine.runner.attn_layers[0].num_heads == 2
        out = llm.chat(conversation(2, image_part=pil_part(imgs)), GREEDY)
    assert out[0].outputs[0].token_ids == want


def test_generate_with_multi_modal_data(qwen, llms):
    """`LLM.generate` with a prompt that writes the vision tokens itself."""
    family = "qwen2_vl"
    _, model, proc = qwen(family)
    imgs = images(1, seed=97)
    prompt = proc.apply_chat_template(conversation(1), tokenize=False, add_generation_prompt=True)
    want = hf_greedy(model, proc, 1, imgs)
    out = llms(family).generate({"prompt": prompt, "multi_modal_data": {"image": imgs[0]}}, GREEDY)
    assert out[0].outputs[0].token_ids == want
