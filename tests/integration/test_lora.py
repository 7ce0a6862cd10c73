"""LoRA fine-tuning (`lora.r > 0`) and adapters in the pipeline, on the tiny models of tests/helpers:
train -> save -> load -> generate in both layouts, trainable-only checkpoints, fuse / unfuse / unload,
context caching and pipe.compile with an adapter, ill-fitting adapters refused, FSDP and compiled
blocks, a resume after SIGKILL to the same bits, and two-process DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from medim import MeDiMPipeline
from medim.data.cache import build_token_cache
from medim.data.datasets import build_dataset
from medim.training import Trainer
from medim.training import checkpoint as ckpt
from medim.training.config import load_config
from tests.helpers.pipeline import IMAGE_LEN, TEXT_LEN, V1_LAYOUT, write_upstream
from tests.helpers.training import REPO, assert_same_tensors, leave_worker, tiny_config, tiny_run

PROMPTS = ["A large dense nodule in the right upper zone.", "No focal lesion."]
# A high learning rate, so that four steps move the adapters far enough to change sampled tokens.
LORA = ("lora.r=4", "lora.alpha=8", "optim.lr=5e-2", "optim.warmup_steps=0", "optim.scheduler=constant_with_warmup")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per layout, a saved tiny base pipeline and a phantom token cache built with it."""
    root = tmp_path_factory.mktemp("lora")
    paths = write_upstream(root / "upstream")
    pipes = {
        "medim-v1": MeDiMPipeline.from_original(paths["release"], backbone=paths["liquid"],
                                                tokenizer=paths["llama_tokenizer"], vqgan=paths["space"],
                                                num_layers=2, layout=V1_LAYOUT),
        "native": MeDiMPipeline.from_base_models(paths["liquid"], vqgan=paths["space"], num_layers=2,
                                                 text_len=TEXT_LEN, image_len=IMAGE_LEN, image_offset=200),
    }
    out = {}
    for name, pipe in pipes.items():
        base, cache = root / f"base-{name}", root / f"cache-{name}"
        pipe.save_pretrained(base)
        with warnings.catch_warnings():  # the tiny layouts truncate the phantom reports
            warnings.simplefilter("ignore", UserWarning)
            build_token_cache(build_dataset("phantom", n=12, seed=0, size=32), cache, vqgan=pipe.vqgan,
                              tokenizer=pipe.tokenizer, layout=pipe.layout, shard_size=8, batch_size=4,
                              show_progress=False)
        out[name] = (base, cache)
    return out


def config(base: Path, cache: Path, out: Path, *overrides: str):
    return load_config(REPO / "configs/tiny.yaml", [
        f"model.init={base}", f"data.cache={cache}", f"train.output_dir={out}", "train.max_steps=4",
        "log.every=1", "eval.every=0", "checkpoint.every=2", *LORA, *overrides])


def pipeline(base: Path) -> MeDiMPipeline:
    pipe = MeDiMPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokens(pipe: MeDiMPipeline, **options) -> list[torch.Tensor]:
    opts = dict(num_inference_steps=4, output_type="tokens", **options)
    return [pipe.text_to_image(PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(2)], **opts).tokens,
            pipe.generate_pairs(PROMPTS[:1], generator=torch.Generator().manual_seed(5), **opts).tokens]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- train -> save -> load -> generate
@pytest.mark.parametrize("layout, extra", [("medim-v1", ()),
                                           ("native", ("train.precision=bf16", "model.gradient_checkpointing=true"))])
def test_lora_train_save_load_generate(bases, tmp_path, layout, extra):
    base, cache = bases[layout]
    trainer = Trainer(config(base, cache, tmp_path / "run", *extra))
    out = trainer.fit()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(".adaLN_modulation." in n for n in trainable) == 2 * 2  # A and B in both layers

    # Checkpoints hold the trainable weights (and their AdamW state) only.
    state = ckpt.load_checkpoint(out.checkpoint_dir)
    assert set(state["model"]) == trainable
    assert {k.rsplit("/", 1)[0] for k in load_file(out.checkpoint_dir / "optimizer.safetensors")} == trainable

    # final/ is a PEFT adapter folder with a model card.
    assert sorted(p.name for p in out.final_dir.iterdir()) == ["README.md", "adapter_config.json",
                                                               "adapter_model.safetensors"]
    config_json = json.loads((out.final_dir / "adapter_config.json").read_text())
    assert (config_json["peft_type"], config_json["r"], config_json["lora_alpha"]) == ("LORA", 4, 8.0)
    card = ModelCard.load(out.final_dir / "README.md").data
    assert (card.base_model, card.library_name) == (str(base), "medim") and "lora" in card.tags
    saved = load_file(out.final_dir / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.layers.") for k in saved)

    pipe = pipeline(base)
    plain = tokens(pipe)
    assert pipe.load_lora_weights(out.final_dir) is pipe
    adapted = tokens(pipe)
    assert not same(adapted, plain)  # the adapter changes what is sampled
    pipe.fuse_lora()
    assert same(tokens(pipe), adapted)
    pipe.unfuse_lora()
    assert same(tokens(pipe), adapted)
    again = pipe.save_lora_weights(tmp_path / "again")
    assert load_file(again / "adapter_model.safetensors").keys() == saved.keys()
    pipe.unload_lora_weights()
    assert same(tokens(pipe), plain)
    assert not any("lora" in n for n, _ in pipe.model.named_parameters())


def test_save_pretrained_refuses_a_loaded_adapter_and_saves_it_baked_in(bases, tmp_path):
    """peft's wrapped modules would be written as `base_layer` / `lora_A` keys that no load reads:
    save_pretrained refuses (fused or not, push_to_hub too) before writing anything, and the recipe
    its error gives saves a pipeline that samples what the adapted one did."""
    base, cache = bases["native"]
    final = Trainer(config(base, cache, tmp_path / "run", "checkpoint.every=0")).fit().final_dir
    pipe = pipeline(base).load_lora_weights(final)
    adapted = tokens(pipe)
    for fused in (False, True):
        if fused:
            pipe.fuse_lora()
        with pytest.raises(ValueError, match=r"LoRA adapter .* is loaded.*fuse_lora\(\).unload_lora_weights\(\)"):
            pipe.save_pretrained(tmp_path / "saved")
        assert not (tmp_path / "saved").exists()
        with pytest.raises(ValueError, match="is loaded"):  # before any Hub call (none is reachable here)
            pipe.push_to_hub("my-org/never-created")
    merged = pipeline(pipe.unload_lora_weights().save_pretrained(tmp_path / "saved"))
    assert same(tokens(merged), adapted)


def test_adapter_with_context_caching_and_compile(bases, tmp_path):
    base, cache = bases["native"]
    final = Trainer(config(base, cache, tmp_path / "run", "checkpoint.every=0")).fit().final_dir
    pipe = pipeline(base).load_lora_weights(final)
    eager = tokens(pipe)
    # Context caching runs the wrapped modules too: the same tokens as with the adapter fused in.
    cached = tokens(pipe, cache_interval=2)
    pipe.fuse_lora()
    assert same(tokens(pipe, cache_interval=2), cached)
    pipe.unfuse_lora()
    torch._dynamo.reset()
    try:
        pipe.compile(backend="eager")
        assert same(tokens(pipe), eager)
        pipe.unload_lora_weights()  # modules swapped back: the compiled denoiser follows
        assert same(tokens(pipe), tokens(pipeline(base)))
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------- ill-fitting adapters
def test_ill_fitting_adapters_are_refused(bases, tmp_path):
    native_base, cache = bases["native"]
    final = Trainer(config(native_base, cache, tmp_path / "run", "checkpoint.every=0")).fit().final_dir
    v1 = pipeline(bases["medim-v1"][0])
    before = {k: v.clone() for k, v in v1.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"trained on another base \(layout\): .*name: 'native' in the adapter, "
                                         r"'medim-v1' here"):
        v1.load_lora_weights(final)

    pipe = pipeline(native_base)
    broken = tmp_path / "broken"
    shutil.copytree(final, broken)
    tensors = load_file(broken / "adapter_model.safetensors")  # no metadata: only names and shapes to go by
    key = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
    width = tensors[key].shape[1]
    tensors[key] = torch.zeros(5, width)
    del tensors["base_model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \(1\): .*layers.1.mlp.up_proj.lora_B.weight[\s\S]*wrong shape "
                                         rf"\(1\): .*q_proj.lora_A.weight: file \(5, {width}\) vs model "
                                         rf"\(4, {width}\)"):
        pipe.load_lora_weights(broken)

    config_json = json.loads((final / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config_json, "target_modules": ["q_proj", "qkv"]}))
    with pytest.raises(ValueError, match=r"target_modules: \['qkv'\] match no module"):
        pipe.load_lora_weights(broken)
    (broken / "adapter_config.json").write_text(json.dumps({**config_json, "use_dora": True}))
    with pytest.raises(ValueError, match=r"sets \['use_dora'\], which medim does not support"):
        pipe.load_lora_weights(broken)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(final / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"no adapter_model.safetensors \(\['adapter_model.bin'\] found: pickled"):
        pipe.load_lora_weights(pickled)
    assert not any("lora" in k for k in pipe.model.state_dict())  # nothing was injected by a refused load
    assert all(torch.equal(v, v1.model.state_dict()[k]) for k, v in before.items())

    pipe.load_lora_weights(final, adapter_name="cxr")
    with pytest.raises(ValueError, match="adapter 'cxr' .* is loaded: call pipe.unload_lora_weights"):
        pipe.load_lora_weights(final)
    with pytest.raises(ValueError, match="no LoRA adapter is loaded"):
        pipeline(native_base).fuse_lora()


def test_unknown_targets_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"lora.target_modules: \['qkv_proj'\] match no module of the model; "
                                         r"linear layers are named \[.*'q_proj'"):
        Trainer(tiny_config(tmp_path, "run", "lora.r=4", "lora.target_modules=[q_proj,qkv_proj]"))
    with pytest.raises(ValueError, match=r"lora.target_modules: \['mlp'\] are not linear layers"):
        Trainer(tiny_config(tmp_path, "run", "lora.r=4", "lora.target_modules=[mlp]"))


def test_liquid_recipe_trains_adaln_and_timestep_embedding_in_full(tmp_path):
    """From a base MLLM: adapters on the backbone, AdaLN and the timestep embedder trained in full."""
    targets = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
    trainer = Trainer(tiny_config(tmp_path, "run", *LORA, "train.max_steps=2", "eval.every=0", "checkpoint.every=0",
                                  f"lora.target_modules={targets}",
                                  "lora.modules_to_save=[adaLN_modulation,time_embedder]"))
    out = trainer.fit()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any(".adaLN_modulation.modules_to_save." in n for n in trainable)
    assert any(n.startswith("time_embedder.modules_to_save.") for n in trainable)
    pipe = pipeline(tiny_run(tmp_path)[0])
    plain = tokens(pipe)
    adapted = tokens(pipe.load_lora_weights(out.final_dir))
    assert not same(adapted, plain)
    assert same(tokens(pipe.fuse_lora()), adapted)
    pipe.unload_lora_weights()  # fused: the trained modules stay, baked in
    assert same(tokens(pipe), adapted)


# ---------------------------------------------------------------- FSDP, compiled blocks
def test_lora_under_fsdp_with_bf16_and_checkpointing(tmp_path):
    import torch.distributed as dist

    common = (*LORA, "train.max_steps=3", "eval.every=0", "checkpoint.every=0", "train.precision=bf16")
    plain = Trainer(tiny_config(tmp_path, "a", *common))
    plain.fit()
    try:  # FSDP2 on a one-member process group
        fsdp = Trainer(tiny_config(tmp_path, "b", *common, "train.parallel=fsdp", "model.gradient_checkpointing=true"))
        out = fsdp.fit()
    finally:
        dist.destroy_process_group()
    a, b = (load_file(Path(r) / "final" / "adapter_model.safetensors") for r in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys()
    moved = torch.cat([a[k].flatten() for k in a if "lora_B" in k]).abs().mean()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a if "lora_B" in k]).abs().mean()
    assert diff < 0.1 * moved  # bf16 weights in every op under FSDP: close to autocast, not equal
    pipeline(tiny_run(tmp_path)[0]).load_lora_weights(out.final_dir)


@pytest.mark.slow
def test_lora_compiled_blocks_train_like_eager(tmp_path):
    common = (*LORA, "train.max_steps=2", "eval.every=0", "checkpoint.every=0")
    eager = Trainer(tiny_config(tmp_path, "a", *common))
    eager.fit()
    compiled = Trainer(tiny_config(tmp_path, "b", *common, "train.compile=true", "model.gradient_checkpointing=true"))
    compiled.fit()
    a, b = (load_file(tmp_path / r / "final" / "adapter_model.safetensors") for r in ("a", "b"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert [r["loss"] for r in compiled.history] == pytest.approx([r["loss"] for r in eager.history], rel=1e-5)


# ---------------------------------------------------------------- SIGKILL and resume
DRIVER = textwrap.dedent('''
    """python driver.py AT ARGS: run `medim train ARGS`, SIGKILLed before step AT (0: never)."""
    import os, signal, sys

    import torch

    from medim.cli import main
    from medim.training import trainer as tr

    at, args = int(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    step = tr.Trainer.train_step

    def train_step(self):
        if at and self.step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self)

    tr.Trainer.train_step = train_step
    sys.exit(main(["train", *args]))
''')


@pytest.mark.slow
def test_lora_resume_after_sigkill_is_bit_exact(tmp_path):
    base, cache = tiny_run(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    def train(out: str, at: int = 0) -> int:
        args = ["--config", str(REPO / "configs/tiny.yaml"), f"model.init={base}", f"data.cache={cache}",
                f"train.output_dir={tmp_path / out}", "train.max_steps=6", "checkpoint.every=2", "log.every=1",
                "eval.every=0", "optim.ema_decay=0.9", "lora.r=4", "lora.dropout=0.1", "checkpoint.resume=latest"]
        run = subprocess.run([sys.executable, str(driver), str(at), *args], env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode in (0, -signal.SIGKILL), run.stderr[-3000:]
        return run.returncode

    assert train("straight") == 0
    assert train("killed", at=3) == -signal.SIGKILL  # step 3 lost, checkpoint_2 the newest
    assert train("killed") == 0
    a, b = tmp_path / "straight", tmp_path / "killed"
    assert_same_tensors(a, b, [f"checkpoints/checkpoint_00000006/{name}.safetensors"
                               for name in ("model", "ema", "optimizer")] + ["final/adapter_model.safetensors"])
    assert all(".lora_" in k for k in load_file(a / "checkpoints/checkpoint_00000006/model.safetensors"))


# ---------------------------------------------------------------- two processes (DDP)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, tmp: str, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(Path(tmp), "ddp", *LORA, "train.max_steps=3", "train.parallel=ddp",
                                  "train.micro_batch_size=2", "eval.every=0", "checkpoint.every=0"))
    out = trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps({"same": bool(torch.equal(flat, ref)),
                                                            "final": str(out.final_dir)}))
    leave_worker()


@pytest.mark.slow
def test_lora_two_process_ddp(tmp_path):
    tiny_run(tmp_path)
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["same"] for r in results)
    pipe = pipeline(tiny_run(tmp_path)[0])
    assert not same(tokens(pipe.load_lora_weights(results[0]["final"])), tokens(pipeline(tiny_run(tmp_path)[0])))


def test_generate_with_lora_on_the_command_line(bases, tmp_path, capsys):
    from medim.cli import main

    base, cache = bases["native"]
    out = Trainer(config(base, cache, tmp_path / "run")).fit()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def generate(name: str, *extra: str) -> dict[str, bytes]:
        folder = tmp_path / name
        main(["generate", "image", "--model", str(base), "--prompts", str(prompts), "--out", str(folder),
              "--num-inference-steps", "4", "--device", "cpu", *extra])
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}

    plain = generate("plain")
    adapted = generate("adapted", "--lora", str(out.final_dir))
    assert plain.keys() == adapted.keys() and plain != adapted  # the adapter changes the images
    assert generate("fused", "--lora", str(out.final_dir), "--fuse-lora") == adapted
    manifest = (tmp_path / "adapted" / "manifest.jsonl").read_text()
    assert str(out.final_dir) in manifest  # a resume with another adapter is another run
    with pytest.raises(SystemExit, match="--lora .*: no such folder"):
        generate("missing", "--lora", str(tmp_path / "nope"))
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- trainable token rows
def test_trainable_token_rows_train_save_fuse_and_unload(bases, tmp_path):
    base, cache = bases["native"]
    trainer = Trainer(config(base, cache, tmp_path / "run", "lora.trainable_tokens=[nodule, ',']"))
    rows = trainer.lora_config.trainable_token_indices
    tokenizer = trainer.pipe.tokenizer
    assert rows and set(tokenizer(" nodule", add_special_tokens=False)["input_ids"]) <= set(rows)
    before = trainer.model.get_input_embeddings().weight.detach().clone()
    out = trainer.fit()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert "embed_tokens.token_adapter.trainable_tokens_delta.default" in trainable
    assert set(ckpt.load_checkpoint(out.checkpoint_dir)["model"]) == trainable
    saved = load_file(out.final_dir / "adapter_model.safetensors")
    delta = saved["base_model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert delta.shape == (len(rows), before.shape[1]) and not torch.equal(delta, before[rows])  # the rows moved
    assert json.loads((out.final_dir / "adapter_config.json").read_text())["trainable_token_indices"] == rows

    pipe = pipeline(base)
    plain = tokens(pipe)
    head = pipe.model.get_output_embeddings().weight.detach().clone()
    pipe.load_lora_weights(out.final_dir)
    adapted = tokens(pipe)
    # The tied head reads the trained rows too; every other row is the base's.
    trained_head = pipe.model.get_output_embeddings().weight.detach()
    assert torch.equal(trained_head[rows], delta)
    others = [i for i in range(head.shape[0]) if i not in rows]
    assert torch.equal(trained_head[others], head[others])
    pipe.fuse_lora()
    assert same(tokens(pipe), adapted)
    pipe.unfuse_lora()
    assert same(tokens(pipe), adapted)
    pipe.unload_lora_weights()
    assert same(tokens(pipe), plain)
    assert torch.equal(pipe.model.get_output_embeddings().weight, head)
    assert pipe.model.get_output_embeddings().weight is pipe.model.get_input_embeddings().weight  # still tied


def test_trainable_token_rows_outside_the_vocabulary_are_refused(bases, tmp_path):
    base, cache = bases["native"]
    final = Trainer(config(base, cache, tmp_path / "run", "checkpoint.every=0",
                           "lora.trainable_tokens=[nodule]")).fit().final_dir
    config_file = final / "adapter_config.json"
    data = json.loads(config_file.read_text())
    data["trainable_token_indices"] = [10**6]
    config_file.write_text(json.dumps(data))
    pipe = pipeline(base)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        pipe.load_lora_weights(final)
    assert not any("token_adapter" in n for n, _ in pipe.model.named_modules())
