"""tools/gpu_rehearsal.py: what runs where (on hardware written out by hand), the overrides
it gives the recipes, its verdicts and report table, and the whole --cpu rehearsal end to
end from its bundle, in an interpreter that has only what a GPU machine's image has."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarlhf.config import load_config
from megarlhf.platform import Hardware
from megarlhf.recipes.dpo import DPOConfig
from megarlhf.recipes.ppo import PPOConfig
from megarlhf.recipes.reward_model import RMConfig
from megarlhf.recipes.sft import SFTConfig
from tests.conftest import REPO, run_tool
from tests.tools.machine_site import link_site

_spec = importlib.util.spec_from_file_location("gpu_rehearsal", REPO / "tools" / "gpu_rehearsal.py")
rehearsal = sys.modules["gpu_rehearsal"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rehearsal)
Variant = rehearsal.Variant

NO_TE = "Transformer Engine is not installed (pip install 'megarlhf[gpu]')"
CPU = Hardware(transformer_engine=NO_TE)
H100 = Hardware(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), transformer_engine="ok")
H100_NO_TE = Hardware(gpu="NVIDIA H100 80GB HBM3", capability=(9, 0), transformer_engine=NO_TE)
A100 = Hardware(gpu="NVIDIA A100-SXM4-80GB", capability=(8, 0), transformer_engine="ok")
V100 = Hardware(gpu="Tesla V100-SXM2-16GB", capability=(7, 0), transformer_engine=NO_TE)
TE_FP8 = Variant("transformer_engine", "hybrid", "bfloat16")


def statuses(items):
    return {k: v["status"] for k, v in items.items()}


# -- planning ------------------------------------------------------------------------------

def test_cpu_mode_runs_everything_but_the_te_item_with_local_layers_in_fp32():
    items = rehearsal.plan(CPU, gpus=0, cpu=True, transformers=True)
    assert list(items) == list(rehearsal.ITEMS)
    assert [k for k, s in statuses(items).items() if s != "planned"] == ["logits_te"]
    assert "Transformer Engine" in items["logits_te"]["reason"]
    assert items["sft"] == {"status": "planned", "layers": "local", "fp8": None, "dtype": "float32", "processes": 1}
    assert items["ppo_resume"]["processes"] == 2 and items["ppo_resume"]["optimizer"] == "distributed (DP=2)"
    assert (items["ppo_partitioned"]["processes"], items["ppo_partitioned"]["reward_ranks"]) == (2, 1)
    assert items["logits_local"]["reference"] == "transformers"


def test_no_gpu_without_cpu_mode_runs_nothing():
    items = rehearsal.plan(CPU, gpus=0, cpu=False, transformers=True)
    assert set(statuses(items).values()) == {"not run"}
    assert "--cpu" in items["sft"]["reason"]


def test_one_hopper_with_transformer_engine_runs_fp8_and_the_plain_optimizer():
    items = rehearsal.plan(H100, gpus=1, cpu=False, transformers=True)
    assert statuses(items)["ppo_partitioned"] == "not run" and "1 visible" in items["ppo_partitioned"]["reason"]
    for name in ("sft", "rm", "dpo", "ppo_resume", "generate", "logits_te"):
        assert items[name]["status"] == "planned", name
        assert rehearsal.variant_of(items[name]) == TE_FP8 and "fallback" not in items[name], name
    assert items["logits_local"]["layers"] == "local" and items["logits_local"]["dtype"] == "bfloat16"
    assert items["logits_te"]["reference"] == "transformers"
    assert items["ppo_resume"]["processes"] == 1 and items["ppo_resume"]["optimizer"].startswith("plain")


@pytest.mark.parametrize("gpus, world, reward_ranks", [(2, 2, 1), (3, 2, 1), (8, 4, 2)])
def test_several_gpus_add_the_partitioned_run_and_the_distributed_optimizer(gpus, world, reward_ranks):
    items = rehearsal.plan(H100, gpus=gpus, cpu=False, transformers=True)
    p = items["ppo_partitioned"]
    assert p["status"] == "planned" and rehearsal.variant_of(p) == TE_FP8
    assert (p["processes"], p["reward_ranks"]) == (world, reward_ranks)
    assert items["ppo_resume"]["processes"] == 2 and items["ppo_resume"]["optimizer"] == "distributed (DP=2)"


def test_hopper_without_transformer_engine_runs_local_layers_and_says_why():
    items = rehearsal.plan(H100_NO_TE, gpus=1, cpu=False, transformers=True)
    assert items["logits_te"]["status"] == "not run" and NO_TE in items["logits_te"]["reason"]
    sft = items["sft"]
    assert rehearsal.variant_of(sft) == Variant("local", None, "bfloat16")
    assert sft["fallback"].startswith("Transformer Engine and FP8 not run") and NO_TE in sft["fallback"]
    assert all(items[n]["status"] == "planned" for n in ("sft", "convert", "logits_local", "rm", "dpo", "generate"))


def test_ampere_runs_transformer_engine_in_bf16_and_reports_fp8_not_run():
    items = rehearsal.plan(A100, gpus=1, cpu=False, transformers=True)
    assert rehearsal.variant_of(items["sft"]) == Variant("transformer_engine", None, "bfloat16")
    assert items["sft"]["fallback"].startswith("FP8 not run") and "compute capability 8.9" in items["sft"]["fallback"]
    assert items["logits_te"]["status"] == "planned"


def test_old_gpu_trains_in_fp32_and_without_transformers_te_compares_with_local_layers():
    assert rehearsal.variant_of(rehearsal.plan(V100, 1, False, True)["sft"]) == Variant("local", None, "float32")
    items = rehearsal.plan(H100, gpus=1, cpu=False, transformers=False)
    assert items["logits_local"]["status"] == "not run" and "transformers" in items["logits_local"]["reason"]
    assert items["logits_te"]["reference"].startswith("the local layers")


# -- what the recipes are given --------------------------------------------------------------

def test_model_overrides_are_one_table_and_each_recipe_schema_takes_them():
    assert rehearsal.model_overrides("actor.model", TE_FP8) == [
        "actor.model.transformer_impl=transformer_engine", "actor.model.attention_backend=fused",
        "actor.model.fp8=hybrid", "actor.model.params_dtype=bfloat16"]
    assert rehearsal.model_overrides("model", Variant("local", None, "float32")) == [
        "model.transformer_impl=local", "model.params_dtype=float32"]
    sft = load_config(SFTConfig, None, rehearsal.model_overrides("model", TE_FP8))
    assert (sft.model.transformer_impl, sft.model.fp8, sft.model.params_dtype) == ("transformer_engine", "hybrid",
                                                                                    "bfloat16")
    for schema in (RMConfig, DPOConfig):
        m = load_config(schema, None, rehearsal.model_overrides("model", TE_FP8)).model
        assert (m.transformer_impl, m.fp8) == ("transformer_engine", "hybrid")
    roles = ("actor", "reference", "critic", "reward")
    ppo = load_config(PPOConfig, None, [a for r in roles for a in rehearsal.model_overrides(f"{r}.model", TE_FP8)])
    assert {getattr(ppo, r).model.fp8 for r in roles} == {"hybrid"}


SCHEMAS = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig}


@pytest.mark.parametrize("sizes", ["GPU_SIZES", "CPU_SIZES"])
def test_every_recipe_command_of_the_rehearsal_validates(sizes, tmp_path):
    """The commands each mode gives the recipes pass the recipes' own checks (batch and
    minibatch divisibility over DP, sequence lengths...) before any GPU is at hand; TE
    and FP8 only parse here (they are refused on a CPU)."""
    ctx = rehearsal.Context(cpu=sizes == "CPU_SIZES", sizes=getattr(rehearsal, sizes), entries={}, work=tmp_path,
                            env={}, python=[], cpus=1)
    for v in (Variant("local", None, "float32"), TE_FP8):
        commands = [rehearsal.sft_args(ctx, v), rehearsal.rm_args(ctx, v), rehearsal.dpo_args(ctx, v)]
        commands += [rehearsal.ppo_args(ctx, v, tmp_path / "ppo", world, 5) for world in (1, 2)]
        commands += [rehearsal.ppo_args(ctx, v, tmp_path / "ppo", world, 3)
                     + ["placement=partitioned", f"reward_ranks={world // 2}"] for world in (2, 4)]
        for args in commands:
            cfg = load_config(SCHEMAS[args[0]], None, args[1:])
            if v.layers == "local":
                cfg.validate()
            elif args[0] == "sft":
                assert (cfg.model.transformer_impl, cfg.model.fp8, cfg.train.packing) == (
                    "transformer_engine", "hybrid", False)


def test_gpu_estimate_stays_well_under_ten_minutes():
    items = rehearsal.plan(H100, gpus=1, cpu=False, transformers=True)
    e = rehearsal.estimate(rehearsal.GPU_SIZES, items)
    assert 85e6 < e["parameters"] < 95e6  # 8 layers, hidden 1024, FFN 2816, 16/4 heads, vocabulary 384
    assert 4e14 < e["total_flops"] < 6e14 and e["compute_seconds"] < 10
    assert e["process_starts"] == 11 and e["estimated_seconds"] < 480
    s = rehearsal.GPU_SIZES  # FP8 GEMMs need every dimension a multiple of 16
    assert all(x % 16 == 0 for x in (s.hidden, s.ffn, s.hidden // s.heads * s.kv_heads, s.seq, s.logits_seq))


# -- verdicts -----------------------------------------------------------------------------------

def _rows(changes=None):
    base = {"step": 0, "time": 1.0, "score_mean": 0.5, "kl": 0.01, "policy_loss": -0.1, "value_loss": 2.0,
            "time/generate": 0.3, "tokens_per_s/step": 900}
    rows = {s: dict(base, step=s) for s in (3, 4, 5)}
    for (step, key), value in (changes or {}).items():
        rows[step][key] = value
    return rows


def test_compare_steps_is_bit_exact_at_tolerance_zero_and_ignores_timings():
    same = rehearsal.compare_steps(_rows(), _rows({(4, "time"): 9.0, (5, "time/generate"): 7.0}), [4, 5], 0.0)
    assert same["status"] == "pass" and same["max_abs_difference"] == 0.0 and same["worst"] is None
    assert same["metrics_compared"] == ["kl", "policy_loss", "score_mean", "value_loss"]
    off = rehearsal.compare_steps(_rows(), _rows({(5, "kl"): 0.01 + 1e-9}), [4, 5], 0.0)
    assert off["status"] == "fail" and off["worst"]["step"] == 5 and off["worst"]["key"] == "kl"
    assert math.isclose(off["max_abs_difference"], 1e-9, rel_tol=1e-3)
    loose = rehearsal.compare_steps(_rows(), _rows({(4, "value_loss"): 2.01}), [4, 5], 1e-2)
    assert loose["status"] == "pass" and math.isclose(loose["max_relative_difference"], 0.01 / 2.01)
    assert rehearsal.compare_steps(_rows(), _rows({(4, "value_loss"): 2.1}), [4, 5], 1e-2)["status"] == "fail"
    # step 3 differs, but only steps 4-5 are compared
    assert rehearsal.compare_steps(_rows(), _rows({(3, "kl"): 5.0}), [4, 5], 0.0)["status"] == "pass"


def test_compare_steps_fails_on_missing_steps_metrics_and_nan():
    a = _rows()
    b = {s: r for s, r in _rows().items() if s != 5}
    assert "missing" in rehearsal.compare_steps(a, b, [4, 5], 0.0)["reason"]
    extra = rehearsal.compare_steps(a, _rows({(4, "score_correct"): 1.0}), [4, 5], 0.0)
    assert extra["status"] == "fail" and extra["metrics_in_one_run_only"] == ["score_correct"]
    nan = float("nan")
    assert rehearsal.compare_steps(_rows({(4, "kl"): nan}), _rows({(4, "kl"): nan}), [4, 5], 0.0)["status"] == "pass"
    assert rehearsal.compare_steps(_rows({(4, "kl"): nan}), a, [4, 5], 1.0)["status"] == "fail"


def test_step_rows_keep_the_training_rows():
    rows = [{"step": 0, "exact_match": 0.5}, {"step": 1, "score_mean": 1.0}, {"step": 2, "score_mean": 2.0}]
    assert sorted(rehearsal.step_rows(rows, "score_mean")) == [1, 2]


def test_logit_metrics_and_tolerances():
    ref = torch.tensor([[[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]])
    m = rehearsal.logit_metrics(ref + 1e-3, ref)
    assert math.isclose(m["max_abs"], 1e-3, rel_tol=1e-4) and m["top1_agreement"] == 1.0
    assert rehearsal.logit_verdict(m, Variant("local", None, "float32"))["status"] == "fail"  # 1e-5 for fp32
    assert rehearsal.logit_verdict(m, Variant("transformer_engine", None, "bfloat16"))["status"] == "pass"
    flipped = rehearsal.logit_metrics(ref.flip(-1), ref)
    assert flipped["top1_agreement"] == 0.0
    assert rehearsal.logit_verdict(flipped, TE_FP8)["status"] == "fail"
    assert rehearsal.logit_verdict(dict(m, rel_l2=float("nan")), TE_FP8)["status"] == "fail"


def test_report_table_and_exit_status():
    items = rehearsal.plan(H100, gpus=1, cpu=False, transformers=True)
    items["sft"].update(status="pass", seconds=12.3, kernels=TE_FP8.describe(), steps=2, losses=[6.0, 5.5],
                        exact_match=0.25)
    items["rm"].update(status="fail", seconds=4.0, error="megarlhf rm failed (exit status 1): ...\nmore")
    table = rehearsal.table(items).splitlines()
    assert table[:2] == ["| item | status | seconds | result |", "|---|---|---:|---|"]
    assert len(table) == 2 + len(rehearsal.ITEMS)
    assert table[2] == "| SFT | pass | 12.3 | TE layers, FP8 hybrid: 2 steps, loss 6 -> 5.5, exact match 25.0% |"
    assert "| reward model | fail | 4.0 | megarlhf rm failed (exit status 1): ... |" in table
    assert "| PPO partitioned | not run |  | needs 2 GPUs (1 visible) |" in table
    items["dpo"].update(status="fail", seconds=1.0, kernels="local layers, bf16", steps=1, losses=[float("nan")],
                        problems=["a loss is not finite"])
    assert rehearsal.result_line("dpo", items["dpo"]).startswith("a loss is not finite (local layers, bf16: 1 steps")
    assert rehearsal.overall_status(items) == 1
    items["rm"]["status"] = "pass"
    assert rehearsal.overall_status({k: v for k, v in items.items() if k in ("rm", "ppo_partitioned")}) == 0


# -- children ------------------------------------------------------------------------------------

def test_hidden_modules_raise_import_error_in_children(tmp_path):
    folder = rehearsal.hide_modules(["fake_kernels_pkg"], tmp_path / "hidden")
    paths = rehearsal.child_pythonpath(["/bundle/megatron-core"], folder)
    assert paths[:3] == [str(folder), str(REPO), "/bundle/megatron-core"]
    proc = subprocess.run([sys.executable, "-c", "import fake_kernels_pkg"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(folder), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "ImportError" in proc.stderr and "hidden by tools/gpu_rehearsal.py" in proc.stderr
    assert rehearsal.hide_modules([], tmp_path / "none") is None


def test_help_says_how_to_run_it_on_a_gpu_machine():
    res = run_tool("tools/gpu_rehearsal.py", "--help", timeout=60)
    assert res.returncode == 0
    for needle in ("--make-bundle", "python tools/gpu_rehearsal.py --out rehearsal.json", "sentencepiece",
                   "pyarrow", "psutil", "not run", "--cpu"):
        assert needle in res.stdout, needle


# -- end to end ----------------------------------------------------------------------------------

IMAGE = ("torch", "numpy", "transformers", *rehearsal.MACHINE_PACKAGES.values())


def _image_site(root: Path, packages=IMAGE) -> Path:
    """A folder of links to what a GPU machine's image has: torch and its dependencies, the
    compiled packages the rehearsal needs there, and transformers with its dependencies,
    less every distribution the bundle carries (those must come from the bundle). The
    folder is named site-packages as installed packages' is: dill, which datasets uses for
    fingerprints, pickles modules found elsewhere by value (pyarrow's then fails)."""
    root = link_site(root, packages, leave_out=[b.distribution for b in rehearsal.BUNDLE])
    for absent in ("megatron", "omegaconf", "datasets", "huggingface_hub", "yaml", "tqdm"):
        assert not (root / absent).exists(), absent
    return root


def _run_in_image(site: Path, tmp_path: Path, *args: str, timeout: int):
    tool = str(REPO / "tools" / "gpu_rehearsal.py")
    code = (f"import importlib.util, runpy, sys; sys.path.append({str(site)!r}); "
            "assert all(importlib.util.find_spec(m) is None for m in ('omegaconf', 'yaml', 'datasets', 'megatron')); "
            f"sys.argv = [{tool!r}, *{list(args)!r}]; runpy.run_path({tool!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})


def test_a_machine_without_the_bundle_is_told_what_to_do(tmp_path):
    site, out = _image_site(tmp_path / "image" / "site-packages", ("torch", "numpy")), tmp_path / "r.json"
    proc = _run_in_image(site, tmp_path, "--bundle", str(tmp_path / "none"), "--out", str(out), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    r = json.loads(out.read_text())
    assert r["exit_code"] == 2 and {e["status"] for e in r["items"].values()} == {"not run"}
    machine, bundle = r["setup_error"].split("; ")
    assert "sentencepiece" in machine and "pyarrow" in machine and "install them on this machine" in machine
    assert "megatron.core" in bundle and "datasets" in bundle and "--make-bundle" in bundle


def test_cpu_rehearsal_runs_end_to_end_from_the_bundle(tmp_path):
    """--make-bundle, then --cpu in ``python -I -S`` whose path holds the standard library
    and the image's packages only: every item runs (its children with ``python -S`` and the
    same path; torchrun's ranks start without -S) and passes, but the TE item, not run with
    its reason; the report says so and the rehearsal exits 0."""
    pytest.importorskip("transformers")
    bundle = tmp_path / "bundle"
    res = run_tool("tools/gpu_rehearsal.py", "--make-bundle", bundle, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {p["distribution"] for p in manifest["packages"]} >= {
        "megatron-core", "omegaconf", "PyYAML", "packaging", "datasets", "dill", "huggingface-hub", "tqdm"}
    assert list((bundle / "datasets").glob("datasets-*.dist-info/METADATA"))  # importlib.metadata finds it
    files = [f for f in bundle.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".so", ".pyc")]

    site, out = _image_site(tmp_path / "image" / "site-packages"), tmp_path / "report" / "rehearsal.json"
    assert (site / "transformers").exists()
    proc = _run_in_image(site, tmp_path, "--bundle", str(bundle), "--cpu", "--out", str(out), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out)
    r = json.loads(out.read_text())
    assert r["tool"] == "gpu_rehearsal" and r["mode"] == "cpu" and r["exit_code"] == 0 and r["setup_error"] is None
    assert r["work_dir"] is None and not list(out.parent.glob("gpu_rehearsal-*"))  # removed: everything passed
    assert all(r["environment"]["packages"][d].startswith("bundle") for d in ("megatron-core", "datasets", "tqdm"))
    items = r["items"]
    assert list(items) == list(rehearsal.ITEMS)
    for name, e in items.items():
        if name in rehearsal.TE_ONLY:
            assert e["status"] == "not run" and "Transformer Engine" in e["reason"], (name, e)
            continue
        assert e["status"] == "pass", (name, e)
        assert e["seconds"] > 0, name
        rcs = {c["name"]: c["rc"] for c in e["commands"]}
        if name == "convert" and not e["transformer_impl_flag"]:  # refused; the import ran again without it
            assert rcs.pop("convert_import") == 2 and "convert_import_without_flag" in rcs
        assert rcs and set(rcs.values()) == {0}, (name, rcs)
        assert f"| {rehearsal.TITLES[name]} | pass |" in proc.stdout, name
    assert items["convert"]["exports"]["identical"] == items["convert"]["exports"]["tensors"] > 10
    assert items["convert"]["recorded_transformer_impl"] == "local"
    assert items["logits_local"]["comparisons"]["local vs HF"]["rel_l2"] < 1e-5
    resume = items["ppo_resume"]
    assert resume["optimizer"] == "distributed (DP=2)" and resume["processes"] == 2
    assert resume["resume"]["tolerance"] == 0.0 and resume["resume"]["max_abs_difference"] == 0.0
    assert {"policy_loss", "value_loss", "kl", "score_mean"} <= set(resume["resume"]["metrics_compared"])
    gen = items["generate"]
    assert gen["tokens_per_s"] > 0 and gen["generated"] == gen["batch"] * gen["new_tokens"]
    assert gen["graphs"]["same_tokens"] and gen["graphs"]["captured"] >= 1 and not gen["graphs"]["real"]
    assert items["ppo_partitioned"]["reward_ranks"] == 1 and items["ppo_partitioned"]["steps"] == 2
    assert len(items["sft"]["losses"]) == rehearsal.CPU_SIZES.sft_steps
