"""One process of a job whose data is a hub dataset, for tests/data/test_prepare.py.

    python hub_worker.py KIND TOKENIZER CONTACTS OUT [key=value ...]

Reads the ``data:`` section of a recipe config from the overrides (``sources=[...]``,
``cache_dir=...``, ``offline=true``: the keys of ``data.`` without the prefix; the
recipes' own schemas import torch, seconds per process, and only this section matters
here), builds the dataset as the recipes do, ``build_dataset(cfg.data, KIND, template)``,
and writes the training rows and the load report to OUT as JSON.

The hub is replaced at the one function that contacts it,
``megarlhf.data.hub.fetch_from_hub``, by a fake that appends a line to CONTACTS for every
contact and serves FAKE_HUB_ROWS rows shaped like UltraFeedback's binarized splits
(``FAKE_HUB_SLEEP`` seconds of "download" first; ``FAKE_HUB_DOWN=1``: the hub cannot be
reached). Everything else is real: file locks, Parquet files, ``datasets``, the config.
``FAKE_JOB_BARRIER=DIR:N``: the N workers enter build_dataset together, as the ranks of a
job do once their process group exists.
"""

import glob
import json
import os
import sys
import time

import datasets

from megarlhf.config import load_config
from megarlhf.data import hub
from megarlhf.data.chat import ChatTemplate, ChatTemplateConfig
from megarlhf.data.dataset import DataConfig, build_dataset
from megarlhf.data.errors import DataError
from megarlhf.data.tokenizer import load_tokenizer


def hub_rows(n):
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [{"prompt": f"question {i}", "prompt_id": f"id{i}", "chosen": conv(f"question {i}", f"answer {i}"),
             "rejected": conv(f"question {i}", f"answer {i + 1}"), "score_chosen": 8.0, "score_rejected": 2.5}
            for i in range(n)]


def fake_fetch(path, split):
    with open(os.environ["FAKE_HUB_CONTACTS"], "a") as f:  # O_APPEND: one whole line per contact
        f.write(json.dumps({"pid": os.getpid(), "path": path, "split": split, "time": time.time()}) + "\n")
    time.sleep(float(os.environ.get("FAKE_HUB_SLEEP", "0")))
    if os.environ.get("FAKE_HUB_DOWN") == "1":
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (no network)")
    return datasets.Dataset.from_list(hub_rows(int(os.environ.get("FAKE_HUB_ROWS", "12"))))


def main(kind, tokenizer, contacts, out, *overrides):
    os.environ["FAKE_HUB_CONTACTS"] = contacts
    hub.fetch_from_hub = fake_fetch
    data_cfg = load_config(DataConfig, None, list(overrides))
    template = ChatTemplate(ChatTemplateConfig(name="tulu"), load_tokenizer(tokenizer))
    if os.environ.get("FAKE_JOB_BARRIER"):
        folder, n = os.environ["FAKE_JOB_BARRIER"].rsplit(":", 1)
        open(os.path.join(folder, f"ready.{os.getpid()}"), "w").close()
        while len(glob.glob(os.path.join(folder, "ready.*"))) < int(n):
            time.sleep(0.02)
    started = time.time()
    try:
        data = build_dataset(data_cfg, kind, template)
    except DataError as e:
        print(f"DataError: {e}", file=sys.stderr)
        return 3
    with open(out, "w") as f:
        json.dump({"rows": data.train.to_list(), "report": data.report.lines(), "started": started}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
