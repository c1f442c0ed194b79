"""Hub sources through the prepared-data cache: the ranks of a job started together contact
the hub once and read the same rows; a second job, or a job after `megarlhf prepare-data`,
reads the cache alone; without a copy and without the hub the error names the source and
the command; a damaged copy is an error naming the file.

The hub cannot be reached from the tests: it is replaced at the one function that contacts
it, ``megarlhf.data.hub.fetch_from_hub``, by a fake that counts contacts. The jobs are real
processes (tests/data/hub_worker.py: the flagship PPO config's data section, build_dataset
as the recipe calls it) sharing a cache folder through real file locks and Parquet files;
`megarlhf prepare-data` reads the flagship config itself."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import datasets
import pytest

from megarlhf.cli import main as cli_main
from megarlhf.data import hub
from megarlhf.data.dataset import DataConfig, build_dataset, data_problems
from megarlhf.data.errors import DataError
from megarlhf.data.hub import HubCache, default_cache_dir, offline_reason
from megarlhf.data.load import SourceConfig
from tests.conftest import REPO
from tests.data.hub_worker import hub_rows

FLAGSHIP = str(REPO / "examples" / "ppo_13b_70b_rm.yaml")
SOURCE, SPLIT = "allenai/ultrafeedback_binarized_cleaned", "train_prefs"  # the flagship's data
WORKER = str(REPO / "tests" / "data" / "hub_worker.py")
ROWS = 12
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def worker_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS + ("MEGARLHF_DATA_CACHE",)}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FAKE_HUB_ROWS=str(ROWS), **extra)
    return env


class Job:
    """N worker processes of one job, started together, reading the flagship's data
    (``data.`` overrides without the prefix)."""

    def __init__(self, tmp, name, tokenizer, cache, n, *overrides, **env):
        self.dir = tmp / name
        self.dir.mkdir()
        self.contacts = tmp / "contacts.jsonl"  # shared by every job of a test: contacts in all
        self.contacts.touch()
        env = worker_env(FAKE_JOB_BARRIER=f"{self.dir}:{n}", **env)
        self.procs = [subprocess.Popen(
            [sys.executable, WORKER, "prompts", tokenizer, str(self.contacts),
             str(self.dir / f"rank{r}.json"),
             f"sources=[{{path: {SOURCE}, split: {SPLIT}}}]", "max_prompt_length=1024",
             f"cache_dir={cache}", *overrides],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]

    def wait(self, timeout=120):
        results = []
        for p in self.procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
        return results

    def outputs(self):
        res = self.wait()
        for code, out, err in res:
            assert code == 0, (out + err)[-4000:]
        return [json.loads((self.dir / f"rank{r}.json").read_text()) for r in range(len(self.procs))]

    def contact_log(self):
        return [json.loads(line) for line in self.contacts.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(template):
    return template.tok.path


@pytest.fixture
def fake_hub(monkeypatch):
    """In this process: the fake hub, recording each (path, split) it serves."""
    calls = []

    def fetch(path, split):
        calls.append((path, split))
        return datasets.Dataset.from_list(hub_rows(ROWS))

    monkeypatch.setattr(hub, "fetch_from_hub", fetch)
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    return calls


@pytest.fixture(scope="module")
def first_job(tmp_path_factory, tokenizer):
    """Three ranks started together on an empty cache, the download slow enough that the
    others arrive while it runs."""
    tmp = tmp_path_factory.mktemp("first")
    cache = tmp / "cache"
    job = Job(tmp, "job1", tokenizer, cache, 3, FAKE_HUB_SLEEP="1.5")
    return tmp, cache, job.outputs(), job.contact_log()


def test_ranks_started_together_contact_the_hub_once(first_job):
    tmp, cache, outs, contacts = first_job
    assert len(contacts) == 1, contacts
    assert (contacts[0]["path"], contacts[0]["split"]) == (SOURCE, SPLIT)
    # Every rank was inside build_dataset while the download ran: the others waited for it.
    assert all(o["started"] < contacts[0]["time"] + 1.5 for o in outs)
    assert outs[0]["rows"] == outs[1]["rows"] == outs[2]["rows"]
    prompts = sorted(r["prompt"][0]["content"] for r in outs[0]["rows"])
    assert prompts == sorted(f"question {i}" for i in range(ROWS))
    assert outs[0]["report"] == [f"ultrafeedback_binarized_cleaned: {ROWS} rows -> {ROWS} kept"]
    # The copy and what its manifest records; nothing half-written left behind.
    folder = cache / "allenai--ultrafeedback_binarized_cleaned"
    data, manifest = folder / "train_prefs.parquet", json.loads((folder / "train_prefs.json").read_text())
    assert (manifest["source"], manifest["split"], manifest["rows"]) == (SOURCE, SPLIT, ROWS)
    assert manifest["bytes"] == data.stat().st_size
    assert manifest["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert sorted(p.name for p in folder.iterdir()) == ["train_prefs.json", "train_prefs.parquet",
                                                        "train_prefs.parquet.lock"]


def test_a_second_job_reads_the_cache_without_contacting_the_hub(first_job, tokenizer):
    tmp, cache, outs, _ = first_job
    job = Job(tmp, "job2", tokenizer, cache, 2)
    again = job.outputs()
    assert len(job.contact_log()) == 1  # the first job's contact only
    assert again[0]["rows"] == again[1]["rows"] == outs[0]["rows"]


def test_prepare_data_then_a_job_without_the_hub(tmp_path, tokenizer, template, fake_hub, capsys):
    cache = tmp_path / "cache"
    argv = ["prepare-data", "ppo", "--config", FLAGSHIP, f"data.cache_dir={cache}"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    data = cache / "allenai--ultrafeedback_binarized_cleaned" / "train_prefs.parquet"
    assert f"cache {cache} (data.cache_dir)" in out
    assert (f"{SOURCE} (split {SPLIT}): downloaded: {ROWS} rows, {data.stat().st_size} bytes -> {data}"
            in out)
    assert f"ppo data: ultrafeedback_binarized_cleaned: {ROWS} rows -> {ROWS} kept" in out
    assert fake_hub == [(SOURCE, SPLIT)]
    assert cli_main(argv) == 0  # run again: verified, not downloaded
    assert "already prepared, verified" in capsys.readouterr().out and len(fake_hub) == 1

    # Compute nodes without internet: the hub is down, and forbidden by Hugging Face's switch
    # in the job's environment, or by the config.
    job = Job(tmp_path, "job", tokenizer, cache, 2, FAKE_HUB_DOWN="1", HF_HUB_OFFLINE="1")
    outs = job.outputs()
    assert job.contact_log() == [] and outs[0]["rows"] == outs[1]["rows"] and len(outs[0]["rows"]) == ROWS
    cfg = DataConfig(sources=[SourceConfig(path=SOURCE, split=SPLIT)], cache_dir=str(cache), offline=True)
    assert len(build_dataset(cfg, "prompts", template).train) == ROWS and len(fake_hub) == 1


def test_no_copy_and_no_hub_names_the_source_and_the_command(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    job = Job(tmp_path, "job", tokenizer, cache, 1, "offline=true")
    [(code, out, err)] = job.wait()
    assert code == 3, out + err
    assert (f"hub dataset '{SOURCE}' (split '{SPLIT}') has no prepared copy in {cache} "
            "(no allenai--ultrafeedback_binarized_cleaned/train_prefs.json) and the hub may not be "
            "contacted (data.offline=true)") in err
    assert "run `megarlhf prepare-data RECIPE --config FILE" in err
    assert job.contact_log() == []


def test_offline_environment_variables(monkeypatch):
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert offline_reason(False) is None and offline_reason(True) == "data.offline=true"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert offline_reason(False) is None
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert offline_reason(False) == "HF_DATASETS_OFFLINE=true"


def test_an_unreachable_hub_names_the_source_and_leaves_no_copy(tmp_path, template, monkeypatch):
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)

    def down(path, split):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(hub, "fetch_from_hub", down)
    cfg = DataConfig(sources=[SourceConfig(path=SOURCE, split=SPLIT)], cache_dir=str(tmp_path))
    with pytest.raises(DataError) as e:
        build_dataset(cfg, "prompts", template)
    msg = str(e.value)
    assert f"cannot load hub dataset '{SOURCE}' (split '{SPLIT}'): ConnectionError" in msg
    assert "`megarlhf prepare-data RECIPE --config FILE" in msg
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.parquet"))
    # The lock went with the failure: the next try downloads.
    monkeypatch.setattr(hub, "fetch_from_hub", lambda path, split: datasets.Dataset.from_list(hub_rows(3)))
    assert len(build_dataset(cfg, "prompts", template).train) == 3


def test_a_damaged_copy_is_an_error_naming_the_file(tmp_path, template, fake_hub, capsys):
    cache = HubCache(str(tmp_path))
    copy = cache.prepare(SOURCE, SPLIT)
    assert copy.downloaded and copy.rows == ROWS and fake_hub == [(SOURCE, SPLIT)]
    cfg = DataConfig(sources=[SourceConfig(path=SOURCE, split=SPLIT)], cache_dir=str(tmp_path))
    good_data, good_manifest = open(copy.file, "rb").read(), open(copy.manifest, "rb").read()

    def fails(needle):
        with pytest.raises(DataError) as e:
            build_dataset(cfg, "prompts", template)
        assert needle in str(e.value), str(e.value)
        assert "prepare it again (`megarlhf prepare-data" in str(e.value) or "delete it" in str(e.value)

    with open(copy.file, "wb") as f:  # a copy cut short (a full disk, a copy interrupted)
        f.write(good_data[: len(good_data) // 2])
    fails(f"{copy.file}: {len(good_data) // 2} bytes, but its manifest {copy.manifest} records "
          f"{len(good_data)}: a partial or damaged copy")
    damaged = bytearray(good_data)
    damaged[len(damaged) // 2] ^= 0xFF
    with open(copy.file, "wb") as f:  # same size, other bytes
        f.write(bytes(damaged))
    fails(f"{copy.file}: its content does not match the SHA-256 in its manifest {copy.manifest}")
    os.remove(copy.file)
    fails(f"{copy.file}: missing, but its manifest {copy.manifest} exists")
    with open(copy.file, "wb") as f:
        f.write(good_data)
    with open(copy.manifest, "wb") as f:  # the manifest cut short
        f.write(good_manifest[:20])
    fails(f"{copy.manifest}: not a readable prepared-data manifest")
    record = json.loads(good_manifest)
    with open(copy.manifest, "w") as f:  # a copy of another split under this name
        json.dump(dict(record, split="test_prefs"), f)
    fails(f"{copy.manifest}: a prepared copy of '{SOURCE}' split 'test_prefs', "
          f"not of '{SOURCE}' split '{SPLIT}'")
    assert fake_hub == [(SOURCE, SPLIT)]  # none of these went to the hub

    # prepare-data --force replaces it.
    argv = ["prepare-data", "ppo", "--config", FLAGSHIP, f"data.cache_dir={tmp_path}", "--force"]
    assert cli_main(argv) == 0
    assert "downloaded" in capsys.readouterr().out and len(fake_hub) == 2
    assert len(build_dataset(cfg, "prompts", template).train) == ROWS


def waits_for_a_lock(pid):
    """Whether process ``pid`` is blocked on a file lock (a ``->`` line of /proc/locks)."""
    with open("/proc/locks") as f:
        return any(line.split()[1] == "->" and line.split()[5] == str(pid) for line in f)


def test_a_rank_killed_while_downloading_does_not_block_the_others(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    first = Job(tmp_path, "a", tokenizer, cache, 1, FAKE_HUB_SLEEP="600")
    deadline = time.time() + 60
    while not first.contacts.read_text():  # it holds the lock and "downloads"
        assert time.time() < deadline and first.procs[0].poll() is None, first.wait()
        time.sleep(0.1)
    second = Job(tmp_path, "b", tokenizer, cache, 1)
    while not waits_for_a_lock(second.procs[0].pid):  # blocked on the first one's lock
        assert time.time() < deadline and second.procs[0].poll() is None, second.wait()
        time.sleep(0.1)
    assert len(second.contact_log()) == 1
    first.procs[0].send_signal(signal.SIGKILL)
    first.wait()
    [out] = second.outputs()  # the lock went with the process: the second one downloads
    assert len(out["rows"]) == ROWS and len(second.contact_log()) == 2


def test_prepare_data_with_local_sources_or_none(tmp_path, capsys, monkeypatch):
    local = tmp_path / "prompts.jsonl"
    local.write_text('{"prompt": "2+2?"}\n')
    assert cli_main(["prepare-data", "ppo", "--config", FLAGSHIP, f"data.sources=[{{path: {local}}}]",
                     f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out
    assert f"{local}: a local file, read by the job itself" in out and "1 rows -> 1 kept" in out
    assert not (tmp_path / "cache").exists()
    assert cli_main(["prepare-data", "sft"]) == 0
    assert "names no data sources" in capsys.readouterr().out
    # A config error names the key; a file that is not there names the file.
    assert cli_main(["prepare-data", "dpo", "data.cache_dir=''", "data.sources=[{path: a/b}]"]) == 2
    assert "data.cache_dir='': a folder, or null" in capsys.readouterr().err
    assert cli_main(["prepare-data", "rm", "data.sources=[{path: missing.jsonl}]"]) == 1
    assert "data file not found: missing.jsonl" in capsys.readouterr().err


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.delenv("MEGARLHF_DATA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / ".cache" / "megarlhf" / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "megarlhf" / "data")
    monkeypatch.setenv("MEGARLHF_DATA_CACHE", str(tmp_path / "shared"))
    assert HubCache.create(None).root == str(tmp_path / "shared")
    assert HubCache.create(str(tmp_path / "mine")).root == str(tmp_path / "mine")
    assert data_problems(DataConfig(cache_dir=" ")) == [
        "data.cache_dir=' ': a folder, or null for $MEGARLHF_DATA_CACHE (else ~/.cache/megarlhf/data)"]
    assert data_problems(DataConfig(cache_dir=str(tmp_path))) == []
