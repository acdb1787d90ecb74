"""EncoderRunner with a fake model (no weights): a step's images go to the model in one call, an
image two requests share runs once, a failing batch falls back to one call per image and fails
exactly the requests whose image fails (a shared failing image fails all of them), and the merge
writes each chunk's rows at its positions of the flattened step."""
from __future__ import annotations

import torch

from kubeinfer.engine.encoder_runner import EncoderRunner
from kubeinfer.engine.multimodal.inputs import ImageFeature, PlaceholderRange
from kubeinfer.engine.scheduler_output import SchedulerOutput

H = 4


class FakeVision(torch.nn.Module):
    """An image's rows are its pixel value (a float) plus the row index; "bad" images raise."""

    def __init__(self):
        super().__init__()
        self.batches: list[int] = []
        self.singles = 0

    def _rows(self, inp):
        if inp["bad"]:
            raise RuntimeError("bad image")
        return inp["value"] + torch.arange(inp["rows"], dtype=torch.float32)[:, None].expand(-1, H)

    def embed_images(self, inputs):
        self.batches.append(len(inputs))
        return [self._rows(inp) for inp in inputs]

    def embed_image(self, inp):
        self.singles += 1
        return self._rows(inp)

    def embed_input_ids(self, ids):
        return torch.zeros(len(ids), H)


def feature(name: str, offset: int, rows: int, value: float, bad: bool = False) -> ImageFeature:
    return ImageFeature(name, PlaceholderRange(offset, rows),
                        {"value": value, "rows": rows, "bad": bad})


def step(images: dict[str, list[int]]) -> SchedulerOutput:
    return SchedulerOutput(scheduled_encoder_inputs=images)


def test_a_steps_images_run_in_one_call_and_a_shared_image_once():
    model = FakeVision()
    runner = EncoderRunner(model)
    runner.add_request("a", (feature("x", 1, 3, 10.0), feature("y", 5, 2, 20.0)))
    runner.add_request("b", (feature("x", 0, 3, 10.0),))
    assert runner.run_encoders(step({"a": [0, 1], "b": [0]})) == []
    assert model.batches == [2] and model.singles == 0 and len(runner.store) == 2
    # the merge: a's chunk [0, 7) then b's chunk [0, 2) in one flattened step of 9 tokens
    embeds = runner.input_embeds(torch.zeros(9, dtype=torch.long), ["a", "b"], [0, 0], [7, 2])
    want = torch.zeros(9, H)
    want[1:4] = 10.0 + torch.arange(3.0)[:, None]
    want[5:7] = 20.0 + torch.arange(2.0)[:, None]
    want[7:9] = 10.0 + torch.arange(2.0)[:, None]  # b's chunk takes x's first two rows
    assert torch.equal(embeds, want)
    assert runner.needs_embeds(["a", "b"], [7, 2], [1, 1]) is True  # b's last image row is left
    assert runner.needs_embeds(["a", "b"], [7, 3], [1, 1]) is False  # decode: past every image


def test_a_failing_batch_fails_only_the_requests_with_the_failing_image():
    model = FakeVision()
    runner = EncoderRunner(model)
    runner.add_request("a", (feature("bad", 0, 2, 1.0, bad=True),))
    runner.add_request("b", (feature("good", 0, 2, 2.0),))
    runner.add_request("c", (feature("bad", 3, 2, 1.0, bad=True),))  # shares a's image
    failed = runner.run_encoders(step({"a": [0], "b": [0], "c": [0]}))
    assert sorted(failed) == ["a", "c"]
    assert model.batches == [2] and "good" in runner.store and "bad" not in runner.store
