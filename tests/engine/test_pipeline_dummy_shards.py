"""`--load-format dummy` with pipeline and tensor parallelism builds only each rank's shard, in
place: a scaled-down copy of the Llama 3.1 70B shape (benchmarks/models: its head ratio, MLP ratio
and untied head) over 2 stages x 2 tensor ranks. Each rank holds its stage's layers, its tensor
rank's rows of them, and nothing else, filled with random values, so the 141 GB of the full model
never exist on one device (on a GPU the parameters are created there, under `torch.device`, and
filled there). The ranks are loaded one after another in this process, with the parallel state set
as each rank's own would be (the loader runs no collective)."""
import json
import types
from pathlib import Path

import pytest
import torch

from kubeinfer.engine import parallel_state
from kubeinfer.engine.config import ModelConfig
from kubeinfer.engine.loader.model import load_model

REPO = Path(__file__).resolve().parents[2]
SHAPE = REPO / "benchmarks" / "models" / "llama-3.1-70b-shape" / "config.json"
TP, PP = 2, 2


@pytest.fixture(scope="module")
def scaled_70b(tmp_path_factory) -> Path:
    """The 70B config with 8 query heads per KV head, a 3.5x MLP and 4 layers."""
    config = json.loads(SHAPE.read_text())
    assert config["num_attention_heads"] // config["num_key_value_heads"] == 8
    config.update(hidden_size=64, head_dim=8, num_attention_heads=16, num_key_value_heads=2,
                  intermediate_size=224, num_hidden_layers=4, vocab_size=256,
                  bos_token_id=1, eos_token_id=2)
    out = tmp_path_factory.mktemp("llama-70b-scaled")
    (out / "config.json").write_text(json.dumps(config))
    return out


def load_as_rank(monkeypatch, path: Path, rank: int) -> dict[str, torch.Tensor]:
    """The dummy model global rank `rank` of TP x PP builds."""
    fake_dist = types.SimpleNamespace(get_world_size=lambda group=None: TP,
                                      get_rank=lambda group=None: rank % TP,
                                      is_initialized=lambda: True)
    with monkeypatch.context() as m:
        m.setattr(parallel_state, "dist", fake_dist)
        m.setattr(parallel_state, "_TP_GROUP", object())
        m.setattr(parallel_state, "_PP_RANKS", [s * TP + rank % TP for s in range(PP)])
        m.setattr(parallel_state, "_PP_RANK", rank // TP)
        model, _ = load_model(ModelConfig(model=str(path), load_format="dummy", dtype="float32"),
                              "cpu")
    return dict(model.named_parameters())


@pytest.mark.parametrize("rank", range(TP * PP))
def test_dummy_weights_are_created_per_rank_shard(monkeypatch, scaled_70b, rank):
    params = load_as_rank(monkeypatch, scaled_70b, rank)
    stage = rank // TP
    layers = {int(n.split(".")[2]) for n in params if n.startswith("model.layers.")}
    assert layers == ({0, 1} if stage == 0 else {2, 3})  # its stage's layers only
    assert ("model.embed_tokens.weight" in params) == (stage == 0)
    assert ("lm_head.weight" in params) == ("model.norm.weight" in params) == (stage == 1)
    for name, p in params.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert p.shape == (256 // TP, 64)  # the vocabulary split over the tensor ranks
        if name.endswith("o_proj.weight"):
            assert p.shape == (64, 16 * 8 // TP)  # row-parallel: its half of the heads
        if name.endswith("down_proj.weight"):
            assert p.shape == (64, 224 // TP)
        if p.dim() > 1:
            assert 0.015 < float(p.std()) < 0.025, name  # filled (normal(0, 0.02)), not empty
    numel = sum(p.numel() for n, p in params.items() if "norm" not in n)
    assert numel == pytest.approx(full_numel(scaled_70b) / (TP * PP), rel=0.25)


def full_numel(path: Path) -> int:
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(path))
    return sum(p.numel() for n, p in model.named_parameters() if "norm" not in n)
