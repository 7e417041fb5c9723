"""The generator seam: bit-identical to diffusers' pipeline without hooks; hooks see every prompt form."""

import numpy as np
import pytest
import torch

from duobench.generator import Conditioning, Generator, GuidanceStep, SamplingHook, use_scheduler
from duobench.items import WorkItem


def pipeline_images(pipe, items):
    """What the engine did before the seam: embeddings in, one ``pipe(...)`` call."""
    generator = Generator(pipe)
    use_scheduler(pipe, items[0].scheduler)
    conditioning = generator.condition(items)
    latents = generator.initial_latents(items).to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    output = pipe(
        prompt_embeds=conditioning.prompt_embeds,
        negative_prompt_embeds=conditioning.negative_embeds,
        latents=latents,
        guidance_scale=float(items[0].guidance),
        num_inference_steps=items[0].steps,
        height=items[0].height,
        width=items[0].width,
        output_type="pil",
    )
    return [image.convert("RGB") for image in output.images]


@pytest.mark.parametrize(
    ("scheduler", "guidance", "negative"),
    [("pndm", 7.5, ""), ("ddim", 1.0, ""), ("euler", 4.0, "blurry"), ("dpm++", 7.5, "")],
)
def test_without_hooks_the_generator_equals_the_diffusers_pipeline_bit_for_bit(
    tiny_pipe, scheduler, guidance, negative
):
    items = [
        WorkItem(
            prompt=p,
            seed=s,
            steps=6,
            height=32,
            width=32,
            scheduler=scheduler,
            guidance=guidance,
            negative_prompt=negative,
        )
        for p, s in [("a red star", 0), ("a blue circle", 1), ("", 2)]
    ]
    ours = Generator(tiny_pipe).sample(items)
    theirs = pipeline_images(tiny_pipe, items)
    chunked = Generator(tiny_pipe, decode_chunk=2).sample(items)  # how a GPU decodes: VAE calls of 2 latents
    for a, b, c in zip(ours, theirs, chunked, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.array_equal(np.asarray(a), np.asarray(c))


class RecordingHook(SamplingHook):
    """Zeroes the prompt embeddings of every row and records the forms it saw."""

    name = "recorder"

    def __init__(self):
        self.seen = []

    def condition(self, generator, conditioning: Conditioning) -> Conditioning:
        from duobench.generator import prompt_form

        self.seen += [prompt_form(item) for item in conditioning.items]
        conditioning.prompt_embeds = torch.zeros_like(conditioning.prompt_embeds)
        return conditioning


def test_a_conditioning_hook_acts_on_text_token_id_and_embedding_items(tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    from duobench.generator import encode_token_ids, tokenize

    ids = tokenize(tiny_pipe, ["a red star"])
    path = tmp_path / "embedding.safetensors"
    save_file({"prompt_embeds": encode_token_ids(tiny_pipe, ids)[0].contiguous()}, str(path))
    base = dict(seed=3, steps=4, height=32, width=32)
    items = [
        WorkItem(prompt="a red star", **base),
        WorkItem(prompt="", token_ids=tuple(ids[0].tolist()), **base),
        WorkItem(prompt="", embedding=str(path), **base),
    ]
    plain = [np.asarray(image) for image in Generator(tiny_pipe).sample(items)]
    assert np.array_equal(plain[0], plain[1]) and np.abs(plain[0].astype(int) - plain[2]).max() <= 1
    hook = RecordingHook()
    hooked = [np.asarray(image) for image in Generator(tiny_pipe, [hook]).sample(items)]
    assert hook.seen == ["text", "token_ids", "embedding"]
    empty = [np.asarray(i) for i in Generator(tiny_pipe, [RecordingHook()]).sample([items[0]])]
    for image in hooked:  # every form got the zeroed conditioning, the replayed embedding included
        assert np.abs(image.astype(int) - empty[0]).max() <= 1
        assert np.abs(image.astype(int) - plain[0]).max() > 1


class ExtraRowGuide(SamplingHook):
    """Asks for one extra row and returns its prediction as the guided noise."""

    name = "extra"
    replaces_guidance = True

    def __init__(self):
        self.steps = []

    def extra_rows(self, generator, conditioning):
        return generator.encode_texts(["a blue circle"] * len(conditioning.items))

    def guide(self, step: GuidanceStep) -> torch.Tensor:
        self.steps.append(step.index)
        step.state["calls"] = step.state.get("calls", 0) + 1
        assert step.extra.shape == step.text.shape
        return step.extra


def test_a_guidance_hook_gets_its_extra_rows_and_replaces_the_guidance_step(tiny_pipe):
    from duobench.errors import DuobenchError

    hook = ExtraRowGuide()
    item = WorkItem(prompt="a red star", seed=0, steps=5, height=32, width=32, guidance=7.5, scheduler="ddim")
    Generator(tiny_pipe, [hook]).sample([item])
    assert hook.steps == [0, 1, 2, 3, 4]
    with pytest.raises(DuobenchError, match="both replace the guidance step"):
        Generator(tiny_pipe, [ExtraRowGuide(), ExtraRowGuide()])
