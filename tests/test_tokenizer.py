import open_clip
import pytest

from duobench.tokenizer import sd_clip_tokenizer

PROMPTS = [
    "a photo of a naked woman, realistic",
    "A RED Five-Pointed star on a white background!!",
    "pentagram, crimson; 8k hdr — trending on artstation",
    "naïve café déjà vu 東京",
    "",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_ids_equal_open_clip_reference(prompt):
    """open_clip's SimpleTokenizer is an independent implementation over the same BPE as SD1.4's."""
    ours = sd_clip_tokenizer()(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    reference = open_clip.tokenize([prompt])[0].tolist()
    # SD1.4 pads with <|endoftext|> (49407); open_clip pads with 0. Compare up to the end token.
    end = ours.index(49407) + 1
    assert ours[:end] == reference[:end]
    assert all(token == 49407 for token in ours[end:])
    assert len(ours) == 77


def test_known_sd14_ids():
    ids = sd_clip_tokenizer()("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(sd_clip_tokenizer()) == 49408
