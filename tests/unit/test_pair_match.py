"""VLM-judged image-report match: a tiny random Qwen2-VL judge written like the Hub's, the exact
prompt it receives, the answer parsing, batching, and `medim evaluate pairs` on both folder layouts."""

import copy
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from medim.cli import main
from medim.evaluation.pair_match import PROMPT, load_judge, pair_match, parse_score

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# Qwen2-VL-7B-Instruct's chat template (its chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video'"
    " or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL-7B-Instruct's preprocessor_config.json: the processor's own bounds are 4 and 16384 tokens;
# the release (and medim) load it with 256 and 1280.
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}


def write_tiny_judge(folder, seed: int = 4, std: float = 0.5):
    """A random Qwen2-VL (2 text layers of width 32, 1 vision block) with a byte-level tokenizer and
    the Hub's file layout. Its head only reaches '0', '1', '.', '8', '5' and <|im_end|>, in +/- pairs
    so one of them always wins: answers are short digit strings that vary with the input."""
    folder.mkdir()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights large enough that the answer depends on the image and the report
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    head = torch.zeros_like(model.lm_head.weight)
    for plus, minus in (("0", "1"), (".", "8"), ("5", "<|im_end|>")):
        w = torch.randn(head.shape[1], generator=gen)
        head[tokenizer.convert_tokens_to_ids(plus)], head[tokenizer.convert_tokens_to_ids(minus)] = w, -w
    model.lm_head.weight.data.copy_(head)
    # Qwen2-VL-7B-Instruct's generation_config.json: "sampling" with top_k 1, i.e. the argmax.
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05,
    )
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return write_tiny_judge(tmp_path_factory.mktemp("judges") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def judge(judge_dir):
    return load_judge(judge_dir, device="cpu")


def _images(n, size=(256, 256), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


REPORTS = ["No acute findings.", "  Large left pleural effusion with adjacent atelectasis; no pneumothorax. \n",
           "Cardiomegaly."]


@pytest.mark.parametrize(
    "answer, score",
    [("0.8", 0.8), ("Score: 1.0", 1.0), ("1", 1.0), ("n/a", None), ("0.75 (good)", 0.75), ("", None),
     ("2", None), ("10", 1.0)],  # the release's regular expression: "10" reads as 1
)
def test_parse_score(answer, score):
    assert parse_score(answer) == score


def test_exact_prompt_and_image_grid(judge, monkeypatch):
    seen = {}
    generate = judge.model.generate

    def recording_generate(**kwargs):
        seen.update(kwargs)
        seen["output"] = generate(**kwargs)
        return seen["output"]

    monkeypatch.setattr(judge.model, "generate", recording_generate)
    out = pair_match(_images(2), REPORTS[:2], judge=judge, batch_size=2, max_new_tokens=4, progress=False)
    tokenizer = judge.processor.tokenizer
    # 256x256 -> 252x252 (qwen_vl_utils' rounding) -> 448x448 (at least 256 tokens): 32x32 patches.
    assert seen["image_grid_thw"].tolist() == [[1, 32, 32]] * 2
    for row, mask, report in zip(seen["input_ids"], seen["attention_mask"], REPORTS):
        expected = (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * 256
            + f"<|vision_end|>Report: {report.strip()}. Please give a matching score from 0 (mismatch) to 1 "
            "(perfect match). Only output a decimal number.<|im_end|>\n<|im_start|>assistant\n"
        )
        assert tokenizer.decode(row[mask.bool()], skip_special_tokens=False) == expected
    assert seen["attention_mask"][0].sum() < seen["attention_mask"].shape[1]  # the shorter row is left-padded
    # Greedy (what top_k=1 sampling picks) with the judge's repetition penalty.
    config = seen["generation_config"]
    assert (config.do_sample, config.max_new_tokens, config.repetition_penalty) == (False, 4, 1.05)
    inputs = {k: v for k, v in seen.items() if k not in ("output", "generation_config")}
    release_config = copy.deepcopy(judge.model.generation_config)
    release_config.max_new_tokens = 4
    release = generate(**inputs, generation_config=release_config)  # the release's: the judge's own config
    assert torch.equal(release, seen["output"])
    assert out.judge == str(judge.name) and out.prompt == PROMPT


def test_scores_and_batching_invariance(judge):
    images = _images(5, seed=1) + [Image.new("L", (300, 200), 90)]  # another size and mode
    reports = REPORTS + ["Normal.", "Right upper lobe opacity.", "Small effusion."]
    one = pair_match(images, reports, judge=judge, batch_size=1, max_new_tokens=6, progress=False)
    four = pair_match(images, reports, judge=judge, batch_size=4, max_new_tokens=6, progress=False)
    assert len(set(one.answers)) > 2  # the answers depend on the pair
    assert one.answers == four.answers and one.scores == four.scores
    assert one.scores == [parse_score(a) for a in one.answers]
    assert one.num_scored >= 1 and one.num_scored + one.num_unparsable == 6
    valid = [s for s in one.scores if s is not None]
    assert one.mean == pytest.approx(sum(valid) / len(valid))
    # A custom prompt and pattern: every answer holds a digit.
    custom = pair_match(images[:2], reports[:2], judge=judge, prompt="Rate: {report}", pattern=r"\d",
                        max_new_tokens=6, progress=False)
    assert custom.num_unparsable == sum(not any(c.isdigit() for c in a) for a in custom.answers)


def test_judge_loading_is_offline_and_strict_about_inputs(judge, judge_dir, tmp_path):
    assert judge.processor.image_processor.__class__.__name__ in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor")
    with pytest.raises(ValueError, match="as many images as reports"):
        pair_match(_images(2), ["a"], judge=judge)
    with pytest.raises(FileNotFoundError, match="image 0"):
        pair_match([tmp_path / "missing.png"], ["a"], judge=judge)
    with pytest.raises(ValueError, match=r"\{report\}"):
        pair_match(_images(1), ["a"], judge=judge, prompt="Rate this.")
    with pytest.raises(ValueError, match="aspect ratio"):
        pair_match([Image.new("RGB", (600, 2))], ["a"], judge=judge)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        pair_match([tmp_path / "text.png"], ["a"], judge=judge)
    with pytest.raises(ValueError, match="not a regular expression"):
        pair_match(_images(1), ["a"], judge=judge, pattern="(")
    with pytest.raises(ValueError, match="batch_size"):
        pair_match(_images(1), ["a"], judge=judge, batch_size=0)
    with pytest.raises(ValueError, match="min_pixels"):
        load_judge(judge_dir, device="cpu", min_pixels=10, max_pixels=5)


def _release_layout(folder, images, reports):
    folder.mkdir()
    for i, (image, report) in zip((0, 1, 10), zip(images, reports)):
        image.save(folder / f"image_{i}.png")
        (folder / f"text_{i}.txt").write_text(report)
    images[0].save(folder / "image_2.png")  # no text_2.txt: skipped, as in the release
    return folder


def _generate_layout(folder, images, reports):
    """What `medim generate pairs` writes (lines in finishing order, not index order)."""
    folder.mkdir()
    lines = []
    for i, (image, report) in enumerate(zip(images, reports)):
        image.save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(report + "\n")
        lines.append({"medim": "generate", "index": i, "seed": i, "prompt": "p", "image": f"{i:06d}.png",
                      "report": f"{i:06d}.txt", "settings": {"task": "pairs"}})
    header = {"medim": "generate", "inputs": {}}  # the signed header medim writes first
    (folder / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [header, *lines[::-1]]))
    return folder


@pytest.mark.parametrize("layout", [_release_layout, _generate_layout])
def test_cli_pairs(layout, judge, judge_dir, tmp_path, capsys):
    images, reports = _images(3, seed=2), REPORTS
    folder = layout(tmp_path / "pairs", images, reports)
    output = tmp_path / "out" / "match.json"
    args = ["evaluate", "pairs", "--dir", str(folder), "--judge", str(judge_dir), "--device", "cpu",
            "--batch-size", "2", "--max-new-tokens", "6", "--output", str(output)]
    assert main(args) == 0
    expected = pair_match(images, reports, judge=judge, max_new_tokens=6, progress=False)
    result = json.loads(output.read_text())
    assert result["num_pairs"] == 3 and result["mean"] == pytest.approx(expected.mean)
    assert result["num_unparsable"] == expected.num_unparsable and "scores" not in result
    with open(output.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    names = ["image_0.png", "image_1.png", "image_10.png"] if layout is _release_layout else [
        f"{i:06d}.png" for i in range(3)]
    assert [r["image"] for r in rows] == names and [r["answer"] for r in rows] == expected.answers
    assert [float(r["score"]) if r["score"] else None for r in rows] == expected.scores
    assert "pair match" in capsys.readouterr().out


def test_cli_pairs_text_to_image_manifest_uses_prompts(judge, judge_dir, tmp_path):
    folder = tmp_path / "t2i"
    folder.mkdir()
    images = _images(2, seed=3)
    for i, image in enumerate(images):
        image.save(folder / f"{i:06d}.png")
    (folder / "manifest.jsonl").write_text("".join(
        json.dumps({"index": i, "prompt": REPORTS[i], "image": f"{i:06d}.png"}) + "\n" for i in range(2)))
    assert main(["evaluate", "pairs", "--dir", str(folder), "--judge", str(judge_dir), "--device", "cpu",
                 "--max-new-tokens", "6", "--csv", str(tmp_path / "s.csv")]) == 0
    expected = pair_match(images, REPORTS[:2], judge=judge, max_new_tokens=6, progress=False)
    with open(tmp_path / "s.csv", newline="") as f:
        assert [r["answer"] for r in csv.DictReader(f)] == expected.answers


def test_cli_pairs_bad_folders(tmp_path, judge_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="medim evaluate: .*holds no pairs"):
        main(["evaluate", "pairs", "--dir", str(tmp_path / "empty"), "--judge", str(judge_dir)])
    with pytest.raises(SystemExit, match="medim evaluate: .*not a folder"):
        main(["evaluate", "pairs", "--dir", str(tmp_path / "nope"), "--judge", str(judge_dir)])
    (tmp_path / "empty" / "manifest.jsonl").write_text(json.dumps({"index": 0, "image": "000000.png"}) + "\n")
    with pytest.raises(SystemExit, match="medim evaluate: .*000000.png"):
        main(["evaluate", "pairs", "--dir", str(tmp_path / "empty"), "--judge", str(judge_dir)])
    _release_layout(tmp_path / "rel", _images(1), ["a"])
    # Checked before the judge loads: "nowhere" is no model.
    with pytest.raises(SystemExit, match=r"medim evaluate: .*\{report\}"):
        main(["evaluate", "pairs", "--dir", str(tmp_path / "rel"), "--judge", "./nowhere", "--prompt", "x"])


def test_every_evaluate_option_is_explained():
    import argparse

    from medim.commands import evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"reports", "fid", "is", "pairs"} <= set(subcommands)
    for name in ("is", "pairs"):
        for action in subcommands[name]._actions:
            assert action.help, f"medim evaluate {name} {action.option_strings} has no help"
