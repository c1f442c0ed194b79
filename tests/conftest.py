"""Shared test fixtures: tiny Hugging Face Llama models made with transformers, their
megatron conversions, and a launcher for multi-process (gloo) tests."""

import json
import os
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import pytest
import torch
from hypothesis import settings

REPO = Path(__file__).resolve().parent.parent

# Property tests draw the same examples on every run (a red CI is then reproducible), and
# keep no example database in the working tree.
settings.register_profile("megarlhf", derandomize=True, database=None)
settings.load_profile("megarlhf")
VOCAB = 1101  # not divisible by 2: the padded vocabulary differs between TP=1 and TP=2


def served(entry: str, *args, threads: Optional[str] = None, env_extra: Optional[dict] = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """``python ENTRY ARGS`` run from the repository as a new process would run it (see
    tests/cli_fork.py: forked from a server that has imported the commands once), with
    ``OMP_NUM_THREADS=threads`` (unset: the command shares the cores between its ranks)."""
    from tests.cli_fork import run_cli

    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    return run_cli(list(args), env, str(REPO), timeout, entry=entry)


@contextmanager
def one_rank(seed: int):
    """This process as a one-rank gloo job with megatron's model-parallel state (TP = PP =
    DP = 1), one thread; yields the :class:`~megarlhf.parallel.ModelParallel`."""
    from megarlhf.config import ParallelConfig
    from megarlhf.parallel import DistEnv, destroy, init_distributed, initialize_model_parallel

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed(DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                             master_port=port, source="test"))
    try:
        yield initialize_model_parallel(ParallelConfig(), seed=seed)
    finally:
        destroy()


def megarlhf(*args, **kw) -> subprocess.CompletedProcess:
    """``megarlhf ARGS`` (:func:`served`; same keywords)."""
    return served("-m megarlhf.cli", *args, **kw)


def launch(script: str, nproc: int, *args: str, timeout: int = 300) -> str:
    """Run ``script`` as ``nproc`` gloo ranks, one thread each, with megarlhf's local launcher
    (``python -m megarlhf.launch``, :func:`served`: the script's imports are loaded already,
    then the ranks fork). Returns the combined output; raises with its tail on failure."""
    argv = [f"--nproc-per-node={nproc}", str(REPO / script), *map(str, args)]
    res = served("-m megarlhf.launch", *argv, threads="1", timeout=timeout)
    out = res.stdout + res.stderr
    if res.returncode != 0:
        raise AssertionError(f"megarlhf.launch {' '.join(argv)} failed ({res.returncode}):\n{out[-6000:]}")
    return out


def run_tool(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python tools/SCRIPT ARGS`` with one thread (:func:`served`)."""
    return served(str(REPO / script), *map(str, args), threads="1", timeout=timeout)


def make_hf_llama(path: Path, *, reward: bool = False, llama3_rope: bool = True,
                  tied: bool = False, safe: bool = True, seed: int = 0) -> Path:
    """A tiny random HF Llama: GQA (4 heads, 2 KV heads), vocabulary 1101."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied, pad_token_id=0)
    if llama3_rope:
        kwargs.update(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    else:
        kwargs.update(rope_theta=10000.0)
    if reward:
        cfg = LlamaConfig(num_labels=1, **kwargs)
        model = LlamaForSequenceClassification(cfg)
    else:
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    # Non-trivial norm weights, so a swapped or dropped norm cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.eval().save_pretrained(path)
    if not safe:  # the older pytorch_model.bin format, still common on the hub
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if tied:
            state.pop("lm_head.weight", None)  # as save_pretrained drops tied copies
        torch.save(state, path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return path


def hf_reference(hf_dir: Path, tokens: torch.Tensor):
    """(logits, per-token log-probs of the next token) or per-token reward values."""
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(hf_dir)
    with torch.no_grad():
        if cfg.architectures[0] == "LlamaForSequenceClassification":
            m = LlamaForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
            hidden = m.model(tokens).last_hidden_state
            return {"values": m.score(hidden)[..., 0]}
        m = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        logits = m(tokens).logits.float()
        lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        return {"logits": logits, "logprobs": lp, "hidden": m.model(tokens).last_hidden_state}


def convert(hf_dir: Path, out: Path, *extra: str) -> Path:
    """tools/convert_hf_to_megatron.py, run as the tests' commands are (:func:`served`)."""
    res = served(str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir", hf_dir, "--out", out, *extra,
                 threads="1", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


@pytest.fixture(scope="session")
def tokens(tmp_path_factory) -> Path:
    """4 sequences x 32 tokens, saved for the workers."""
    path = tmp_path_factory.mktemp("data") / "tokens.pt"
    torch.save(torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0)), path)
    return path


@pytest.fixture(scope="session")
def hf_causal(tmp_path_factory) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "causal")


@pytest.fixture(scope="session")
def mg_causal(hf_causal, tmp_path_factory) -> Path:
    return convert(hf_causal, tmp_path_factory.mktemp("mg") / "causal")


@pytest.fixture(scope="session")
def hf_reward(tmp_path_factory) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("hf") / "reward", reward=True, seed=1)


@pytest.fixture(scope="session")
def mg_reward(hf_reward, tmp_path_factory) -> Path:
    return convert(hf_reward, tmp_path_factory.mktemp("mg") / "reward")


@pytest.fixture(scope="session")
def hf_tied(tmp_path_factory) -> Path:
    """A Llama whose LM head is its embedding (``tie_word_embeddings``), saved as transformers
    5 saves it (``rope_parameters``, ``dtype``), with a chat model's special-token ids
    (several EOS ids)."""
    path = make_hf_llama(tmp_path_factory.mktemp("hf") / "tied", tied=True, seed=5)
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in cfg and "rope_theta" not in cfg and cfg["tie_word_embeddings"] is True
    ids = dict(bos_token_id=3, eos_token_id=[4, 7], pad_token_id=0)
    for name, data in (("config.json", cfg),
                       ("generation_config.json", json.loads((path / "generation_config.json").read_text()))):
        (path / name).write_text(json.dumps({**data, **ids}, indent=2, sort_keys=True))
    return path


@pytest.fixture(scope="session")
def mg_tied(hf_tied, tmp_path_factory) -> Path:
    return convert(hf_tied, tmp_path_factory.mktemp("mg") / "tied")
